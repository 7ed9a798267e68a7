"""Child-process peers: a long-lived worker answering over pipes, a runaway
Python child, and a tiny native program that hangs in ``spin()``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ._common import BenchError

#: A worker that reads ``"a b\\n"`` lines from stdin and answers ``"a+b\\n"``.
PIPE_WORKER = """
import sys
out = sys.stdout.buffer
for line in sys.stdin.buffer:
    a, b = line.split()
    out.write(b"%d\\n" % (int(a) + int(b)))
    out.flush()
"""

#: A Python worker that says it is ready, then loops forever.
RUNAWAY = """
import sys
sys.stdout.write("ready\\n")
sys.stdout.flush()
while True:
    pass
"""

#: Native code equivalent to the guest's ``spin()``: an infinite loop in a
#: function named ``spin``, entered once the program has said it is ready.
SPIN_C = r"""
#include <stdio.h>

__attribute__((noinline)) void spin(void) {
    for (;;)
        __asm__ volatile("pause");  /* as the guest's spin() */
}

int main(void) {
    fputs("ready\n", stdout);
    fflush(stdout);
    spin();
    return 0;
}
"""

READY = b"ready\n"


class PipeWorker:
    """A long-lived ``python -c`` child answering one request per line."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PIPE_WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()

    def add(self, a: int, b: int) -> int:
        """One request and its response: a write and a read on two pipes."""
        os.write(self._in, b"%d %d\n" % (a, b))
        reply = os.read(self._out, 64)
        if not reply.endswith(b"\n"):
            raise BenchError(f"pipe worker answered {reply!r}")
        return int(reply)

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start_ready(command: list[str], timeout: float = 30.0) -> subprocess.Popen[bytes]:
    """Start ``command`` and wait until it prints ``ready``."""
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != READY:
        proc.kill()
        proc.wait(timeout)
        raise BenchError(f"{command[0]} did not say ready (got {line!r})")
    return proc


def reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill (if needed) and wait for a child started by :func:`start_ready`."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def build_spin(directory: Path, gcc: str) -> Path:
    """Compile :data:`SPIN_C` with debug info into ``directory``."""
    source = directory / "spin.c"
    binary = directory / "spin"
    source.write_text(SPIN_C, encoding="utf-8")
    proc = subprocess.run(
        [gcc, "-O1", "-g", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise BenchError(f"gcc failed to build spin.c:\n{proc.stderr}")
    return binary
