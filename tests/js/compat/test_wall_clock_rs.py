"""Port of the unit tests of hyperlight-js
``src/hyperlight-js/src/sandbox/monitor/wall_clock.rs``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hlasync.js import JSSandbox
from hlasync.kvm import Kvm

from ._missing import SKIP_RUST_MONITOR_FUTURE


@pytest.fixture(scope="module")
def js(kvm: Kvm) -> Iterator[JSSandbox]:
    with JSSandbox() as sandbox:
        sandbox.add_handler("handler", "function handler(e) { return e }")
        sandbox.load()
        yield sandbox


def test_zero_duration_rejected(js: JSSandbox) -> None:
    """wall_clock.rs ``test_zero_duration_rejected``: a wall-clock limit of zero is
    refused ("non-zero")."""
    with pytest.raises(ValueError):
        js.call_handler("handler", {}, timeout=0)


def test_valid_duration_accepted(js: JSSandbox) -> None:
    """wall_clock.rs ``test_valid_duration_accepted``: 100 ms is a valid limit."""
    assert js.call_handler("handler", {"x": 1}, timeout=0.1) == {"x": 1}


@pytest.mark.skip(reason=SKIP_RUST_MONITOR_FUTURE)
def test_get_monitor_returns_future() -> None:
    """wall_clock.rs ``test_get_monitor_returns_future``."""


@pytest.mark.skip(reason=SKIP_RUST_MONITOR_FUTURE)
def test_get_monitor_reuse() -> None:
    """wall_clock.rs ``test_get_monitor_reuse``."""
