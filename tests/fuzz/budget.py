"""Time and memory of one parse, for the fuzz tests' budgets and the
worst-case table (``python -m tests.fuzz.worst_cases``)."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["SECONDS", "Measured", "measure", "memory_budget"]

#: Seconds any one input may take to parse (the largest fuzzed inputs take
#: milliseconds; a non-linear parser takes seconds to hours).
SECONDS = 0.5


def memory_budget(size: int) -> int:
    """Bytes a parse of ``size`` bytes may allocate at its peak: what it
    returns (Python objects are tens of bytes each) and room to build it."""
    return 64 * size + (1 << 20)


@dataclass(frozen=True, slots=True)
class Measured:
    """What one parse gave (its value, or the exception it raised), how long
    it took and the peak of the memory it allocated (tracemalloc)."""

    outcome: object
    seconds: float
    peak: int


def measure(parse: Callable[[], object]) -> Measured:
    """Run ``parse`` timed, then under tracemalloc (which slows it). A run over
    :data:`SECONDS` is timed again and the faster counts: a machine that stalls
    once is not a parser that is slow."""
    seconds = _timed(parse)
    if seconds >= SECONDS:
        seconds = min(seconds, _timed(parse))
    tracemalloc.start()
    try:
        outcome = _outcome(parse)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return Measured(outcome, seconds, peak)


def _timed(parse: Callable[[], object]) -> float:
    started = time.perf_counter()
    _outcome(parse)
    return time.perf_counter() - started


def _outcome(parse: Callable[[], object]) -> object:
    try:
        return parse()
    except Exception as exc:  # noqa: BLE001 - the caller judges what was raised
        return exc
