"""What the ports of hyperlight-js's tests share: how its calls translate to hlasync.js.

==============================================  ===========================================
hyperlight-js (Rust / Node binding)             hlasync.js
==============================================  ===========================================
``SandboxBuilder::new().build()``,              ``JSSandbox(heap_size=..., config=...)``
``.load_runtime()`` / ``loadRuntime()``         (sizes: :func:`hlasync.js.default_config`)
``with_host_print_fn(f)``                       ``JSSandbox(output=f)``: ``f(level, text)``
``register(module, name, f)``, ``register_raw``  ``register_host_function(module, name, f)``
Node ``hostModule("m").register(n, f)``         ``register_host_function("host:m", n, f)``
``add_handler(name, script)``                   ``add_handler(name, source)``
``get_loaded_sandbox()`` / ``getLoadedSandbox``  ``load()``
``handle_event(name, json, gc)``, ``callHandler``  ``call_handler(name, event, gc=)``: JSON
``handle_event_with_monitor``, ``*TimeoutMs``   ``call_handler(..., timeout=s, cpu_timeout=s)``
state kept between calls, poisoned by a kill    ``JSSandbox(keep_state=True)``
``poisoned()``                                  ``poisoned`` (:func:`poisoned`)
``snapshot()`` / ``restore(snapshot)``          ``snapshot()`` / ``restore(snapshot)``
``interrupt_handle().kill()``                   ``interrupt()``
``set_module_loader(embed_modules!{...})``      ``add_module(path, source)``
async Node host functions                       ``Supervisor.create_js_pool(host_functions=)``
==============================================  ===========================================

Errors: a guest error becomes :class:`~hlasync.JSError` (``JSSyntaxError``,
``JSResultError``), a monitor's kill :class:`~hlasync.GuestTimeout`, a
``kill()`` :class:`~hlasync.GuestCancelled`, ``ERR_INVALID_ARG`` a
``ValueError`` (``ConfigError`` for sizes).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from hlasync.js import JSSandbox

__all__ = ["BURN", "FIXTURES", "Printed", "fixture", "poisoned", "reload"]

FIXTURES = Path(__file__).parent / "fixtures"

#: The CPU-burning handler of monitors.rs and timeout.test.js: busy for
#: ``event.runtime`` milliseconds of the (host) clock.
BURN = """
function handler(event) {
    const startTime = Date.now();
    const runtime = event.runtime || 100;

    let counter = 0;
    while (Date.now() - startTime < runtime) {
        counter++;
    }

    event.counter = counter;
    event.actualRuntime = Date.now() - startTime;
    return event;
}
"""


def fixture(path: str) -> str:
    """A module with the name and exports of a file of upstream's
    ``src/hyperlight-js/tests/fixtures`` (written here, not copied)."""
    return (FIXTURES / path).read_text()


def poisoned(js: JSSandbox) -> bool:
    """hyperlight-js's ``poisoned()``: a call did not run to completion and the
    sandbox refuses calls until ``restore()`` (``JSSandbox.poisoned``)."""
    return js.poisoned


def reload(js: JSSandbox, handlers: Mapping[str, str]) -> JSSandbox:
    """``js`` with exactly ``handlers`` loaded: a shared sandbox as a fresh one
    with these handlers (modules and host functions stay as registered)."""
    for name in list(js.handlers):
        js.remove_handler(name)
    for name, source in handlers.items():
        js.add_handler(name, source)
    js.load()
    return js


class Printed:
    """An ``output`` sink that keeps what the guest printed.

    hyperlight-js hands its host print function the guest's raw output:
    ``console.log(x)`` prints ``x`` and a newline, ``print(x)`` prints ``x``
    alone. hlasync's sink receives one ``(level, text)`` per call, the line's
    newline implied for the console methods; :meth:`take` rebuilds the raw
    output from it (any level that is not a console method prints no newline).
    """

    CONSOLE = ("log", "info", "warn", "error", "debug")

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def __call__(self, level: str, text: str) -> None:
        self.calls.append((level, text))

    def take(self) -> str:
        """The output since the last take, as a host print function saw it."""
        out = "".join(text + ("\n" if level in self.CONSOLE else "") for level, text in self.calls)
        self.calls.clear()
        return out
