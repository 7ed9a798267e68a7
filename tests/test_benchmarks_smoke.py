"""Smoke test: the sandbox benchmark runs in quick mode and writes its JSON.

No timing assertions: the numbers depend on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hlasync.kvm import Kvm

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_sandbox.py"

MEASUREMENTS = (
    "bare_kvm_run",
    "call_add",
    "echo_bytes_1k",
    "echo_bytes_64k",
    "create_cold",
    "create",
    "restore",
    "interrupt_spin",
)


def test_quick_benchmark_runs_and_writes_json(kvm: Kvm, tmp_path: Path) -> None:
    # ``kvm``: skip where KVM is unusable (fail instead under HLASYNC_REQUIRE_KVM=1).
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "| measurement |" in proc.stdout

    data = json.loads(out.read_text(encoding="utf-8"))
    measurements = data["measurements"]
    for key in MEASUREMENTS:
        assert key in measurements, f"missing measurement {key}"
        entry = measurements[key]
        assert entry["n"] == len(entry["samples_ns"]) > 0
        assert entry["median_ns"] > 0, key
    for key in ("create", "restore", "interrupt_spin", "call_add"):
        assert isinstance(measurements[key]["met"], bool), key
