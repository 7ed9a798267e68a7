"""Port of the unit tests of hyperlight-js ``src/hyperlight-js/src/sandbox/loaded_js_sandbox.rs``.

``unload()`` gives upstream a ``JSSandbox`` with the runtime and no handlers;
the port calls it on the one hlasync object and then adds and loads again.
Upstream's loaded sandbox keeps its handlers' state between calls:
``JSSandbox(keep_state=True)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hlasync import HlasyncError
from hlasync.js import JSSandbox
from hlasync.kvm import Kvm

from ._helpers import poisoned, reload

VALID_HANDLER = """
        function handler(event) {
            event.request.uri = "/redirected.html";
            return event
        }
"""
VALID_EVENT = {"request": {"uri": "/index.html"}}
STATIC_COUNTER_HANDLER = """
        let count = 0;
        function handler(event) {
            event.count = ++count;
            return event
        }
"""
STATIC_COUNTER_EVENT = {"count": 0}


@pytest.fixture(scope="module")
def shared(kvm: Kvm) -> Iterator[JSSandbox]:
    with JSSandbox(keep_state=True) as js:
        yield js


@pytest.fixture
def sandbox(shared: JSSandbox) -> JSSandbox:
    """upstream's fresh ``JSSandbox`` (runtime loaded, no handler): the shared one, emptied."""
    for name in list(shared.handlers):
        shared.remove_handler(name)
    return shared


def _count(js: JSSandbox, name: str = "handler") -> object:
    return js.call_handler(name, STATIC_COUNTER_EVENT)["count"]


def test_handle_event(sandbox: JSSandbox) -> None:
    """loaded_js_sandbox.rs ``test_handle_event``."""
    reload(sandbox, {"handler": VALID_HANDLER})
    result = sandbox.call_handler("handler", VALID_EVENT)
    assert result == {"request": {"uri": "/redirected.html"}}


def test_handle_event_accumulates_state(sandbox: JSSandbox) -> None:
    """loaded_js_sandbox.rs ``test_handle_event_accumulates_state``: a module-level
    ``let count`` keeps counting from one call to the next."""
    reload(sandbox, {"handler": STATIC_COUNTER_HANDLER})
    assert _count(sandbox) == 1
    assert _count(sandbox) == 2


def test_snapshot_and_restore(sandbox: JSSandbox) -> None:
    """loaded_js_sandbox.rs ``test_snapshot_and_restore``: a snapshot keeps the
    handlers' state and the set of handlers, across unload and reload."""
    reload(sandbox, {"handler": STATIC_COUNTER_HANDLER})
    assert _count(sandbox) == 1
    snapshot = sandbox.snapshot()  # after 1 event
    assert _count(sandbox) == 2
    assert _count(sandbox) == 3
    sandbox.restore(snapshot)
    assert _count(sandbox) == 2

    sandbox.unload()
    sandbox.add_handler("handler2", STATIC_COUNTER_HANDLER)
    sandbox.load()
    assert _count(sandbox, "handler2") == 1  # handler2 is there, not handler
    with pytest.raises(HlasyncError):
        _count(sandbox, "handler")

    sandbox.restore(snapshot)  # to before the unload
    assert _count(sandbox) == 2  # handler is back
    with pytest.raises(HlasyncError):
        _count(sandbox, "handler2")  # handler2 is not


def test_add_handler_unload_and_reuse_resets_state(sandbox: JSSandbox) -> None:
    """loaded_js_sandbox.rs ``test_add_handler_unload_and_reuse_resets_state``."""
    reload(sandbox, {"handler": STATIC_COUNTER_HANDLER})
    assert _count(sandbox) == 1
    assert _count(sandbox) == 2
    sandbox.unload()
    sandbox.add_handler("handler", STATIC_COUNTER_HANDLER)
    sandbox.load()
    assert _count(sandbox) == 1
    assert _count(sandbox) == 2


def test_unload(sandbox: JSSandbox) -> None:
    """loaded_js_sandbox.rs ``test_unload``: a loaded sandbox unloads."""
    reload(sandbox, {"handler": VALID_HANDLER})
    sandbox.unload()
    assert not sandbox.loaded and not sandbox.handlers


def test_handle_event_with_monitor_fails_if_monitor_cannot_start(sandbox: JSSandbox) -> None:
    """loaded_js_sandbox.rs ``test_handle_event_with_monitor_fails_if_monitor_cannot_start``:
    fail closed: a limit that cannot be set up (upstream: a monitor whose start
    fails; here: a wall-clock limit that is not a number of seconds) refuses the
    call before the handler runs, and the sandbox is not poisoned."""
    reload(sandbox, {"handler": VALID_HANDLER})
    with pytest.raises(ValueError):
        sandbox.call_handler("handler", VALID_EVENT, timeout=float("nan"))
    assert not poisoned(sandbox)
