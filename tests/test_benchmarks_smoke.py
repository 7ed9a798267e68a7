"""Smoke tests: the benchmarks run in quick mode and write their JSON.

No timing assertions: the numbers depend on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hlasync.kvm import Kvm

REPO = Path(__file__).resolve().parent.parent


def _run_quick(suite: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``python -m hlasync.bench SUITE --quick --out OUT``: it must exit 0 and
    print its table, and write ``SUITE.md`` and ``SUITE.json`` into OUT."""
    proc = subprocess.run(
        [sys.executable, "-m", "hlasync.bench", suite, "--quick", "--out", str(out), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert any(f"| {first} |" in proc.stdout for first in ("measurement", "mode", "channel"))
    assert (out / f"{suite}.md").is_file()
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
    _run_quick("sandbox", tmp_path)

    data = json.loads((tmp_path / "sandbox.json").read_text(encoding="utf-8"))
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


def test_quick_doorbell_benchmark_runs_side_by_side(kvm: Kvm, tmp_path: Path) -> None:
    """Every row has the exit path and the doorbell measured in one run (and
    wasmtime beside them where it is installed)."""
    proc = _run_quick("doorbell", tmp_path)
    assert "| exit path | doorbell (auto) | wasmtime |" in proc.stdout
    data = json.loads((tmp_path / "doorbell.json").read_text(encoding="utf-8"))
    measurements = data["measurements"]
    cpus = len(os.sched_getaffinity(0))
    keys = ("add", "host_call", "cpu", "call_restore", "supervised_sandbox", "pool", "idle")
    for key in (*keys, f"throughput_{cpus}", f"throughput_{2 * cpus}"):
        modes = measurements[key]["modes"]
        assert set(modes) >= {"exit path", "doorbell"}, (key, modes)
        for mode in ("exit path", "doorbell"):
            assert modes[mode]["samples"] and modes[mode]["median"] > 0, (key, mode)
    assert measurements["add"]["modes"]["exit path"]["median"] > 0
    # The same rows once more with a busy loop on every CPU, in a table of their own
    # (hot restores and hot pools included: issue 22's contention check).
    assert "with a busy loop on every CPU" in proc.stdout
    contended = data["with_busy_loops"]
    contended_keys = ("add", "host_call", "cpu", "call_restore", "supervised_sandbox", "pool")
    for key in (*contended_keys, f"throughput_{cpus}"):
        modes = contended[key]["modes"]
        for mode in ("exit path", "doorbell"):
            assert modes[mode]["samples"] and modes[mode]["median"] > 0, (key, mode)


def test_quick_ray_benchmark_compares_processes_and_actors(kvm: Kvm, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    proc = _run_quick("ray", tmp_path)
    assert "| worker processes | Ray actors |" in proc.stdout
    assert "Crossing Ray adds" in proc.stdout
    data = json.loads((tmp_path / "ray.json").read_text(encoding="utf-8"))
    for name in ("worker processes", "Ray actors"):
        assert data["latency_samples_ns"][name] and min(data["rates"][name]) > 0


def test_quick_crashdump_benchmark_runs_and_writes_json(kvm: Kvm, tmp_path: Path) -> None:
    # ``kvm``: skip where KVM is unusable (fail instead under HLASYNC_REQUIRE_KVM=1).
    proc = _run_quick("crashdump", tmp_path)
    assert "check (ok)" in proc.stdout
    assert "Core dump created" not in proc.stderr

    data = json.loads((tmp_path / "crashdump.json").read_text(encoding="utf-8"))
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
    proc = _run_quick("supervisor", tmp_path, "--backend", backend)
    assert "Core dump created" not in proc.stderr

    data = json.loads((tmp_path / "supervisor.json").read_text(encoding="utf-8"))
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


def test_quick_scaling_benchmark_runs_and_writes_json(kvm: Kvm, tmp_path: Path) -> None:
    _run_quick("scaling", tmp_path)
    data = json.loads((tmp_path / "scaling.json").read_text(encoding="utf-8"))
    cores = data["cores"]
    assert data["ceiling_per_core"] > 0
    modes = {(row["mode"], row["cores"]) for row in data["rows"]}
    assert ("threads", 1) in modes and ("processes", 1) in modes
    assert ("threads", cores) in modes and ("processes", cores) in modes
    # Outcomes held in the workers, against every one sent at once, in the same run.
    assert ("processes, hot pools, outcomes not held", cores) in modes
    assert any("outcomes held / sent at once" in t["what"] for t in data["targets"])
    # Worker processes under SCHED_BATCH (the default) against SCHED_OTHER, in the same run.
    assert ("processes, hot pools, normal scheduling", cores) in modes
    assert any("SCHED_BATCH / SCHED_OTHER" in t["what"] for t in data["targets"])
    # The worker processes spread over front processes (each its own loop), side by side.
    fronts = [row for row in data["rows"] if row.get("fronts", 1) > 1]
    assert {row["mode"] for row in fronts} == (
        {"front processes", "front processes, hot pools"} if cores >= 2 else set()
    )
    for row in data["rows"]:
        assert row["median"] > 0 and len(row["rates"]) > 0
        # Single calls are timed in one supervisor: front-process rows have no latency.
        assert row["latency_ns"] is None if row in fronts else row["latency_ns"] > 0
        # The front's cost: the event loop thread's CPU per call, and its inverse.
        assert row["loop_cpu_ns"] > 0
        assert row["one_loop_ceiling"] == pytest.approx(1e9 / row["loop_cpu_ns"])
    assert all(isinstance(target["met"], bool) for target in data["targets"])
    markdown = (tmp_path / "scaling.md").read_text(encoding="utf-8")
    assert "| mode | cores | calls/s (median) |" in markdown


def test_quick_channel_benchmark_runs_and_writes_json(tmp_path: Path) -> None:
    _run_quick("channel", tmp_path)
    data = json.loads((tmp_path / "channel.json").read_text(encoding="utf-8"))
    assert [row["kind"] for row in data["rows"]] == ["pipe", "socketpair", "shared-memory ring"]
    for row in data["rows"]:
        samples = row["round_trip_ns"]
        assert samples == sorted(samples) and samples[0] > 0
        assert row["p50_ns"] == samples[len(samples) // 2]
        assert len(row["blocking_round_trip_ns"]) == len(samples)
        assert row["rate"] > 0 and all(rate > 0 for rate in row["rates"])
    markdown = (tmp_path / "channel.md").read_text(encoding="utf-8")
    assert "| shared-memory ring |" in markdown


def test_the_entry_point_checks_its_arguments(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hlasync.bench", "nonsense", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "unknown suite 'nonsense'" in proc.stderr


def test_quick_runs_never_write_the_committed_results(kvm: Kvm) -> None:
    committed = REPO / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in committed.rglob("*") if p.is_file()}
    proc = subprocess.run(
        [sys.executable, "-m", "hlasync.bench", "sandbox", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    after = {p: p.stat().st_mtime_ns for p in committed.rglob("*") if p.is_file()}
    assert after == before
    written = Path(proc.stdout.split("table: ")[1].split()[0])
    assert committed not in written.parents and written.is_file()
    shutil.rmtree(written.parent)
