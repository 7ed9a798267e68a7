"""Port of hyperlight-js ``src/hyperlight-js/tests/handlers.rs``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hlasync import JSResultError
from hlasync.js import JSSandbox
from hlasync.kvm import Kvm

from ._helpers import reload

ECHO = "function handler(e) { return e; }"


@pytest.fixture(scope="module")
def js(kvm: Kvm) -> Iterator[JSSandbox]:
    """One sandbox; each test loads its own handlers (as upstream builds its own)."""
    with JSSandbox() as sandbox:
        yield sandbox


def test_handle_event(js: JSSandbox) -> None:
    """handlers.rs ``handle_event``: the handler's returned event comes back as JSON."""
    handler = """
        function handler(event) {
            event.result = "Hello, " + event.name + "!";
            return event
        }
    """
    reload(js, {"handler": handler})
    result = js.call_handler("handler", {"name": "world", "result": ""})
    assert result == {"name": "world", "result": "Hello, world!"}


def test_check_javascript_handler_returns_value(js: JSSandbox) -> None:
    """handlers.rs ``check_javascript_handler_returns_value``: a handler that
    returns nothing is an error ("The handler function did not return a value")."""
    reload(js, {"handler": "function handler(event) {\n    1\n}"})
    with pytest.raises(JSResultError):
        js.call_handler("handler", {})


def test_add_handler_rejects_empty_name(js: JSSandbox) -> None:
    """handlers.rs ``add_handler_rejects_empty_name``."""
    with pytest.raises(ValueError, match="empty"):
        js.add_handler("", ECHO)


def test_remove_handler_rejects_empty_name(js: JSSandbox) -> None:
    """handlers.rs ``remove_handler_rejects_empty_name``: an invalid name, not a missing one."""
    with pytest.raises(ValueError, match="empty"):
        js.remove_handler("")


def test_handle_event_rejects_empty_name(js: JSSandbox) -> None:
    """handlers.rs ``handle_event_rejects_empty_name``: refused before the guest runs."""
    reload(js, {"handler": ECHO})
    with pytest.raises(ValueError, match="empty"):
        js.call_handler("", {})
