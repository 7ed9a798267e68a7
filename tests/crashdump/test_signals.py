"""install_dump_signal + `hlasync dump-all PID`: hang capture in a live process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hlasync import CoreDump
from hlasync.kvm import Kvm

ROOT = Path(__file__).resolve().parents[2]

SERVICE = textwrap.dedent(
    """
    import signal, sys, threading, time
    import hlasync
    from hlasync import Sandbox, guests, GuestCancelled

    hlasync.install_dump_signal(signal.SIGUSR2)
    busy, idle = Sandbox(guests.path("simpleguest")), Sandbox(guests.path("simpleguest"))
    idle.call("write_sentinel", "idle one")
    outcome = []

    def hang():
        try:
            busy.call("spin")
        except GuestCancelled:
            outcome.append("cancelled")

    worker = threading.Thread(target=hang)
    worker.start()
    while busy.state.value != "running":
        time.sleep(0.001)
    print("ready", flush=True)
    sys.stdin.readline()          # the test dumps us meanwhile
    assert busy.state.value == "running", busy.state   # the hung call survived the dump
    busy.interrupt()
    worker.join()
    print("done", outcome, idle.call("add", 1, 2), flush=True)
    """
)


def test_dump_all_dumps_running_and_idle_sandboxes(kvm: Kvm, tmp_path: Path) -> None:
    dumps = tmp_path / "service-dumps"
    dumps.mkdir()
    env = {**os.environ, "HYPERLIGHT_CORE_DUMP_DIR": str(dumps)}
    service = subprocess.Popen(
        [sys.executable, "-c", SERVICE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert service.stdout is not None and service.stdin is not None
        assert service.stdout.readline().strip() == "ready"
        result = subprocess.run(
            [sys.executable, "-m", "hlasync", "dump-all", str(service.pid), "--timeout", "20"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        paths = [Path(line) for line in result.stdout.split()]
        assert len(paths) == 2
        functions = set()
        for path in paths:
            assert path.parent == dumps and path.is_file()
            with CoreDump.open(path) as dump:
                assert dump.metadata["reason"] == "signal"
                assert dump.metadata["pid"] == service.pid
                functions.add(dump.metadata["function"])
                if dump.metadata["function"] == "spin":
                    assert (dump.backtrace()[0].symbol or "").startswith("spin")
        assert functions == {"spin", None}
        service.stdin.write("\n")
        service.stdin.flush()
        out, err = service.communicate(timeout=30)
        assert service.returncode == 0, err
        assert "done ['cancelled'] 3" in out
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()


def test_dump_all_reports_a_process_without_the_handler(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGUSR2, "
            "signal.SIG_IGN); print('ok', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sleeper.stdout is not None and sleeper.stdout.readline().strip() == "ok"
        result = subprocess.run(
            [sys.executable, "-m", "hlasync", "dump-all", str(sleeper.pid), "--timeout", "1"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1
        assert "install_dump_signal" in result.stderr
    finally:
        sleeper.kill()
        sleeper.wait()


def test_install_dump_signal_checks_its_arguments() -> None:
    import hlasync
    from hlasync.kvm import KICK_SIGNAL

    with pytest.raises(ValueError, match="reserved"):
        hlasync.install_dump_signal(KICK_SIGNAL)
