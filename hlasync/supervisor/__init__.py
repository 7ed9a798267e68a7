"""Async supervisor: sandboxes on dedicated vCPU threads, pools, watchdogs,
crash dumps of hung guests, and event streams.

The parts, one module each:

- ``core``: :class:`Supervisor`, the front on the event loop: checks and
  queues calls, awaits outcomes, creates and closes targets, statistics.
  With it: ``front`` (what its backend sees of it), ``making`` (making
  targets), ``operations`` (slow operations on threads), ``settings``
  (checks and defaults) and ``stats`` (:class:`SupervisorStatistics`).
- ``targets``: :class:`Pool`, :class:`JSPool`, :class:`SupervisedSandbox` and
  :class:`PendingCall`: where calls go.
- ``backend``: the protocols between the front and its backends: ``threads``
  (the worker host in this process), ``processes`` (worker processes, with
  its ``proc_*`` parts and ``worker``, ``channel``, ``messages``), and
  ``hlasync.ray``.
- ``host``: the worker host: sandboxes, vCPU threads, the scheduler queue,
  restores and replacements, expiries; ``outcomes``: the events it publishes.
- ``watchdog``: the thread that notices calls past their limits.
- ``jobs``: one call from submission to completion.
- ``loop``: the hand-over to the event loop (one wake-up per batch).
- ``hub``: event subscriptions and delivery.
- ``hostcalls``: host functions under the supervisor (``async def`` on the loop).
- ``creation``: making the sandboxes of a target (plain and JavaScript);
  ``specs``: what a target is made of.
"""

from __future__ import annotations

from .core import Supervisor, SupervisorStatistics
from .host import STOP_TIMEOUT
from .loop import loop_waker
from .targets import JSPool, PendingCall, Pool, SupervisedSandbox

__all__ = [
    "STOP_TIMEOUT",
    "JSPool",
    "PendingCall",
    "Pool",
    "SupervisedSandbox",
    "Supervisor",
    "SupervisorStatistics",
    "loop_waker",
]
