"""Crash dumps: automatic on a fault, on demand while a call runs, read back.

Run: python examples/crash_dumps.py
"""

from __future__ import annotations

import threading
import time

from hlasync import CoreDump, GuestCrashed, Sandbox, SandboxState, guests


def main() -> None:
    guest = guests.path("simpleguest")
    # Dumps go to $HYPERLIGHT_CORE_DUMP_DIR, else the temp directory, and stay there.
    with Sandbox(guest) as sb:
        # 1. A fault writes a dump automatically; the exception says where.
        try:
            sb.call("null_pointer_write")
        except GuestCrashed as exc:
            print(f"{exc.vector_name} in {exc.symbol}; core dump: {exc.core_path}")
            assert exc.core_path is not None
            with CoreDump.open(exc.core_path) as dump:
                print(dump.report())
        sb.restore()

        # 2. A dump of a call that is still running, taken from another thread.
        result: list[object] = []
        worker = threading.Thread(target=lambda: result.append(sb.call("spin_for", 10**9)))
        worker.start()
        while sb.state is not SandboxState.RUNNING:
            time.sleep(0.001)
        time.sleep(0.05)  # let the guest get going
        path = sb.generate_crashdump()
        worker.join()
        with CoreDump.open(path) as dump:
            frames = ", ".join(frame.symbol or hex(frame.pc) for frame in dump.backtrace())
        print(f"mid-call dump {path.name}: {frames}")
        print(f"...and the call still returned {result[0]}")
        print(f"open it with: gdb {guest} {path}")


if __name__ == "__main__":
    main()
