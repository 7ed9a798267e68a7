"""Every script under examples/ runs to completion and prints what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from hlasync.kvm import Kvm

from .conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

#: script (relative to examples/) -> (arguments, one line its output must contain)
RUNS: dict[str, tuple[list[str], str]] = {
    "basic.py": ([], "after restore(): ready, add(1, 1) -> 2"),
    "crash_dumps.py": ([], "...and the call still returned 1000000000"),
    "custom_guest/run.py": ([], "greet('again')         -> 'Hello, again!"),
    "subscriber.py": ([], "GuestTimeout: wall limit"),
    "hang_capture_service.py": (["--self-test"], 'GET /add?a=1&b=2 -> 200 {"result": 3}'),
    "js_handlers.py": ([], "cart -> {'total': 3, 'calls': 1} (calls is 1 again)"),
    "js_hang_capture.py": ([], "JavaScript stack at the deadline:"),
    "js_stateful.py": ([], "add 1 -> {'total': 16} (15 + 1: the snapshot's state)"),
    "js_from_hyperlight.py": ([], "{'cpu_timeout': 0.2, 'timeout': 5.0} -> GuestTimeout (cpu)"),
    "hot_sandbox.py": ([], "after restore(): increment -> 1"),
    "hot_pool.py": ([], "hot pool: increment x3 -> [1, 1, 1]"),
    "live_debugging.py": (["--script"], "add(1, 2) with b set to 41 in gdb -> 42"),
    "observability_console.py": ([], "await pool.call('call_host', 'double', 5) -> 10"),
    "ray_cluster.py": ([], "fetched core: hl_core_"),
    "front_processes.py": ([], "every front answered its own calls with its own supervisor"),
    "worker_processes.py": (
        [],
        "the pool goes on: add(i, 1) for i < 8 -> [1, 2, 3, 4, 5, 6, 7, 8]",
    ),
}


def run_example(script: str, arguments: list[str], dumps: Path) -> str:
    """Run one example with this checkout's hlasync; its stdout, after checking it exited 0."""
    env = dict(os.environ)
    # As a user runs them: no HYPERLIGHT_CORE_DUMP_DIR, so dumps go to the
    # temp directory (this test's own).
    env.pop("HYPERLIGHT_CORE_DUMP_DIR", None)
    env["TMPDIR"] = str(dumps)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *arguments],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, (
        f"{script} exited {completed.returncode}\n"
        f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    )
    # A dump an example tells you to open is still there when it is done.
    for printed in re.findall(r"[^\s\"']*hl_core_[^\s\"']*?\.elf", completed.stdout):
        path = Path(printed) if os.path.isabs(printed) else dumps / printed
        assert path.is_file(), f"{script} printed {printed}, which is gone after it exited"
    return completed.stdout


def ran(script: str, dumps: Path) -> str:
    """Run ``script`` with its arguments from RUNS; its stdout, after checking
    that it printed the line RUNS names."""
    arguments, line = RUNS[script]
    output = run_example(script, arguments, dumps)
    assert line in output
    return output


def test_every_example_is_run_here() -> None:
    scripts = {
        path.relative_to(EXAMPLES).as_posix()
        for path in EXAMPLES.rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert scripts == set(RUNS), "add new examples to RUNS in tests/test_examples.py"


def test_basic(kvm: Kvm, tmp_path: Path) -> None:
    ran("basic.py", tmp_path)


def test_crash_dumps(kvm: Kvm, tmp_path: Path) -> None:
    ran("crash_dumps.py", tmp_path)


def test_custom_guest(kvm: Kvm, tmp_path: Path) -> None:
    require_tool("gcc")
    ran("custom_guest/run.py", tmp_path)


def test_subscriber(kvm: Kvm, tmp_path: Path) -> None:
    output = ran("subscriber.py", tmp_path)
    assert "event CallTimedOut" in output and "event CrashDumpWritten" in output
    assert len(list(tmp_path.glob("hl_core_*.elf"))) == 2  # the timeout and the crash


def test_hang_capture_service_self_test(kvm: Kvm, tmp_path: Path) -> None:
    output = ran("hang_capture_service.py", tmp_path)
    hang = next(text for text in output.splitlines() if text.startswith("GET /hang -> 504"))
    dumps = list(tmp_path.glob("hlasync-service-*/hl_core_*.elf"))  # a directory of its own
    assert len(dumps) == 2  # /hang and /crash
    assert any(str(dump) in hang for dump in dumps)


def test_js_handlers(kvm: Kvm, tmp_path: Path) -> None:
    output = ran("js_handlers.py", tmp_path)
    assert "JSError RangeError: over budget by 2" in output
    assert "at handler (cart.js:" in output
    assert "JSSyntaxError in broken.js at line 3" in output


def test_js_hang_capture(kvm: Kvm, tmp_path: Path) -> None:
    output = ran("js_hang_capture.py", tmp_path)
    assert "at steps (collatz.js:" in output  # the JS stack, in the error and in dump show
    assert "JS_CallInternal" in output  # the engine's C frames in the dump's backtrace
    assert "collatz(7) -> {'n': 7, 'steps': 16}" in output  # the pool went on


def test_js_from_hyperlight(kvm: Kvm, tmp_path: Path) -> None:
    output = ran("js_from_hyperlight.py", tmp_path)
    assert "fibonacci -> {'n': 50, 'fib': 12586269025}" in output
    assert "must be list[float], got str" in output  # the argument check, caught in JavaScript
    assert "interrupt -> GuestCancelled" in output
    assert "{'timeout': 0.3} -> GuestTimeout (wall) at handler (spin.js:2:3)" in output


def test_js_stateful(kvm: Kvm, tmp_path: Path) -> None:
    output = ran("js_stateful.py", tmp_path)
    assert "add 10 -> {'total': 15}" in output  # the state kept
    assert "GuestTimeout (wall limit 0.2 s); poisoned: True" in output
    assert "the next call is refused: SandboxPoisoned" in output
    assert "after restore(): add 1 -> {'total': 1}" in output
    assert "without keep_state: add 5 three times -> [5, 5, 5]" in output


def test_hot_pool(kvm: Kvm, tmp_path: Path) -> None:
    output = ran("hot_pool.py", tmp_path)
    assert "pool:     increment x3 -> [1, 1, 1]" in output
    assert "hot JS pool: count x3 -> [1, 1, 1]" in output
    assert "hot JSSandbox: count x3 -> [1, 1, 1]" in output
    assert re.search(r"hot / ordinary: \d+\.\d\dx", output), output


def test_live_debugging(kvm: Kvm, tmp_path: Path) -> None:
    require_tool("gdb")
    output = ran("live_debugging.py", tmp_path)
    assert re.search(r"Breakpoint 1, fib \(n=(n@entry=)?5\)", output), output
    assert "Value returned is $1 = 5" in output and "fib(6) -> 8" in output
    assert "Program received signal SIGFPE" in output
    assert "divide_by_zero -> GuestCrashed, dump at " in output


def test_observability_console(kvm: Kvm, tmp_path: Path) -> None:
    import pytest

    pytest.importorskip("opentelemetry.sdk")
    output = ran("observability_console.py", tmp_path)
    assert "event hlasync.crashdump {'hlasync.core_path': " in output
    assert "span double" in output and "metric hlasync.calls {" in output


def test_worker_processes(kvm: Kvm, tmp_path: Path) -> None:
    output = ran("worker_processes.py", tmp_path)
    assert "call_host('factorial', 10) -> 3628800" in output
    # The call running in the killed worker is lost; the one waiting there runs elsewhere.
    assert "the four calls: WorkerLost (exit status -9), returned, returned, returned" in output
    assert "exit status -9, calls lost: 1" in output
    assert "workers_lost=1" in output


def test_front_processes(kvm: Kvm, tmp_path: Path) -> None:
    """Two front processes, each its own loop and supervisor, both answer calls."""
    output = ran("front_processes.py", tmp_path)
    pids = set(re.findall(r"front \d \(pid (\d+), \d+ worker processes\): [\d,]+ calls/s", output))
    assert len(pids) == 2 and str(os.getpid()) not in pids, output
    assert re.search(r"2 fronts on \d+ cores together: [\d,]+ calls/s", output), output


def test_ray_cluster(kvm: Kvm, tmp_path: Path) -> None:
    import pytest

    pytest.importorskip("ray")
    arguments, line = RUNS["ray_cluster.py"]
    env_address = os.environ.pop("RAY_ADDRESS", None)  # the example starts its own cluster
    try:
        output = run_example("ray_cluster.py", arguments, tmp_path)
    finally:
        if env_address is not None:
            os.environ["RAY_ADDRESS"] = env_address
    assert line in output and "stopped in spin" in output
    assert "100 calls: True" in output
    nodes = output.split("calls completed per node: ")[1].splitlines()[0]
    assert nodes.count(":") == 2, nodes  # both nodes served calls
