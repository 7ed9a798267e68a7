"""Hot sandboxes: calls answered through shared memory, with no VM exit.

Run it from a checkout (needs /dev/kvm)::

    python examples/hot_sandbox.py

``SandboxConfig(spin=seconds)`` keeps the guest's dispatcher spinning on a
thread of the sandbox for that long after each call. A call that comes
meanwhile is posted on the doorbell page and answered without an exit; once
the spin is over the sandbox parks (no CPU used) and its next call takes the
ordinary path, after which it is hot again.
"""

from __future__ import annotations

import statistics
import time

from hlasync import Sandbox, SandboxConfig, guests


def p50_us(sb: Sandbox, n: int = 2000) -> float:
    samples = []
    for i in range(n):
        start = time.perf_counter_ns()
        assert sb.call("add", i, 1) == i + 1
        samples.append(time.perf_counter_ns() - start)
    return statistics.median(samples) / 1000


def main() -> None:
    guest = guests.path("simpleguest")
    with Sandbox(guest) as cold, Sandbox(guest, SandboxConfig(spin=0.05)) as hot:
        cold.call("add", 0, 0)
        hot.call("add", 0, 0)
        exit_path, doorbell = p50_us(cold), p50_us(hot)
        print(f"add, exit path:  p50 {exit_path:6.1f} us (one KVM_RUN per call)")
        print(f"add, hot:        p50 {doorbell:6.1f} us (posted on the doorbell, no exit)")
        print(f"the hot sandbox answers {exit_path / doorbell:.1f}x faster")

        # State carries over as with any sandbox; operations park the guest first.
        print("increment x3 ->", [hot.call("increment") for _ in range(3)])
        hot.restore()
        print("after restore(): increment ->", hot.call("increment"))

        time.sleep(0.1)  # longer than the spin: the guest parked, no CPU used
        print("after a pause: add(2, 3) ->", hot.call("add", 2, 3), "(cold once, then hot)")


if __name__ == "__main__":
    main()
