"""hlasync's benchmarks: one entry point for every suite.

Usage::

    python -m hlasync.bench [SUITE ...] [--quick] [--out DIR] [--backend asyncio|trio]

Suites: ``sandbox``, ``crashdump``, ``supervisor``, ``scaling`` (supervisor
throughput from 1 to all cores, threads and worker processes) and ``peers``
(hlasync next to wasmtime, a long-lived child process answering over a pipe,
``os.fork()``, ``SIGKILL`` of a child, ``gcore`` of a hung native process and
in-process QuickJS). Each writes a markdown table and a JSON file with every
raw sample and the machine description (the scaling and peers suites also
PNG plots) into ``--out`` (default ``benchmarks/results/``; ``--quick`` runs
write into a new temporary directory). Peers that are not installed are
reported as skipped with the reason. See ``docs/benchmarks.md``.

This package is not imported by ``hlasync`` itself; wasmtime and matplotlib
are optional (the ``bench`` extra).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks (see ``python -m hlasync.bench --help``)."""
    from .runner import main as run_main

    return run_main(argv)
