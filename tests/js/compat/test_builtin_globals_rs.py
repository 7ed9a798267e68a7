"""Port of hyperlight-js ``src/hyperlight-js/tests/builtin_globals.rs``."""

from __future__ import annotations

from hlasync.js import JSSandbox
from hlasync.kvm import Kvm

HANDLER = """
        function assert(condition, message) {
            if (!condition) {
                throw new Error(message);
            }
        }

        function handler(event) {
            assert(typeof console.log === "function", "console.log should be defined");
            assert(typeof print === "function", "print should be defined");
            assert(typeof require === "function", "require should be defined");
            assert(typeof String.bytesFrom === "function", "String.bytesFrom should be defined");

            return 0;
        }
"""


def test_builtin_globals_should_be_defined(kvm: Kvm) -> None:
    """builtin_globals.rs ``builtin_globals_should_be_defined``: ``console.log``,
    ``print``, ``require`` and ``String.bytesFrom`` are functions in a handler."""
    with JSSandbox() as js:
        js.add_handler("handler", HANDLER)
        js.load()
        assert js.call_handler("handler", {}) == 0
