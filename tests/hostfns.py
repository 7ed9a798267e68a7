"""Host functions given to supervisors as importable references
("tests.hostfns:NAME"): they run where the sandbox is, in a worker process too."""

from __future__ import annotations

import os
import threading


def pinned_cpu(x: int) -> int:
    """The one CPU the calling thread may run on, or -1; plus ``x`` * 1000."""
    cpus = os.sched_getaffinity(threading.get_native_id())
    return x * 1000 + (next(iter(cpus)) if len(cpus) == 1 else -1)


def process_id(x: int) -> int:
    return os.getpid() + 0 * x


async def not_allowed(x: int) -> int:  # an async reference is refused
    return x


def crash_worker(x: int) -> int:
    """Kill the process this runs in with SIGSEGV (a worker that crashes)."""
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)
    return x


def current_trace(text: str) -> str:
    """The trace and span id of the span current where this runs (a worker
    process too), as ``TRACE/SPAN`` in hex."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}/{context.span_id:016x}"


def hot_budget_slots(x: int) -> int:
    """The slots of this process's hot budget if it shares them through a spin
    board (a worker process), else -1; plus ``x`` * 1000."""
    from hlasync.sandbox.hot import budget

    return x * 1000 + (budget.slots if budget._board is not None else -1)


#: Thread groups and policy bits of :func:`thread_policies`.
POLICY_GROUPS = ("MainThread", "hlasync-vcpu", "hlasync-owner", "hlasync-watchdog")
POLICY_BITS = {"other": 1, "batch": 2, "idle": 4}


def thread_policies(x: int) -> int:
    """The scheduling policies of this process's threads of each group of
    :data:`POLICY_GROUPS` (a thread's name starts with it), one octal digit
    per group (first group lowest) whose bits are :data:`POLICY_BITS`; plus
    ``x`` shifted past them."""
    names = {os.SCHED_OTHER: "other", os.SCHED_BATCH: "batch", os.SCHED_IDLE: "idle"}
    digits = [0] * len(POLICY_GROUPS)
    for thread in threading.enumerate():
        for index, group in enumerate(POLICY_GROUPS):
            if thread.name.startswith(group) and thread.native_id is not None:
                policy = names.get(os.sched_getscheduler(thread.native_id), "other")
                digits[index] |= POLICY_BITS[policy]
    value: int = x << 3 * len(POLICY_GROUPS)
    for index, digit in enumerate(digits):
        value += digit << 3 * index
    return value
