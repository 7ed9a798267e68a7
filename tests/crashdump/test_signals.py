"""install_dump_signal + `hlasync dump-all PID`: hang capture in a live process."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
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
    temp = tmp_path / "service-temp"
    temp.mkdir()
    env = {**os.environ, "HYPERLIGHT_CORE_DUMP_DIR": str(dumps), "TMPDIR": str(temp)}
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
        # The list of dumps went to a private directory in the service's temp directory.
        private = temp / f"hlasync-{os.geteuid()}"
        assert os.listdir(temp) == [private.name]
        st = private.lstat()
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.geteuid()
        assert os.listdir(private) == [f"dump-all-{service.pid}.json"]
        service.stdin.write("\n")
        service.stdin.flush()
        out, err = service.communicate(timeout=30)
        assert service.returncode == 0, err
        assert "done ['cancelled'] 3" in out
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()


#: A process that only installed the dump signal: no sandboxes, so no KVM needed.
LISTENER = textwrap.dedent(
    """
    import logging, signal, sys, threading, hlasync
    logging.basicConfig()
    hlasync.install_dump_signal(signal.SIGUSR2)
    print("ready", flush=True)
    sys.stdin.readline()
    for thread in threading.enumerate():
        if thread.name == "hlasync-dump-all":
            thread.join()  # let a dump-all in progress finish (and log) before exiting
    """
)


def _dump_all(pid: int, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hlasync", "dump-all", str(pid), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


@contextlib.contextmanager
def _process(code: str, temp: Path) -> Iterator[subprocess.Popen[str]]:
    """``python -c code`` with its own temp directory, once it printed "ready"."""
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(temp)},
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        yield child
    finally:
        child.kill()
        child.communicate()


@pytest.mark.parametrize("disposition", ["default", "ignored"])
def test_dump_all_sends_nothing_to_a_process_without_the_handler(
    tmp_path: Path, disposition: str
) -> None:
    setup = "signal.signal(signal.SIGUSR2, signal.SIG_IGN)" if disposition == "ignored" else ""
    code = f"import signal, sys\n{setup}\nprint('ready', flush=True)\nsys.stdin.readline()\n"
    temp = tmp_path / "temp"
    temp.mkdir()
    with _process(code, temp) as child:
        result = _dump_all(child.pid)
        assert child.poll() is None  # SIGUSR2 would have killed it (default disposition)
    assert result.returncode == 1
    assert f"process {child.pid} does not catch SIGUSR2" in result.stderr
    assert "hlasync.install_dump_signal(signal.SIGUSR2)" in result.stderr
    assert "Nothing sent" in result.stderr
    assert os.listdir(temp) == []


def test_dump_all_of_a_process_without_sandboxes(tmp_path: Path) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    with _process(LISTENER, temp) as child:
        result = _dump_all(child.pid, "--timeout", "20")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # no sandboxes, no dumps
    assert os.listdir(temp / f"hlasync-{os.geteuid()}") == [f"dump-all-{child.pid}.json"]


@pytest.mark.parametrize("planted", ["symlink", "mode 0755"])
def test_dump_all_refuses_a_manifest_directory_that_is_not_private(
    tmp_path: Path, planted: str
) -> None:
    temp, elsewhere = tmp_path / "temp", tmp_path / "elsewhere"
    temp.mkdir()
    elsewhere.mkdir(mode=0o700)
    private = temp / f"hlasync-{os.geteuid()}"
    if planted == "symlink":
        private.symlink_to(elsewhere)  # someone else's directory, or a trap
    else:
        private.mkdir(mode=0o755)
        private.chmod(0o755)
    with _process(LISTENER, temp) as child:
        result = _dump_all(child.pid, "--timeout", "20")
        _, service_err = child.communicate(timeout=30)
    assert result.returncode == 1
    assert str(private) in result.stderr
    assert ("is a symlink" if planted == "symlink" else "has mode 0755") in result.stderr
    assert os.listdir(elsewhere) == [] and (planted == "symlink" or os.listdir(private) == [])
    assert "could not write the list of dumps" in service_err  # the service refused too


def test_dump_all_checks_its_arguments(tmp_path: Path) -> None:
    unknown = _dump_all(os.getpid(), "--signal", "NOPE")
    assert unknown.returncode == 2 and "unknown signal 'NOPE'" in unknown.stderr
    with _process(LISTENER, tmp_path) as child:
        child.kill()
        child.wait()
        gone = _dump_all(child.pid)
    assert gone.returncode == 1 and f"no process {child.pid}" in gone.stderr


def test_install_dump_signal_checks_its_arguments() -> None:
    import hlasync
    from hlasync.kvm import KICK_SIGNAL

    with pytest.raises(ValueError, match="reserved"):
        hlasync.install_dump_signal(KICK_SIGNAL)
