"""Port of the unit tests of hyperlight-js ``src/hyperlight-js/src/sandbox/js_sandbox.rs``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hlasync.js import JSSandbox
from hlasync.kvm import Kvm


@pytest.fixture
def sandbox(kvm: Kvm) -> Iterator[JSSandbox]:
    with JSSandbox() as js:
        yield js


def test_add_handler(sandbox: JSSandbox) -> None:
    """js_sandbox.rs ``test_add_handler``: two handlers added (not yet loaded)."""
    sandbox.add_handler("handler1", "script1")
    sandbox.add_handler("handler2", "script2")
    assert len(sandbox.handlers) == 2


def test_remove_handler(sandbox: JSSandbox) -> None:
    """js_sandbox.rs ``test_remove_handler``."""
    sandbox.add_handler("handler1", "script1")
    sandbox.add_handler("handler2", "script2")
    sandbox.remove_handler("handler1")
    assert len(sandbox.handlers) == 1


def test_clear_handlers(sandbox: JSSandbox) -> None:
    """js_sandbox.rs ``test_clear_handlers``: ``clear_handlers()`` removes them all."""
    sandbox.add_handler("handler1", "script1")
    sandbox.add_handler("handler2", "script2")
    sandbox.clear_handlers()
    assert len(sandbox.handlers) == 0


def test_get_loaded_sandbox(sandbox: JSSandbox) -> None:
    """js_sandbox.rs ``test_get_loaded_sandbox``."""
    sandbox.add_handler(
        "handler1",
        """function handler(event) {
                    event.request.uri = "/redirected.html";
                    return event
                }""",
    )
    sandbox.load()
    assert sandbox.loaded
