"""The front's slow operations (loading a guest, making and closing
sandboxes, dumps): each runs on a thread of its own, awaited from the loop,
so that a slow operation never holds up the loop or another operation."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

__all__ = ["run_operation"]

_T = TypeVar("_T")


async def run_operation(
    function: Callable[[], _T],
    *,
    spawn: Callable[[Callable[[], None]], None],
    on_loop: Callable[[Callable[[], None]], None],
    report: Callable[[BaseException], None],
    discard: Callable[[_T], object] | None = None,
) -> _T:
    """Run blocking ``function`` through ``spawn`` (a new ``hlasync-op-N``
    thread) and await it; ``on_loop`` wakes the awaiting task.

    The awaiting task may be cancelled at any time: it stops waiting, and
    ``discard`` is applied to a result that arrives afterwards (closing
    sandboxes nobody will receive); what ``discard`` raises goes to ``report``.
    """
    done = anyio.Event()
    guard = threading.Lock()
    outcome: list[tuple[bool, Any]] = []
    abandoned = False

    def work() -> None:
        try:
            result: tuple[bool, Any] = (True, function())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the loop
            result = (False, exc)
        with guard:
            outcome.append(result)
            drop = abandoned
        if drop:
            if result[0] and discard is not None:
                _discard(discard, result[1], report)
            return
        on_loop(done.set)

    spawn(work)
    try:
        await done.wait()
    except BaseException:
        with guard:
            abandoned = True
            arrived = outcome[0] if outcome else None
        if arrived is not None and arrived[0] and discard is not None:
            _discard(discard, arrived[1], report)
        raise
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def _discard(
    discard: Callable[[_T], object], value: _T, report: Callable[[BaseException], None]
) -> None:
    try:
        discard(value)
    except BaseException as exc:  # noqa: BLE001 - reported, never raised into a caller
        report(exc)
