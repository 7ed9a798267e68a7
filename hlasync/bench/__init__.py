"""Side-by-side benchmarks of hlasync against what users would pick instead.

Usage::

    python -m hlasync.bench [--quick] [--out DIR]

Measures, in one run on this machine, hlasync next to its peers: wasmtime
(a WebAssembly runtime), a long-lived child process answering over a pipe,
``os.fork()``, ``SIGKILL`` of a child process and ``gcore`` of a hung native
process. Writes a markdown table, a JSON file with every raw sample and the
machine description, and PNG plots into ``--out`` (default
``benchmarks/results/peers/``). Peers that are not installed are reported as
skipped with the reason. See ``docs/benchmarks.md``.

This package is not imported by ``hlasync`` itself; wasmtime and matplotlib
are optional (the ``bench`` extra).
"""

from __future__ import annotations

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks (see ``python -m hlasync.bench --help``)."""
    from .runner import main as run_main

    return run_main(argv)
