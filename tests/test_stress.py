"""A short randomized stress run of the Sandbox API from many threads, with a
fixed seed (tests/stress.py; ``.ci/run`` runs it longer)."""

from __future__ import annotations

from hlasync.kvm import Kvm

from .stress import run


def test_a_stress_run_finds_nothing(kvm: Kvm) -> None:
    report = run(15.0, seed=20261205)
    assert sum(report.operations.values()) > 1000
    assert report.findings == [], "\n".join(report.findings)
