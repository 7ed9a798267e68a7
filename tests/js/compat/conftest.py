"""Fixtures two ports share: the CPU-burning handler's loaded sandbox, which
hyperlight-js's monitor and timeout tests both build (``create_cpu_burning_sandbox()``,
``beforeEach``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hlasync.js import JSSandbox, JSSnapshot
from hlasync.kvm import Kvm

from ._helpers import BURN


@pytest.fixture(scope="module")
def burner(kvm: Kvm) -> Iterator[tuple[JSSandbox, JSSnapshot]]:
    """One sandbox per module, the handler ``BURN`` loaded, and its snapshot."""
    with JSSandbox(keep_state=True) as js:
        js.add_handler("handler", BURN)
        js.load()
        yield js, js.snapshot()


@pytest.fixture
def loaded(burner: tuple[JSSandbox, JSSnapshot]) -> JSSandbox:
    """The CPU-burning sandbox, as loaded (a module may name another ``loaded``)."""
    js, snapshot = burner
    js.restore(snapshot)
    return js
