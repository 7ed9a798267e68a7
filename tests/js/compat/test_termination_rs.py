"""Port of hyperlight-js ``src/hyperlight-js/tests/termination.rs``.

Upstream marks it ``#[ignore]`` (it takes seconds); here the kill comes after
0.2 s instead of 1 s: the handler is just as much in its loop. Upstream's
loaded sandbox is poisoned by a kill: ``JSSandbox(keep_state=True)``.
"""

from __future__ import annotations

import threading
import time

import pytest

from hlasync import GuestCancelled
from hlasync.js import JSSandbox
from hlasync.kvm import Kvm

from ._helpers import poisoned

HANDLER = """
    function handler(event) {
        const start = Date.now();
        let now = start;
        while (now - start < 4000) {
            now = Date.now();
        }
        return event
    }
"""


def test_handle_termination(kvm: Kvm) -> None:
    """termination.rs ``handle_termination``: ``kill()`` from another thread stops
    the call (ExecutionCanceledByHost) and poisons the sandbox until ``restore()``."""
    with JSSandbox(keep_state=True) as js:
        js.add_handler("handler", HANDLER)
        js.load()
        assert not poisoned(js)
        snapshot = js.snapshot()
        barrier = threading.Barrier(2)

        def kill() -> None:
            barrier.wait()
            time.sleep(0.2)
            deadline = time.monotonic() + 3
            while not js.interrupt() and time.monotonic() < deadline:
                time.sleep(0.01)  # the call had not started yet

        killer = threading.Thread(target=kill)
        killer.start()
        barrier.wait()
        with pytest.raises(GuestCancelled):
            js.call_handler("handler", {})
        killer.join()
        assert poisoned(js)
        js.restore(snapshot)
        assert not poisoned(js)
