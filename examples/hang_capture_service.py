"""A tiny HTTP service that runs guest calls with timeouts and captures hangs.

Run it from a checkout (needs /dev/kvm)::

    python examples/hang_capture_service.py              # serves on a free port of 127.0.0.1
    python examples/hang_capture_service.py --port 8080
    python examples/hang_capture_service.py --self-test  # start, query itself, exit

then, for example::

    curl 'http://127.0.0.1:8080/add?a=1&b=2'   # 200 {"result": 3}
    curl 'http://127.0.0.1:8080/fib?n=20'      # 200 {"result": 6765}
    curl 'http://127.0.0.1:8080/fib?n=60'      # 504: fib(60) runs for ages, the watchdog stops it
    curl 'http://127.0.0.1:8080/hang'          # 504 with the core dump of the hung guest
    curl 'http://127.0.0.1:8080/crash'         # 500 with the core dump of the crash
    curl 'http://127.0.0.1:8080/stats'         # the supervisor's statistics
    hlasync dump-all <pid>                     # dump every sandbox now, running or idle

Only the standard library serves HTTP (``asyncio.start_server`` and a request
line parsed by hand); every guest call runs on a vCPU thread of a
:class:`~hlasync.supervisor.Supervisor`, so the event loop keeps serving while
guests run or hang. Each route has a ``timeout``: when it expires the guest is
dumped and stopped, the sandbox restored, and the client gets 504 with the
path of the dump. A background task logs every ``CrashDumpWritten`` and
``CallTimedOut`` event.

Core dumps go to ``HYPERLIGHT_CORE_DUMP_DIR`` (else the temp directory), where
only the newest 50 ``hl_core_*.elf`` files are kept. ``--self-test`` without
``HYPERLIGHT_CORE_DUMP_DIR`` writes them to a new temporary directory of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Mapping
from urllib.parse import parse_qs, urlsplit

from hlasync import (
    ArgumentError,
    GuestCrashed,
    GuestError,
    GuestTimeout,
    RetentionPolicy,
    SandboxConfig,
    SupervisorBusy,
    SupervisorClosed,
    guests,
    install_dump_signal,
)
from hlasync import events as ev
from hlasync.abi import Arg, Value
from hlasync.supervisor import Pool, Supervisor

log = logging.getLogger("hang_capture_service")

HOST = "127.0.0.1"
#: Longest a call may wait for a vCPU and run, in total (the per-call ``timeout``
#: covers only the time it runs).
TOTAL_DEADLINE = 10.0
#: Longest a client may take to send its request head.
READ_DEADLINE = 5.0
MAX_HEADERS = 100
INT64 = 1 << 63

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class BadRequest(Exception):
    """The request cannot be served as sent (400)."""


@dataclasses.dataclass(frozen=True)
class Route:
    """A guest function behind a URL path, with its parameters and time limit."""

    function: str
    params: tuple[tuple[str, int, int], ...]  # (name, lowest, highest) of each int argument
    timeout: float  # seconds the call may run on its vCPU


ROUTES = {
    "/add": Route("add", (("a", -INT64, INT64 - 1), ("b", -INT64, INT64 - 1)), timeout=1.0),
    "/fib": Route("fib", (("n", 0, 92),), timeout=2.0),  # fib(92) is the largest int64 result
    "/hang": Route("spin", (), timeout=0.5),  # loops forever: always times out
    "/crash": Route("divide_by_zero", (), timeout=1.0),
}


def int_param(query: Mapping[str, list[str]], name: str, lowest: int, highest: int) -> int:
    values = query.get(name)
    if not values or len(values) != 1:
        raise BadRequest(f"give exactly one {name}=<int>")
    try:
        value = int(values[0])
    except ValueError:
        raise BadRequest(f"{name} must be an int, got {values[0]!r}") from None
    if not lowest <= value <= highest:
        raise BadRequest(f"{name} must be between {lowest} and {highest}")
    return value


class Service:
    def __init__(self, supervisor: Supervisor, pool: Pool) -> None:
        self.supervisor = supervisor
        self.pool = pool

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: one request, one response, then close."""
        try:
            method, target = "-", "-"
            try:
                async with asyncio.timeout(READ_DEADLINE):
                    method, target = await read_request_head(reader)
                status, body = await self.respond(method, target)
            except BadRequest as exc:
                status, body = 400, {"error": str(exc)}
            except TimeoutError:
                return  # the client did not send a request in time: just close
            log.info("%s %s -> %d", method, target, status)
            payload = json.dumps(body).encode() + b"\n"
            head = (
                f"HTTP/1.1 {status} {REASONS[status]}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode("ascii") + payload)
            await writer.drain()
        except ConnectionError:
            pass  # the client went away
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def respond(self, method: str, target: str) -> tuple[int, dict[str, object]]:
        if method != "GET":
            return 405, {"error": "only GET is served"}
        url = urlsplit(target)
        if url.path == "/stats":
            return 200, self.supervisor.statistics()._asdict()
        route = ROUTES.get(url.path)
        if route is None:
            return 404, {"error": f"no route {url.path}", "routes": [*ROUTES, "/stats"]}
        query = parse_qs(url.query)
        args: list[Arg] = [int_param(query, *param) for param in route.params]
        return await self.run(route, args)

    async def run(self, route: Route, args: list[Arg]) -> tuple[int, dict[str, object]]:
        """Run the guest call, mapping its outcome to an HTTP status."""
        try:
            pending = self.pool.call_nowait(route.function, *args, timeout=route.timeout)
        except SupervisorBusy:  # max_pending calls are already in: shed load
            return 503, {"error": "too many calls pending, try again later"}
        except SupervisorClosed:
            return 503, {"error": "shutting down"}
        except ArgumentError as exc:
            return 400, {"error": str(exc)}
        try:
            # Cancelling the wait (deadline, client gone, shutdown) stops the guest too.
            async with asyncio.timeout(TOTAL_DEADLINE):
                result: Value = await pending
        except GuestTimeout as exc:
            return 504, {
                "error": f"{route.function} ran longer than {exc.limit:g} s and was stopped",
                "kind": exc.kind,
                "elapsed": round(exc.elapsed, 3),
                "core_path": str(exc.core_path) if exc.core_path else None,
            }
        except GuestCrashed as exc:
            return 500, {
                "error": f"guest crashed: {exc.vector_name} in {exc.symbol}",
                "core_path": str(exc.core_path) if exc.core_path else None,
            }
        except GuestError as exc:
            return 500, {"error": str(exc)}
        except SupervisorClosed:  # still queued when the supervisor shut down
            return 503, {"error": "shutting down"}
        except TimeoutError:
            return 503, {"error": f"no answer within {TOTAL_DEADLINE:g} s"}
        return 200, {"result": result}


async def read_request_head(reader: asyncio.StreamReader) -> tuple[str, str]:
    """(method, target) of ``METHOD /path?query HTTP/1.x``; the headers are skipped."""
    try:
        line = await reader.readline()
        parts = line.decode("ascii").split()
        for _ in range(MAX_HEADERS):
            header = await reader.readline()
            if header in (b"\r\n", b"\n", b""):
                break
        else:
            raise BadRequest("too many headers")
    except (ValueError, UnicodeDecodeError):  # over the line limit, or not ASCII
        raise BadRequest("malformed request") from None
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise BadRequest("expected: GET /path?query HTTP/1.1")
    return parts[0], parts[1]


class EventLog:
    """Logs crash dumps and timeouts as the supervisor reports them."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    async def run(self, subscription: ev.Subscription) -> None:
        async with subscription as events:
            async for event in events:  # ends when the supervisor shuts down
                match event:
                    case ev.CrashDumpWritten():
                        log.warning(
                            "core dump (%s) of sandbox %s, %s: %s",
                            event.reason,
                            event.sandbox_id,
                            f"in {event.function}()" if event.function else "idle",
                            event.path,
                        )
                    case ev.CallTimedOut():
                        log.warning(
                            "call %d %s() timed out (%s limit) after %.3f s; dump %s",
                            event.call_id,
                            event.function,
                            event.kind,
                            event.elapsed,
                            event.core_path,
                        )
                    case ev.EventsDropped():
                        log.warning("the event log lost %d events", event.count)
                self.counts[type(event).__name__] += 1


async def self_test(port: int, events: EventLog) -> bool:
    """Query the service over 127.0.0.1 and print what it answers."""
    expected = {
        "/add?a=1&b=2": 200,
        "/fib?n=20": 200,
        "/hang": 504,
        "/crash": 500,
        "/add?a=1": 400,
        "/nowhere": 404,
        "/stats": 200,
    }
    ok = True
    for path, status in expected.items():
        got, body = await http_get(port, path)
        print(f"GET {path} -> {got} {body}")
        ok = ok and got == status
    # The event log has seen the timeout and both dumps by now (or very soon).
    async with asyncio.timeout(5):
        while events.counts["CallTimedOut"] < 1 or events.counts["CrashDumpWritten"] < 2:
            await asyncio.sleep(0.01)
    print(f"event log: {dict(events.counts)}")
    return ok


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body.decode().strip()


async def main_async(port: int, run_self_test: bool, config: SandboxConfig) -> int:
    events = EventLog()
    # The event log ends when the supervisor shuts down, so the task group outlives it.
    async with (
        asyncio.TaskGroup() as tasks,
        Supervisor(workers=2, max_pending=100, shutdown_grace=2.0) as sup,
    ):
        # Subscribed now, before any call, so that no event is missed.
        subscription = sup.subscribe(ev.CrashDumpWritten, ev.CallTimedOut)
        tasks.create_task(events.run(subscription))
        pool = await sup.create_pool(guests.path("simpleguest"), size=4, config=config)
        server = await asyncio.start_server(Service(sup, pool).handle, HOST, port)
        chosen = server.sockets[0].getsockname()[1]
        print(f"serving on http://{HOST}:{chosen}/", flush=True)
        async with server:  # serving from here on
            if run_self_test:
                return 0 if await self_test(chosen, events) else 1
            stop = asyncio.Event()  # SIGTERM shuts down cleanly (Ctrl-C does too)
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()
            log.info("shutting down")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="HTTP service running guest calls with timeouts")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default 0: any free port)")
    parser.add_argument(
        "--self-test", action="store_true", help="start, send a few requests to itself, exit"
    )
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # `hlasync dump-all <pid>` (SIGUSR2) dumps every sandbox, running or idle, on demand.
    install_dump_signal(signal.SIGUSR2)
    # Keep the newest 50 dumps: a client hitting /hang in a loop must not fill the disk.
    config = SandboxConfig(crashdump_retention=RetentionPolicy(max_files=50))
    if options.self_test and not os.environ.get("HYPERLIGHT_CORE_DUMP_DIR"):
        # A self-test keeps its dumps (the answers name them) in a directory of
        # its own, where retention prunes no one else's.
        dumps = tempfile.mkdtemp(prefix="hlasync-service-")
        config = dataclasses.replace(config, crashdump_dir=dumps)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main_async(options.port, options.self_test, config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
