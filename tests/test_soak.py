"""A short soak (the one-minute and longer runs are `python -m hlasync.soak`)."""

from __future__ import annotations

from hlasync.kvm import Kvm
from hlasync.soak import render, run_soak


def test_short_soak_keeps_every_promise(kvm: Kvm) -> None:
    report = run_soak(8.0, seed=1234)
    assert report.ok, render(report)
    assert report.dumps_expected > 20
    assert report.dumps_verified == report.dumps_expected == report.dump_events
    assert {"good", "fault", "abort", "timeout", "cancel", "host", "dump"} <= set(report.actions)
    assert report.events_dropped == 0
    assert report.fds["end"] == report.fds["start"]
