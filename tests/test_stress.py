"""Short randomized stress runs of the Sandbox API from many threads and of
the Supervisor from many tasks, with fixed seeds (tests/stress.py,
tests/stress_supervisor.py; ``.ci/run`` runs them longer)."""

from __future__ import annotations

import pytest

from hlasync.kvm import Kvm

from .stress import run
from .stress_supervisor import run as run_supervisor


def test_a_stress_run_finds_nothing(kvm: Kvm) -> None:
    report = run(15.0, seed=20261205)
    assert sum(report.operations.values()) > 1000
    assert report.findings == [], "\n".join(report.findings)


@pytest.mark.parametrize(("backend", "processes"), [("asyncio", 0), ("trio", 2)])
def test_a_supervisor_stress_run_finds_nothing(kvm: Kvm, backend: str, processes: int) -> None:
    """The same for the Supervisor (tests/stress_supervisor.py): calls, faults,
    timeouts, cancellations, async host functions calling other supervised
    sandboxes, dumps, and dedicated sandboxes closed and made again."""
    report = run_supervisor(6.0, seed=20261205, processes=processes, backend=backend)
    assert sum(report.operations.values()) > 100
    assert report.findings == [], "\n".join(report.findings)
