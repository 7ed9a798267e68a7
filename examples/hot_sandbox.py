"""Hot sandboxes: calls, host calls and prints answered through shared memory,
with no VM exit.

Run it from a checkout (needs /dev/kvm)::

    python examples/hot_sandbox.py

By default (``SandboxConfig(spin="auto")``) a sandbox whose caller comes back
within ~200 µs keeps its guest spinning on a thread of the sandbox for a
moment after each call: the next call is posted on the doorbell page and
answered without an exit, and so are the host calls and prints it makes.
Calls that come now and then take the ordinary exit path and cost no CPU in
between. ``spin=0`` always takes the exit path; ``spin=seconds`` fixes the
spin (a sandbox called in bursts with longer pauses).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from hlasync import Sandbox, SandboxConfig, guests


def p50_us(function: Callable[[], object], n: int = 2000, per: int = 1) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter_ns()
        function()
        samples.append((time.perf_counter_ns() - start) / per)
    return statistics.median(samples) / 1000


def main() -> None:
    guest = guests.path("simpleguest")
    with Sandbox(guest, SandboxConfig(spin=0)) as exit_path, Sandbox(guest) as auto:
        for sb in (exit_path, auto):
            sb.register_host_function("twice", lambda x: 2 * x)
            sb.call("add", 0, 0)

        cold = p50_us(lambda: exit_path.call("add", 1, 2))
        hot = p50_us(lambda: auto.call("add", 1, 2))
        print(f"add, exit path (spin=0):      p50 {cold:6.1f} us (one KVM_RUN per call)")
        print(f"add, default (spin='auto'):   p50 {hot:6.1f} us (posted on the doorbell)")

        def host_calls(sb: Sandbox) -> float:  # the guest calls twice() 50 times per call
            return p50_us(lambda: sb.call("call_host_times", "twice", 50), n=200, per=50)

        print(f"host call, exit path:         {host_calls(exit_path):6.1f} us each")
        print(f"host call, default:           {host_calls(auto):6.1f} us each (no exit)")

        # State carries over as with any sandbox; operations park the guest first.
        print("increment x3 ->", [auto.call("increment") for _ in range(3)])
        auto.restore()
        print("after restore(): increment ->", auto.call("increment"))

        # Calls 5 ms apart: auto does not spin between them (no CPU used).
        sparse = []
        for i in range(5):
            time.sleep(0.005)
            sparse.append(auto.call("add", i, 1))
        print("sparse calls ->", sparse, "(the exit path, nothing spinning in between)")


if __name__ == "__main__":
    main()
