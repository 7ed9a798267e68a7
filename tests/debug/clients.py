"""Real debuggers against a live sandbox: a call runs on a thread while gdb
(batch or MI) or lldb (``gdb-remote``) attaches to its stub."""

from __future__ import annotations

import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import require_tool

#: Bound on any one debugger run (they take well under a second here).
TIMEOUT = 60.0


@dataclass
class Outcome:
    """A call run on a thread: its result, or what it raised."""

    thread: threading.Thread | None = None
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def wait(self, timeout: float = TIMEOUT) -> Any:
        assert self.done.wait(timeout), "the call did not end"
        if self.error is not None:
            raise self.error
        return self.result


def in_thread(call: Callable[[], Any]) -> Outcome:
    outcome = Outcome()

    def run() -> None:
        try:
            outcome.result = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.error = exc
        finally:
            outcome.done.set()

    outcome.thread = threading.Thread(target=run, daemon=True)
    outcome.thread.start()
    return outcome


def free_port() -> int:
    """A loopback port free now (for a stub whose address the test must know
    before the sandbox exists: the CLI's, a worker process's)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def debug_cli(port: int, *args: str) -> subprocess.Popen[str]:
    """``python -m hlasync debug ARGS --port PORT`` as a user runs it, from
    the repository root, with its output captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "hlasync", "debug", *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )


class Batch:
    """A debugger run in batch mode, in the background: :meth:`output` waits
    for it to end (a final ``continue`` ends when the sandbox closes)."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def output(self, timeout: float = TIMEOUT) -> str:
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
            raise AssertionError(f"the debugger did not end:\n{out}") from None
        return out


def gdb_batch(address: tuple[str, int], *commands: str, guest: str | None = None) -> Batch:
    """gdb -batch: attach to ``address`` and run ``commands``."""
    args = [require_tool("gdb"), "-nx", "-batch"]
    if guest is not None:
        args.append(guest)
    for command in (f"target remote {address[0]}:{address[1]}", *commands):
        args += ["-ex", command]
    return Batch(args)


def lldb_batch(guest: str, address: tuple[str, int], *commands: str) -> Batch:
    """lldb --batch: load ``guest``, attach with gdb-remote, run ``commands``."""
    args = [require_tool("lldb"), "--no-lldbinit", "--batch", guest]
    for command in (f"gdb-remote {address[0]}:{address[1]}", *commands):
        args += ["-o", command]
    return Batch(args)


class GdbMI:
    """gdb's machine interface, driven line by line (``mi-async on``, so a
    running target takes ``-exec-interrupt``)."""

    def __init__(self) -> None:
        gdb = require_tool("gdb")
        self.process = subprocess.Popen(
            [gdb, "-nx", "--interpreter=mi3"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.until("(gdb)")

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def until(self, *prefixes: str, timeout: float = 20.0) -> str:
        """The first output line starting with one of ``prefixes``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            self.seen.append(line)
            if line.startswith(prefixes):
                return line
        raise AssertionError(f"no line starting with {prefixes} in:\n" + "\n".join(self.seen))

    def command(self, command: str, *prefixes: str) -> str:
        self.send(command)
        return self.until(*(prefixes or ("^done", "^error", "^connected", "^running")))

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send("-gdb-exit")
                self.process.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait(5)
