"""Watch a Supervisor's events while it runs a few guest calls.

Run it from a checkout (needs /dev/kvm)::

    python examples/subscriber.py

One task prints every event of a subscription; the main task runs calls on a
pool of the bundled ``simpleguest``: some that succeed, one that prints, one
that hangs and is stopped by its ``timeout`` (a core dump is written first),
and one that crashes (a core dump again). At the end it prints the
supervisor's statistics. Core dumps go to ``HYPERLIGHT_CORE_DUMP_DIR`` when
it is set, else to a temporary directory that is removed at the end.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from hlasync import GuestCrashed, GuestTimeout, SandboxConfig, guests
from hlasync import events as ev
from hlasync.supervisor import Supervisor


def describe(event: ev.Event) -> str:
    """One line per event: its type and the fields that matter most."""
    where = event.sandbox_id or "-"
    match event:
        case ev.SandboxCreated(guest=guest, pool=pool):
            detail = f"{Path(guest).name} in {pool or 'a dedicated sandbox'}"
        case ev.SandboxClosed():
            detail = ""
        case ev.CallStarted(function=function, call_id=call_id, queued=queued):
            detail = f"#{call_id} {function}() after {queued * 1e3:.2f} ms in the queue"
        case ev.CallCompleted(function=function, call_id=call_id, duration=duration):
            detail = f"#{call_id} {function}() in {duration * 1e3:.2f} ms"
        case ev.CallFailed(function=function, call_id=call_id, error=error):
            detail = f"#{call_id} {function}(): {type(error).__name__}"
        case ev.CallTimedOut(function=function, call_id=call_id, kind=kind, elapsed=elapsed):
            detail = f"#{call_id} {function}(): {kind} limit, ran {elapsed:.3f} s"
        case ev.GuestCrashed(function=function, vector_name=vector, symbol=symbol):
            detail = f"{function}(): {vector} in {symbol}"
        case ev.CrashDumpWritten(path=path, reason=reason, size=size, seconds=seconds):
            detail = f"{reason}: {path.name} ({size} bytes in {seconds * 1e3:.2f} ms)"
        case ev.CrashDumpFailed(reason=reason, error=error):
            detail = f"{reason}: {error}"
        case ev.GuestOutput(text=text, truncated=truncated):
            detail = repr(text) + (f" (+{truncated} bytes cut)" if truncated else "")
        case ev.SupervisorError(thread=thread, error=error):
            detail = f"in {thread}: {type(error).__name__}: {error} (the supervisor goes on)"
        case ev.EventsDropped(count=count):
            detail = f"{count} events lost by this subscriber"
        case _:
            detail = repr(event)
    return f"  event {type(event).__name__:<16} {where:<12} {detail}".rstrip()


async def print_events(stream: ev.EventStream) -> None:
    async for event in stream:  # ends when the subscription (or the supervisor) closes
        print(describe(event))


async def run(config: SandboxConfig) -> None:
    async with Supervisor(workers=2) as sup:
        async with sup.subscribe() as stream:  # no types: every event
            printer = asyncio.create_task(print_events(stream))
            pool = await sup.create_pool(guests.path("simpleguest"), size=2, config=config)

            print("add(2, 3) ->", await pool.call("add", 2, 3))
            print("fib(20)   ->", await pool.call("fib", 20))
            await pool.call("print_message", "hello from the guest\n")

            try:
                await pool.call("spin", timeout=0.3)  # loops forever: the watchdog stops it
            except GuestTimeout as exc:
                print(f"GuestTimeout: {exc.kind} limit, ran {exc.elapsed:.3f} s")
                print(f"  core dump of the hung guest: {exc.core_path}")

            try:
                await pool.call("divide_by_zero")
            except GuestCrashed as exc:
                print(f"GuestCrashed: {exc.vector_name} in {exc.symbol}")
                print(f"  core dump: {exc.core_path}")

            print("add(4, 5) ->", await pool.call("add", 4, 5), "(the pool restored its sandbox)")
            await asyncio.sleep(0.05)  # let the printer catch up before unsubscribing
        await printer  # the subscription closed: its iteration ended
        stats = sup.statistics()
    print("statistics:")
    for name, value in stats._asdict().items():
        print(f"  {name:<16} {value}")


def main() -> None:
    asyncio.run(run(SandboxConfig()))  # dumps: $HYPERLIGHT_CORE_DUMP_DIR, else the temp directory


if __name__ == "__main__":
    main()
