"""Port of hyperlight-js ``src/hyperlight-js/tests/runtime.rs``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from hlasync.js import JSSandbox
from hlasync.kvm import Kvm

from ._helpers import Printed, reload


@pytest.fixture(scope="module")
def js(kvm: Kvm) -> Iterator[JSSandbox]:
    with JSSandbox(output=Printed()) as sandbox:
        yield sandbox


def test_js_date_time_now_is_correct(js: JSSandbox) -> None:
    """runtime.rs ``js_date_time_now_is_correct``: ``Date.now()`` is the host's
    clock in milliseconds (less than 2 s behind it)."""
    handler = """
        function handler(event) {
            let now = Date.now();
            console.log("now is:", now,"\\n");
            event.now = now;
            return event
        }
    """
    reload(js, {"handler": handler})
    result = js.call_handler("handler", {"now": 0})
    system_time_millis = time.time_ns() // 1_000_000
    assert isinstance(result["now"], int)
    assert system_time_millis - result["now"] < 2000


def test_localtime_r_garbage_timezone_on_max_date(js: JSSandbox) -> None:
    """runtime.rs ``localtime_r_garbage_timezone_on_max_date``: ``Date.toString()``
    in UTC, at and past the edges of the representable range."""
    handler = """
        function handler() {
            return JSON.stringify({
                valid: new Date(1735689600000).toString(),
                max: new Date(8640000000000000).toString(),
                min: new Date(-8640000000000000).toString(),
                overflow: new Date(8640000000000001).toString(),
                underflow: new Date(-8640000000000001).toString(),
            });
        }
    """
    reload(js, {"handler": handler})
    inner = js.call_handler("handler", {})
    result = json.loads(inner)
    assert result["valid"] == "Wed Jan 01 2025 00:00:00 GMT+0000"
    assert result["max"] == "Sat Sep 13 275760 00:00:00 GMT+0000"
    assert result["min"] == "Tue Apr 20 -271821 00:00:00 GMT+0000"
    assert result["overflow"] == "Invalid Date"
    assert result["underflow"] == "Invalid Date"


def test_async_support(js: JSSandbox) -> None:
    """runtime.rs ``async_support``: an async handler's promise is settled."""
    handler = """
        async function do_something() {
            return 1234;
        }

        async function handler(event) {
            const result = await do_something();
            return result;
        }
    """
    reload(js, {"handler": handler})
    assert js.call_handler("handler", {}) == 1234
