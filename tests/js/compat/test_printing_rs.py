"""Port of hyperlight-js ``src/hyperlight-js/tests/printing.rs``.

Upstream builds one sandbox per handler around the same host print function;
here one sandbox with both handlers prints through the same sink.
"""

from __future__ import annotations

from hlasync.js import JSSandbox
from hlasync.kvm import Kvm

from ._helpers import Printed


def test_console_log_writes_to_host_print_function(kvm: Kvm) -> None:
    """printing.rs ``console_log_writes_to_host_print_function``: ``console.log(x)``
    prints ``x`` and a newline; ``console.log("")`` an empty line."""
    printed = Printed()
    with JSSandbox(output=printed) as js:
        js.add_handler(
            "handler_1",
            'function handler(event) {\n console.log("Hello, World!!");\n return event\n}',
        )
        js.add_handler(
            "handler_2", 'function handler(event) {\n console.log("");\n return event\n}'
        )
        js.load()
        assert js.call_handler("handler_1", {}) == {}
        assert printed.take() == "Hello, World!!\n"
        assert js.call_handler("handler_2", {}) == {}
        assert printed.take() == "\n"


def test_print_writes_to_host_print_function(kvm: Kvm) -> None:
    """printing.rs ``print_writes_to_host_print_function``: the global ``print(x)``
    prints ``x`` with no newline; ``print("")`` prints nothing."""
    printed = Printed()
    with JSSandbox(output=printed) as js:
        js.add_handler(
            "handler_1", 'function handler(event) {\n print("Hello, World!!");\n return event\n}'
        )
        js.add_handler("handler_2", 'function handler(event) {\n print("");\n return event\n}')
        js.load()
        assert js.call_handler("handler_1", {}) == {}
        assert printed.take() == "Hello, World!!"
        assert js.call_handler("handler_2", {}) == {}
        assert printed.take() == ""
