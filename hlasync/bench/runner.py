"""``python -m hlasync.bench [SUITE ...] [--quick] [--out DIR]``: one entry
point for every benchmark suite.

Suites (all by default, in this order):

- ``sandbox``: call latency, create, restore, interrupt (targets in the table);
- ``doorbell``: exit-less calls: the exit path, the doorbell and wasmtime side
  by side (call, host call, pool call, throughput, CPU per call, idle CPU);
- ``crashdump``: dump costs and sizes;
- ``supervisor``: pool call latency, throughput, watchdog timeouts;
- ``scaling``: supervisor throughput from 1 to all cores, threads and worker
  processes, beside the machine's ceiling (a table and a plot);
- ``ray``: the same pool through worker processes and through Ray actors
  (what crossing Ray costs per call, and calls/s with many in flight);
- ``channel``: the candidates for the supervisor-to-worker channel (pipes,
  a socketpair, shared-memory rings with eventfd wake-ups), round trip and
  batched rate;
- ``peers``: hlasync side by side with wasmtime, child processes, fork,
  gcore and in-process QuickJS (a table and plots).

Each suite writes ``<suite>.md`` (its table) and ``<suite>.json`` (every raw
sample and the machine) into ``--out`` (default ``benchmarks/results/``; the
peers' plots go to ``peers/`` there). ``--quick`` takes few samples, a smoke
test: it writes into a new temporary directory unless ``--out`` is given, so
it never replaces the committed figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import guests
from . import calls, fresh, hang, interrupt, javascript, plots, report, scale
from ._common import FULL, QUICK, Row, SuiteOutput, machine_description

DEFAULT_OUT = Path("benchmarks") / "results"
SUITES = ("sandbox", "doorbell", "crashdump", "supervisor", "scaling", "ray", "channel", "peers")
BACKENDS = ("asyncio", "trio")


def run_all(quick: bool, progress: bool = True) -> tuple[list[Row], float]:
    """The peers suite: every category, hlasync and its peers back to back."""
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
            print(f"  {name}: {time.perf_counter() - step:.1f} s", file=sys.stderr, flush=True)
    return rows, time.perf_counter() - started


def _peers(quick: bool, machine: dict[str, Any], backend: str, out: Path) -> SuiteOutput:
    del backend
    rows, wall = run_all(quick)
    mode = "quick" if quick else "full"
    mode_text = "quick (smoke test, not for quoting)" if quick else "full"
    table = report.render(machine, mode_text, rows, wall)
    folder = out / "peers"
    folder.mkdir(parents=True, exist_ok=True)
    drawn = plots.draw(rows, folder, f"{machine['cpu']}, {machine['kvm'].split(' (')[0]}, {mode}")
    document = report.to_json(machine, mode, QUICK if quick else FULL, rows, wall, drawn)
    if drawn["skipped"]:
        table += f"\n\nplots skipped: {drawn['skipped']}"
    return SuiteOutput(table, document, wall, [])


def _suite(name: str) -> Callable[[bool, dict[str, Any], str, Path], SuiteOutput]:
    if name == "peers":
        return _peers

    def run(quick: bool, machine: dict[str, Any], backend: str, out: Path) -> SuiteOutput:
        if name == "sandbox":
            from . import suite_sandbox as module
        elif name == "doorbell":
            from . import suite_doorbell as module  # type: ignore[no-redef]
        elif name == "ray":
            from . import suite_ray as module  # type: ignore[no-redef]
        elif name == "crashdump":
            from . import suite_crashdump as module  # type: ignore[no-redef]
        elif name == "supervisor":
            from . import suite_supervisor as module  # type: ignore[no-redef]
        elif name == "channel":
            from . import suite_channel as module  # type: ignore[no-redef]
        else:
            from . import suite_scaling as module  # type: ignore[no-redef]
        output = module.suite(quick, machine, backend)
        if name == "scaling":
            from .suite_scaling import plot

            skipped = plot(output.document, out / "scaling.png")
            output.markdown += f"\n\nplot skipped: {skipped}" if skipped else ""
        return output

    return run


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hlasync.bench",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="suites: " + ", ".join(SUITES),
    )
    parser.add_argument(
        "suites", nargs="*", metavar="SUITE", help="which suites (default: all of them)"
    )
    parser.add_argument("--quick", action="store_true", help="few samples: a smoke test")
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=f"where tables, JSON and plots go (default: {DEFAULT_OUT}/; "
        "with --quick a new temporary directory)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="asyncio",
        help="async library of the supervisor suites (default: asyncio)",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.suites if name not in SUITES]
    if unknown:
        parser.error(f"unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)}")
    chosen = [name for name in SUITES if name in args.suites] if args.suites else list(SUITES)
    out: Path = args.out or (
        Path(tempfile.mkdtemp(prefix="hlasync-bench-")) if args.quick else DEFAULT_OUT
    )
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    failed: list[str] = []
    for name in chosen:
        print(f"{name}:", file=sys.stderr, flush=True)
        output = _suite(name)(args.quick, machine, args.backend, out)
        table = out / (f"peers/{name}.md" if name == "peers" else f"{name}.md")
        document = out / (f"peers/{name}.json" if name == "peers" else f"{name}.json")
        table.write_text(output.markdown + "\n", encoding="utf-8")
        with open(document, "w", encoding="utf-8") as handle:
            json.dump(output.document, handle)
            handle.write("\n")
        print(f"\n## {name} ({output.seconds:.1f} s)\n")
        print(output.markdown)
        print(f"\ntable: {table}\nraw samples: {document}")
        failed += [f"{name}: {check}" for check in output.failed]
    if failed:
        print("failed checks: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0
