"""Port of hyperlight-js ``src/hyperlight-js/tests/builtin_modules.rs``."""

from __future__ import annotations

from hlasync.js import JSSandbox
from hlasync.kvm import Kvm

HANDLER = """
        import * as crypto from "crypto";
        import * as console from "console";
        import * as io from "io";
        import * as require from "require";

        function handler(event) {
            return {
                crypto: Object.keys(crypto),
                console: Object.keys(console),
                io: Object.keys(io),
                require: Object.keys(require),
            };
        }
"""


def test_modules_exist_and_contains_expected_exports(kvm: Kvm) -> None:
    """builtin_modules.rs ``modules_exist_and_contains_expected_exports``: the
    built-in modules crypto, console, io and require export exactly these names."""
    with JSSandbox() as js:
        js.add_handler("handler", HANDLER)
        js.load()
        result = js.call_handler("handler", {})
    assert {module: set(names) for module, names in result.items()} == {
        "crypto": {"Hmac", "createHmac"},
        "console": {"log"},
        "io": {"print", "flush"},
        "require": {"default", "require"},
    }
