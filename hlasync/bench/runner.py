"""Run every category, then write the table, the JSON and the plots."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .. import guests
from . import calls, fresh, hang, interrupt, javascript, plots, report, scale
from ._common import FULL, QUICK, Row, machine_description

DEFAULT_OUT = Path("benchmarks") / "results" / "peers"
MARKDOWN = "peers.md"
JSON = "peers.json"


def run_all(quick: bool, progress: bool = True) -> tuple[list[Row], float]:
    counts = QUICK if quick else FULL
    guest = guests.path("simpleguest")  # may rebuild a stale guest: not timed
    rows: list[Row] = []
    started = time.perf_counter()
    # Order matters: fork is measured before the scale step fills this process
    # with sandboxes, and every peer of a category runs back to back.
    for name, module in (
        ("call latency", calls),
        ("fresh state", fresh),
        ("runaway interruption", interrupt),
        ("hang capture", hang),
        ("scale", scale),
        ("javascript", javascript),
    ):
        step = time.perf_counter()
        rows += module.run(guest, counts)
        if progress:
            print(f"{name}: {time.perf_counter() - step:.1f} s", file=sys.stderr, flush=True)
    return rows, time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hlasync.bench",
        description="hlasync side by side with wasmtime, child processes, fork and gcore.",
    )
    parser.add_argument("--quick", action="store_true", help="few samples: a smoke test (~20 s)")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="DIR",
        help=f"where the table, JSON and plots go (default: {DEFAULT_OUT}/)",
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    mode = "quick" if args.quick else "full"
    mode_text = "quick (smoke test, not for quoting)" if args.quick else "full"
    machine = machine_description()

    rows, wall = run_all(args.quick)

    table = report.render(machine, mode_text, rows, wall)
    drawn = plots.draw(rows, out, f"{machine['cpu']}, {machine['kvm'].split(' (')[0]}, {mode}")
    (out / MARKDOWN).write_text(table + "\n", encoding="utf-8")
    document = report.to_json(machine, mode, QUICK if args.quick else FULL, rows, wall, drawn)
    with open(out / JSON, "w", encoding="utf-8") as handle:
        json.dump(document, handle)
        handle.write("\n")

    print(table)
    print()
    print(f"table: {out / MARKDOWN}")
    print(f"raw samples and machine: {out / JSON}")
    if drawn["skipped"]:
        print(f"plots skipped: {drawn['skipped']}")
    else:
        print("plots: " + ", ".join(str(out / name) for name in drawn["files"]))
    return 0
