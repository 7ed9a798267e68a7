"""A hung JavaScript handler under the Supervisor: stopped at its deadline,
with a core dump and its JavaScript stack.

Run it from a checkout (needs /dev/kvm)::

    python examples/js_hang_capture.py

A pool of JS sandboxes serves calls; one handler loops forever on some
inputs. The watchdog asks the engine where it is, writes a core dump (gdb
and lldb show the engine's C frames, ``hlasync dump show`` also prints the
JavaScript stack) and stops it; the caller gets ``GuestTimeout`` with
``js_stack``; the pool goes on serving.
"""

from __future__ import annotations

import subprocess
import sys

import anyio

from hlasync import GuestTimeout, Supervisor
from hlasync import events as ev
from hlasync.js import default_config

COLLATZ = """
function steps(n) {
  let count = 0;
  while (n !== 1) {            // never ends for n <= 0
    n = n % 2 ? 3 * n + 1 : n / 2;
    count += 1;
  }
  return count;
}

function handler(event) {
  return { n: event.n, steps: steps(event.n) };
}
"""


async def run() -> None:
    async with Supervisor(workers=2) as sup, sup.subscribe(ev.CallTimedOut) as timeouts:
        pool = await sup.create_js_pool(
            {"collatz": COLLATZ}, size=2, heap_size=8 << 20, config=default_config(8 << 20)
        )
        print("collatz(27) ->", await pool.call_handler("collatz", {"n": 27}, timeout=1.0))
        try:
            await pool.call_handler("collatz", {"n": 0}, timeout=0.3)
        except GuestTimeout as exc:
            print(f"GuestTimeout after {exc.elapsed:.2f} s; JavaScript stack at the deadline:")
            for line in (exc.js_stack or "(unavailable)").splitlines():
                print("  " + line.strip())
            print(f"core dump: {exc.core_path}")
            event = await timeouts.receive()
            assert isinstance(event, ev.CallTimedOut)
            print(
                f"CallTimedOut event: {event.kind} limit, js_stack recorded: {bool(event.js_stack)}"
            )
            if exc.core_path is not None:
                shown = subprocess.run(
                    [sys.executable, "-m", "hlasync", "dump", "show", str(exc.core_path)],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                print("hlasync dump show (first lines):")
                for line in shown.stdout.splitlines()[:16]:
                    print("  " + line)
        print("collatz(7) ->", await pool.call_handler("collatz", {"n": 7}, timeout=1.0))


def main() -> None:
    anyio.run(run)  # dumps go to $HYPERLIGHT_CORE_DUMP_DIR, else the temp directory


if __name__ == "__main__":
    main()
