"""The sandbox's state table (hlasync/sandbox/states.py) and the sandbox's
use of it: every transition a sandbox makes is in the table, the table is
the one docs/architecture.md shows, and a pair it lacks is refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hlasync import GuestCrashed, Sandbox, SandboxConfig
from hlasync.kvm import Kvm
from hlasync.sandbox import states
from hlasync.sandbox.states import Event, IllegalTransition, SandboxState, after

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def test_architecture_md_shows_exactly_the_table() -> None:
    rows = re.findall(r"^\| `(\w+)` \| `([\w-]+)` \| `(\w+)` \|$", ARCHITECTURE.read_text(), re.M)
    shown = {(SandboxState(a), Event(e)): SandboxState(b) for a, e, b in rows}
    assert len(rows) == len(shown)
    assert shown == dict(states.TRANSITIONS)


def test_a_pair_the_table_lacks_is_refused() -> None:
    with pytest.raises(IllegalTransition, match="no transition from 'poisoned' on 'call'"):
        after(SandboxState.POISONED, Event.CALL)
    with pytest.raises(IllegalTransition):
        after(SandboxState.READY, Event.RETURNED)
    assert after(SandboxState.RUNNING, Event.CLOSE) is SandboxState.CLOSED


def test_every_state_closes_and_closed_is_final() -> None:
    for state in SandboxState:
        assert after(state, Event.CLOSE) is SandboxState.CLOSED
    for (state, _event), target in states.TRANSITIONS.items():
        if state is SandboxState.CLOSED and _event is not Event.BOOTED:
            assert target is SandboxState.CLOSED


def test_a_sandbox_walks_the_table(
    kvm: Kvm, simpleguest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Boot, a call, a crash, a restore and a close: each change the sandbox
    makes is one of the table's transitions, in this order."""
    seen: list[tuple[str, str, str]] = []
    real = after

    def recording(state: SandboxState, event: Event) -> SandboxState:
        target = real(state, event)
        seen.append((state.value, event.value, target.value))
        return target

    monkeypatch.setattr("hlasync.sandbox.core.after", recording)
    sb = Sandbox(simpleguest, SandboxConfig(spin=0))
    try:
        assert sb.call("add", 1, 2) == 3
        with pytest.raises(GuestCrashed):
            sb.call("divide_by_zero")
        sb.restore()
    finally:
        sb.close()
    assert seen == [
        ("closed", "booted", "ready"),
        ("ready", "call", "running"),
        ("running", "returned", "ready"),
        ("ready", "call", "running"),
        ("running", "failed", "poisoned"),
        ("poisoned", "restored", "ready"),
        ("ready", "close", "closed"),
    ]
