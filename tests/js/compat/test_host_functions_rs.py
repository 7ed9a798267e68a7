"""Port of hyperlight-js ``src/hyperlight-js/tests/host_functions.rs``.

``register`` (typed Rust closures) and ``register_raw`` (a closure from the
JSON string of the arguments to the JSON string of the result) both become
``register_host_function``: a Python function takes and returns JSON values.
"""

from __future__ import annotations

from typing import Any

import pytest

from hlasync import JSError
from hlasync.js import JSSandbox
from hlasync.kvm import Kvm


def _loaded(js: JSSandbox, handler: str) -> JSSandbox:
    js.add_handler("handler", handler)
    js.load()
    return js


def _print(msg: str) -> int:
    assert msg == "Hello, World!!"
    return 42


def _add_42_24(a: int, b: int) -> int:
    assert a == 42
    assert b == 24
    return 66


def test_can_call_host_functions(kvm: Kvm) -> None:
    """host_functions.rs ``can_call_host_functions``: functions of two host
    modules, imported as namespaces, take and return values."""
    handler = """
        import * as host from "host";
        import * as utils from "utils";
        function handler(event) {
            let a = host.print("Hello, World!!");
            let b = 24;
            let c = utils.add(a, b);
            return { c };
        }
    """
    with JSSandbox() as js:
        js.register_host_function("host", "print", _print)
        js.register_host_function("utils", "add", _add_42_24)
        assert _loaded(js, handler).call_handler("handler", {}) == {"c": 66}


def test_should_fail_for_invalid_host_function(kvm: Kvm) -> None:
    """host_functions.rs ``should_fail_for_invalid_host_function``: calling a
    function the host module does not have fails the call (not the load)."""
    handler = """
        import * as host from "host";
        function handler(event) {
            host.print2("Hello, World!!");
            return { };
        }
    """
    with JSSandbox() as js:
        js.register_host_function("host", "print", _print)
        js.register_host_function("utils", "add", _add_42_24)
        _loaded(js, handler)
        with pytest.raises(JSError):
            js.call_handler("handler", {})


def test_host_modules_should_contain_all_host_functions(kvm: Kvm) -> None:
    """host_functions.rs ``host_modules_should_contain_all_host_functions``: the
    module's namespace holds every registered function, "no-op" included."""
    handler = """
        import * as host from "host";
        function handler(event) {;
            return Object.keys(host);
        }
    """
    with JSSandbox() as js:
        js.register_host_function("host", "life", lambda: 42)
        js.register_host_function("host", "add", lambda a, b: a + b)
        js.register_host_function("host", "hello", lambda: "Hello, World!")
        js.register_host_function("host", "no-op", lambda: "Hello, World!")
        result = _loaded(js, handler).call_handler("handler", {})
    assert sorted(result) == ["add", "hello", "life", "no-op"]


def test_host_fn_call_should_fail_if_wrong_arg_types(kvm: Kvm) -> None:
    """host_functions.rs ``host_fn_call_should_fail_if_wrong_arg_types``: strings
    for ``(a: i32, b: i32)`` fail the call instead of reaching the function."""
    handler = """
        import * as host from "host";
        function handler(event) {;
            return host.add("10", "32");
        }
    """

    def add(a: int, b: int) -> int:
        return a + b

    with JSSandbox() as js:
        js.register_host_function("host", "add", add)
        _loaded(js, handler)
        with pytest.raises(JSError):
            js.call_handler("handler", {})


def test_host_fn_with_unusual_names(kvm: Kvm) -> None:
    """host_functions.rs ``host_fn_with_unusual_names``: a function named
    "scoped/add/😊" is callable as ``host["scoped/add/😊"]``."""
    handler = """
        import * as host from "host";
        function handler(event) {;
            return host["scoped/add/😊"](10, 32);
        }
    """
    with JSSandbox() as js:
        js.register_host_function("host", "scoped/add/😊", lambda a, b: a + b)
        assert _loaded(js, handler).call_handler("handler", {}) == 42


def test_register_raw_basic(kvm: Kvm) -> None:
    """host_functions.rs ``register_raw_basic``: a function over the whole
    argument list ("[10,32]") returning the sum."""
    handler = """
        import * as math from "math";
        function handler(event) {
            return { result: math.add(10, 32) };
        }
    """
    with JSSandbox() as js:
        js.register_host_function("math", "add", lambda *args: sum(args))
        assert _loaded(js, handler).call_handler("handler", {}) == {"result": 42}


def test_register_raw_mixed_with_typed(kvm: Kvm) -> None:
    """host_functions.rs ``register_raw_mixed_with_typed``: typed and raw
    functions side by side in one module."""
    handler = """
        import * as math from "math";
        function handler(event) {
            let sum = math.add(10, 32);
            let doubled = math.double(sum);
            return { result: doubled };
        }
    """

    def add(a: int, b: int) -> int:
        return a + b

    def double(*args: Any) -> Any:
        return (args[0] if args else 0) * 2

    with JSSandbox() as js:
        js.register_host_function("math", "add", add)
        js.register_host_function("math", "double", double)
        assert _loaded(js, handler).call_handler("handler", {}) == {"result": 84}


def test_register_raw_error_propagation(kvm: Kvm) -> None:
    """host_functions.rs ``register_raw_error_propagation``: the host function's
    error fails the handler call, with its message."""
    handler = """
        import * as host from "host";
        function handler(event) {
            return host.fail();
        }
    """

    def fail(*args: Any) -> Any:
        raise RuntimeError("intentional failure from raw host fn")

    with JSSandbox() as js:
        js.register_host_function("host", "fail", fail)
        _loaded(js, handler)
        with pytest.raises(JSError, match="intentional failure"):
            js.call_handler("handler", {})


def test_register_raw_via_host_module(kvm: Kvm) -> None:
    """host_functions.rs ``register_raw_via_host_module``: ``host_module("utils")
    .register_raw("greet", ...)``."""
    handler = """
        import * as utils from "utils";
        function handler(event) {
            let greeting = utils.greet("World");
            return { greeting };
        }
    """

    def greet(*args: Any) -> Any:
        name = args[0] if args else ""
        return f"Hello, {name}!"

    with JSSandbox() as js:
        js.register_host_function("utils", "greet", greet)
        assert _loaded(js, handler).call_handler("handler", {}) == {"greeting": "Hello, World!"}
