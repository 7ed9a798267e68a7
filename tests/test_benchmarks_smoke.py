"""Smoke tests: the benchmarks run in quick mode and write their JSON.

No timing assertions: the numbers depend on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hlasync.kvm import Kvm

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_sandbox.py"
CRASHDUMP_SCRIPT = REPO / "benchmarks" / "bench_crashdump.py"
SUPERVISOR_SCRIPT = REPO / "benchmarks" / "bench_supervisor.py"


def _run_quick(script: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run a benchmark script in quick mode; it must exit 0 and print its table."""
    proc = subprocess.run(
        [sys.executable, str(script), "--quick", *extra, "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "| measurement |" in proc.stdout
    return proc


MEASUREMENTS = (
    "bare_kvm_run",
    "call_add",
    "echo_bytes_1k",
    "echo_bytes_64k",
    "create_cold",
    "create",
    "restore",
    "call_restore_plain",
    "call_restore",
    "interrupt_spin",
)


def test_quick_benchmark_runs_and_writes_json(kvm: Kvm, tmp_path: Path) -> None:
    # ``kvm``: skip where KVM is unusable (fail instead under HLASYNC_REQUIRE_KVM=1).
    out = tmp_path / "out.json"
    _run_quick(SCRIPT, out)

    data = json.loads(out.read_text(encoding="utf-8"))
    measurements = data["measurements"]
    for key in MEASUREMENTS:
        assert key in measurements, f"missing measurement {key}"
        entry = measurements[key]
        assert entry["n"] == len(entry["samples_ns"]) > 0
        assert entry["median_ns"] > 0, key
    for key in ("create", "restore", "interrupt_spin", "call_add"):
        assert isinstance(measurements[key]["met"], bool), key


CRASHDUMP_MEASUREMENTS = {
    "idle_dump": "ns",
    "idle_dump_allocated": "bytes",
    "idle_dump_apparent": "bytes",
    "running_dump": "ns",
    "fault_with_dump": "ns",
    "fault_without_dump": "ns",
}


def test_quick_crashdump_benchmark_runs_and_writes_json(kvm: Kvm, tmp_path: Path) -> None:
    # ``kvm``: skip where KVM is unusable (fail instead under HLASYNC_REQUIRE_KVM=1).
    out = tmp_path / "out.json"
    proc = _run_quick(CRASHDUMP_SCRIPT, out)
    assert "check (ok)" in proc.stdout
    assert "Core dump created" not in proc.stderr

    data = json.loads(out.read_text(encoding="utf-8"))
    measurements = data["measurements"]
    for key, unit in CRASHDUMP_MEASUREMENTS.items():
        assert key in measurements, f"missing measurement {key}"
        entry = measurements[key]
        assert entry["unit"] == unit, key
        assert entry["n"] == len(entry[f"samples_{unit}"]) > 0, key
        assert entry[f"median_{unit}"] > 0, key
    for key in ("idle_dump", "idle_dump_allocated"):
        assert isinstance(measurements[key]["met"], bool), key
    assert isinstance(data["derived"]["fault_dump_cost"]["median_difference_ns"], float)
    assert data["checks"]["call_survives_dump"]["ok"] is True


SUPERVISOR_MEASUREMENTS = {
    "pool_add": "ns",
    "sync_add_restore": "ns",
    "throughput_2w": "calls/s",
    "throughput_1w": "calls/s",
    "timeout_latency": "ns",
    "watchdog_lateness": "ns",
}


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_quick_supervisor_benchmark_runs_and_writes_json(
    kvm: Kvm, tmp_path: Path, backend: str
) -> None:
    # ``kvm``: skip where KVM is unusable (fail instead under HLASYNC_REQUIRE_KVM=1).
    out = tmp_path / "out.json"
    proc = _run_quick(SUPERVISOR_SCRIPT, out, "--backend", backend)
    assert "Core dump created" not in proc.stderr

    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["backend"] == backend
    measurements = data["measurements"]
    for key, unit in SUPERVISOR_MEASUREMENTS.items():
        assert key in measurements, f"missing measurement {key}"
        entry = measurements[key]
        assert entry["unit"] == unit, key
        suffix = "ns" if unit == "ns" else "calls_per_s"
        assert entry["n"] == len(entry[f"samples_{suffix}"]) > 0, key
        assert entry[f"median_{suffix}"] > 0, key
    for key in ("pool_add", "throughput_2w", "timeout_latency"):
        assert isinstance(measurements[key]["met"], bool), key
    ratio = data["derived"]["pool_add_over_sync"]
    assert ratio["median_ratio"] > 0 and len(ratio["per_round_ratios"]) > 0
    counts = data["counts"]
    stats = data["supervisor_statistics"]["workers_2"]
    assert stats["timed_out"] == counts["timeouts"] + counts["timeout_warmup"]
