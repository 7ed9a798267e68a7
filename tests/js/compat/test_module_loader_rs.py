"""Port of hyperlight-js ``src/hyperlight-js/tests/module_loader.rs``.

Upstream gives the sandbox an embedded file system (``embed_modules!``) and the
handler the virtual base ``/``; here each embedded file is a module added
under its path, and relative imports resolve against the importer's name.
"""

from __future__ import annotations

import pytest

from hlasync import JSError
from hlasync.js import JSSandbox
from hlasync.kvm import Kvm

from ._helpers import fixture

CALCULATOR = """
    import { add, multiply } from './math.js';
    import { toUpperCase, concat } from './strings.js';

    function handler(event) {
        event.sum = add(event.a, event.b);
        event.product = multiply(event.a, event.b);
        event.message = toUpperCase(concat('Result: ', event.sum));
        return event;
    }
"""


def test_handler_with_multiple_imports(kvm: Kvm) -> None:
    """module_loader.rs ``test_handler_with_multiple_imports``."""
    with JSSandbox() as js:
        js.add_module("math.js", fixture("math.js"))
        js.add_module("strings.js", fixture("strings.js"))
        js.add_handler("calculator", CALCULATOR)
        js.load()
        result = js.call_handler("calculator", {"a": 5, "b": 3})
    assert result["sum"] == 8
    assert result["product"] == 15
    assert result["message"] == "RESULT: 8"


def test_handler_import_restrictions(kvm: Kvm) -> None:
    """module_loader.rs ``test_handler_import_restrictions``: a module the loader
    does not have (strings.js) fails the load."""
    with JSSandbox() as js:
        js.add_module("math.js", fixture("math.js"))
        js.add_handler("calculator", CALCULATOR)
        with pytest.raises(JSError, match=r"strings\.js"):
            js.load()


def test_resolve_module_without_resolver_set(kvm: Kvm) -> None:
    """module_loader.rs ``test_resolve_module_without_resolver_set``: with no
    modules at all, importing ./math.js fails the load."""
    handler = """
    import { add, multiply } from './math.js';

    function handler(event) {
        event.sum = add(event.a, event.b);
        event.product = multiply(event.a, event.b);
        return event;
    }
    """
    with JSSandbox() as js:
        js.add_handler("calculator", handler)
        with pytest.raises(JSError, match=r"math\.js"):
            js.load()


def test_handler_import_from_a_subfolder(kvm: Kvm) -> None:
    """module_loader.rs ``test_handler_import_from_a_subfolder``: galaxy/index.js
    imports ./deepThought.js from its own folder."""
    handler = """
    import { ultimateQuestionOfEverything } from './galaxy/index.js';

    function handler(event) {
        return ultimateQuestionOfEverything;
    }
    """
    with JSSandbox() as js:
        for path in ("hitchhiker.js", "galaxy/deepThought.js", "galaxy/index.js"):
            js.add_module(path, fixture(path))
        js.add_handler("hitchhiker", handler)
        js.load()
        assert js.call_handler("hitchhiker", {}) == 42
