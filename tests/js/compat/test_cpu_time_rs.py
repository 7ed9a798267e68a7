"""Port of the unit tests of hyperlight-js
``src/hyperlight-js/src/sandbox/monitor/cpu_time.rs``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hlasync.js import JSSandbox
from hlasync.kvm import Kvm

from ._missing import SKIP_RUST_CPU_CLOCK, SKIP_WINDOWS_ONLY


@pytest.fixture(scope="module")
def js(kvm: Kvm) -> Iterator[JSSandbox]:
    with JSSandbox() as sandbox:
        sandbox.add_handler("handler", "function handler(e) { return e }")
        sandbox.load()
        yield sandbox


@pytest.mark.skip(reason=SKIP_RUST_CPU_CLOCK)
def test_thread_cpu_handle_for_current_thread() -> None:
    """cpu_time.rs ``test_thread_cpu_handle_for_current_thread``."""


@pytest.mark.skip(reason=SKIP_RUST_CPU_CLOCK)
def test_thread_cpu_handle_elapsed() -> None:
    """cpu_time.rs ``test_thread_cpu_handle_elapsed``."""


def test_zero_duration_rejected(js: JSSandbox) -> None:
    """cpu_time.rs ``test_zero_duration_rejected``: a CPU limit of zero is refused
    ("non-zero")."""
    with pytest.raises(ValueError):
        js.call_handler("handler", {}, cpu_timeout=0)


@pytest.mark.skip(reason=SKIP_WINDOWS_ONLY)
def test_cpu_time_precision() -> None:
    """cpu_time.rs ``test_cpu_time_precision`` (``#[cfg(target_os = "windows")]``)."""
