"""Smoke test: ``python -m hlasync.bench --quick`` runs and writes its outputs.

No timing assertions: the numbers depend on the machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hlasync.kvm import Kvm

REPO = Path(__file__).resolve().parent.parent

CATEGORIES = (
    "call",
    "fresh",
    "interrupt",
    "hang_time",
    "hang_bytes",
    "scale_alive",
    "scale_rss",
    "scale_throughput",
)
#: Every peer row the run must report, measured or skipped.
PEER_ROWS = (
    "call.wasmtime",
    "call.child_process",
    "fresh.wasmtime",
    "fresh.fork",
    "interrupt.wasmtime",
    "interrupt.kill",
    "hang_time.gcore",
    "hang_bytes.gcore",
)


def test_quick_peer_benchmark_runs_and_writes_outputs(kvm: Kvm, tmp_path: Path) -> None:
    # ``kvm``: skip where KVM is unusable (fail instead under HLASYNC_REQUIRE_KVM=1).
    proc = subprocess.run(
        [sys.executable, "-m", "hlasync.bench", "peers", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Core dump created" not in proc.stderr
    out = tmp_path / "peers"

    markdown = (out / "peers.md").read_text(encoding="utf-8")
    assert "| category | peer | measurement | median | p99 | n | ratio to hlasync |" in markdown
    data = json.loads((out / "peers.json").read_text(encoding="utf-8"))
    for key in ("cpu", "kernel", "kvm", "python", "packages"):
        assert key in data["machine"], key
    rows = data["rows"]
    by_key = {row["key"]: row for row in rows}

    for category in CATEGORIES:
        hlasync_rows = [
            row
            for row in rows
            if row["category"] == category
            and row["peer"].startswith("hlasync")
            and row["status"] == "measured"
        ]
        assert hlasync_rows, f"no measured hlasync row in {category}"
        for row in hlasync_rows:
            assert row["n"] == len(row["samples"]) > 0, row["key"]
            assert row["median"] > 0, row["key"]
        baseline = data["categories"][category]["baseline"]
        assert baseline in {row["key"] for row in hlasync_rows}, category

    for key in PEER_ROWS:
        assert key in by_key, f"peer row {key} missing"
    for row in rows:
        assert row["status"] in ("measured", "skipped"), row
        if row["status"] == "measured":
            assert row["n"] == len(row["samples"]) > 0, row["key"]
            assert row["median"] > 0, row["key"]
            assert row["ratio_to_hlasync"] > 0, row["key"]
            assert f"| {row['peer']} |" in markdown, row["key"]
        else:
            assert isinstance(row["skip_reason"], str) and row["skip_reason"], row["key"]
            assert f"skipped: {row['skip_reason']}" in markdown, row["key"]

    for category in ("hang_time", "hang_bytes"):
        hlasync_row = by_key[f"{category}.hlasync"]
        assert hlasync_row["extra"]["gdb_backtrace_shows_spin"] in (True, False, None)

    plots = data["plots"]
    if plots["skipped"] is None:
        assert plots["files"], "matplotlib is installed but no plot was drawn"
        for name in plots["files"]:
            assert (out / name).stat().st_size > 0, name
    else:
        assert "matplotlib" in plots["skipped"]
