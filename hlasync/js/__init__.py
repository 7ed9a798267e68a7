"""JavaScript handlers in KVM micro-VMs: the bundled QuickJS runtime guest.

    from hlasync.js import JSSandbox

    with JSSandbox(heap_size=32 << 20) as js:
        js.add_handler("greet", "function handler(event) { return 'Hello, ' + event.name }")
        js.load()
        assert js.call_handler("greet", {"name": "World"}) == "Hello, World"

Under a :class:`~hlasync.Supervisor`, ``await sup.create_js_pool({...})``
gives a pool whose ``call_handler`` takes ``timeout`` and ``cpu_timeout``.
Modules:

- :mod:`.sandbox` JSSandbox (synchronous) and its JSSnapshot
- :mod:`.runtime` sizes and set-up of the runtime guest
- :mod:`.protocol` what crosses between host and guest (JSON, reply statuses)
- :mod:`.host` host functions, console output and the clock, host side
- :mod:`.arguments` host-function arguments checked against their annotations
- :mod:`.files` ES modules read from a directory (``hlasync js run``), bounded
- :mod:`.stack` the JavaScript stack of a running handler, asked from outside
"""

from ..errors import JSError, JSResultError, JSSyntaxError
from .host import HostBridge, OutputSink
from .runtime import DEFAULT_HEAP_SIZE, default_config
from .sandbox import JSSandbox, JSSnapshot
from .stack import JSStack, capture_stack

__all__ = [
    "DEFAULT_HEAP_SIZE",
    "HostBridge",
    "JSError",
    "JSResultError",
    "JSSandbox",
    "JSSnapshot",
    "JSStack",
    "JSSyntaxError",
    "OutputSink",
    "capture_stack",
    "default_config",
]
