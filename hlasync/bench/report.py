"""The markdown table and the JSON document of one run."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ._common import CATEGORIES, Counts, Row, format_value, machine_lines


def baselines(rows: list[Row]) -> dict[str, Row]:
    """The measured hlasync baseline row of each category."""
    found: dict[str, Row] = {}
    for row in rows:
        if row.baseline and row.measured:
            found[row.category] = row
    return found


def ratio(row: Row, base: dict[str, Row]) -> float | None:
    """Median of ``row`` / median of its category's hlasync baseline."""
    baseline = base.get(row.category)
    if baseline is None or not row.measured:
        return None
    denominator = baseline.stats()["median"]
    return row.stats()["median"] / denominator if denominator else None


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def render(machine: dict[str, Any], mode: str, rows: list[Row], wall_s: float) -> str:
    base = baselines(rows)
    packages = ", ".join(
        f"{name} {version or 'not installed'}" for name, version in machine["packages"].items()
    )
    tools = ", ".join(
        f"{name}: {line or 'not installed'}" for name, line in machine["tools"].items()
    )
    lines = [
        "## hlasync side by side with its peers",
        "",
        *machine_lines(machine),
        f"- packages: {packages}",
        f"- tools: {tools}",
        f"- mode: {mode}; all rows measured in this one run ({wall_s:.0f} s)",
        "",
        "| category | peer | measurement | median | p99 | n | ratio to hlasync | notes |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for category in CATEGORIES:
        for row in rows:
            if row.category != category.key:
                continue
            if not row.measured:
                lines.append(
                    f"| {category.label} | {row.peer} | {_escape(row.label)} | - | - | 0 | - "
                    f"| skipped: {_escape(row.skipped or 'no samples')} |"
                )
                continue
            stats = row.stats()
            value = ratio(row, base)
            ratio_text = "baseline" if row.baseline else ("-" if value is None else f"{value:.2f}x")
            lines.append(
                f"| {category.label} | {row.peer} | {_escape(row.label)} "
                f"| {format_value(stats['median'], row.unit)} "
                f"| {format_value(stats['p99'], row.unit)} | {len(row.samples)} "
                f"| {ratio_text} | {_escape('; '.join(row.notes)) or '-'} |"
            )
    lines += [
        "",
        "Ratio: this row's median divided by the median of the category's hlasync baseline",
        "row. For times and bytes above 1 means more than hlasync; for calls/s above 1 means",
        "more calls per second.",
    ]
    return "\n".join(lines)


def to_json(
    machine: dict[str, Any],
    mode: str,
    counts: Counts,
    rows: list[Row],
    wall_s: float,
    plots: dict[str, Any],
) -> dict[str, Any]:
    base = baselines(rows)
    entries: list[dict[str, Any]] = []
    for row in rows:
        entry: dict[str, Any] = {
            "category": row.category,
            "key": row.key,
            "peer": row.peer,
            "label": row.label,
            "unit": row.unit,
            "baseline": row.baseline,
            "status": "measured" if row.measured else "skipped",
            "skip_reason": row.skipped,
            "n": len(row.samples),
            "notes": row.notes,
            "extra": row.extra,
            "samples": row.samples,
        }
        if row.measured:
            entry.update(row.stats())
            entry["ratio_to_hlasync"] = ratio(row, base)
            entry["ratio_baseline"] = base[row.category].key if row.category in base else None
        entries.append(entry)
    return {
        "machine": machine,
        "mode": mode,
        "counts": asdict(counts),
        "wall_seconds": wall_s,
        "categories": {
            c.key: {
                "label": c.label,
                "unit": c.unit,
                "baseline": base[c.key].key if c.key in base else None,
            }
            for c in CATEGORIES
        },
        "rows": entries,
        "plots": plots,
    }
