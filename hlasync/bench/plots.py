"""PNG plots of one run (matplotlib, optional)."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path
from typing import Any

from ._common import CATEGORY_BY_KEY, MiB, Row


def missing() -> str | None:
    """Why no plots are drawn, or None when matplotlib is there."""
    if importlib.util.find_spec("matplotlib") is None:
        return "matplotlib is not installed (python -m pip install -e '.[bench]')"
    try:
        import matplotlib  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError as exc:
        return f"matplotlib does not import: {exc}"
    return None


#: Box plots of these categories, one PNG each: (category, file name).
DISTRIBUTIONS = (
    ("call", "call_latency.png"),
    ("fresh", "fresh_state.png"),
    ("interrupt", "interruption.png"),
    ("hang_time", "hang_capture.png"),
)


def _label(row: Row) -> str:
    return textwrap.fill(f"{row.peer}: {row.label}", 28)


def draw(rows: list[Row], out: Path, title_suffix: str) -> dict[str, Any]:
    """Draw every plot into ``out``; returns {"files": [...]} or {"skipped": reason}."""
    reason = missing()
    if reason is not None:
        return {"files": [], "skipped": reason}
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    files: list[str] = []
    for category, name in DISTRIBUTIONS:
        measured = [r for r in rows if r.category == category and r.measured]
        if not measured:
            continue
        fig, ax = plt.subplots(figsize=(max(6.0, 2.6 * len(measured)), 5.0))
        data = [[value / 1000.0 for value in r.samples] for r in measured]
        ax.boxplot(data, whis=(1, 99), showfliers=False)
        ax.set_xticks(range(1, len(measured) + 1), [_label(r) for r in measured], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("microseconds (log scale)")
        ax.set_title(f"{CATEGORY_BY_KEY[category].label}\n{title_suffix}", fontsize=9)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.text(
            0.99, 0.01, "box: p25-p75, line: median, whiskers: p1-p99",
            transform=ax.transAxes, ha="right", va="bottom", fontsize=7,
        )  # fmt: skip
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)

    alive = next((r for r in rows if r.category == "scale_alive" and r.measured), None)
    if alive is not None:
        curve = alive.extra["curve"]
        xs = [point["sandboxes"] for point in curve]
        rss0, available0 = curve[0]["rss_bytes"], curve[0]["mem_available_bytes"]
        rss = [(point["rss_bytes"] - rss0) / MiB for point in curve]
        system = [(available0 - point["mem_available_bytes"]) / MiB for point in curve]
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        ax.plot(xs, rss, marker="o", markersize=3, label="process RSS")
        ax.plot(
            xs, system, marker=".", markersize=3, linestyle="--",
            label="drop of system MemAvailable (includes kernel memory; noisy)",
        )  # fmt: skip
        ax.set_xlabel("idle sandboxes alive in this process")
        ax.set_ylabel("MiB above the start (0 sandboxes)")
        ax.legend(fontsize=7)
        ax.set_title(f"hlasync: sandboxes alive vs RSS\n{title_suffix}", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "scale_rss.png", dpi=110)
        plt.close(fig)
        files.append("scale_rss.png")

    throughput = [r for r in rows if r.category == "scale_throughput" and r.measured]
    if throughput:
        fig, ax = plt.subplots(figsize=(6.0, 4.5))
        ax.boxplot([r.samples for r in throughput], whis=(0, 100), showfliers=False)
        ax.set_xticks(range(1, len(throughput) + 1), [_label(r) for r in throughput], fontsize=7)
        ax.set_ylabel("calls/s (per window)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{CATEGORY_BY_KEY['scale_throughput'].label}\n{title_suffix}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        plt.close(fig)
        files.append("throughput.png")
    return {"files": files, "skipped": None}
