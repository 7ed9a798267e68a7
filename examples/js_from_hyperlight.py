"""hyperlight-js's examples, the hlasync way: echo, a fibonacci module, a regex
handler, host functions, an interrupt and the two time limits.

Run it from a checkout (needs /dev/kvm)::

    python examples/js_from_hyperlight.py

Each part is what one of hyperlight-js's examples shows (its ``examples/data``
handlers, ``host-functions.js``, ``interrupt.js``, ``cpu-timeout.js``), written
for ``hlasync.js``: handlers take and return JSON values, host functions are
Python functions (their annotations are checked), limits are seconds, and a
limit that fires raises ``GuestTimeout`` with the handler's JavaScript stack
and a core dump. docs/javascript.md, "Coming from hyperlight-js", maps the APIs.
"""

from __future__ import annotations

import threading
import time

from hlasync import GuestCancelled, GuestTimeout
from hlasync.js import JSSandbox

ECHO = "function handler(event) { return event }"

# An ES module beside the handler: hyperlight-js's loader rules ("./fib" finds fib.js).
FIB_MODULE = """
export function fib(n) {
  let [a, b] = [0, 1];
  for (let i = 0; i < n; i++) [a, b] = [b, a + b];
  return a;
}
"""
FIB_HANDLER = """
import { fib } from "./fib";
function handler(event) { return { n: event.n, fib: fib(event.n) } }
"""

REGEX = r"""
function handler(event) {
  const words = event.text.match(/\b[A-Z][a-z]+\b/g) ?? [];
  return { capitalised: words, count: words.length };
}
"""

# A host module, imported as a namespace: hyperlight-js adds the handler's export.
HOST_FUNCTIONS = """
import * as shop from "shop";
function handler(event) {
  try {
    return { total: shop.total(event.prices), tax: shop["vat-rate"]() };
  } catch (error) {
    return { refused: String(error) };
  }
}
"""

SPIN = "function handler(event) {\n  for (;;) {}\n}"


def total(prices: list[float]) -> float:
    """A host function: its annotation is checked before it runs."""
    return round(sum(prices), 2)


def main() -> None:
    with JSSandbox() as js:
        js.add_handler("echo", ECHO)
        js.add_module("fib.js", FIB_MODULE)
        js.add_handler("fibonacci", FIB_HANDLER)  # not "fib": a handler is module <name>.js
        js.add_handler("regex", REGEX)
        js.register_host_function("shop", "total", total)
        js.register_host_function("shop", "vat-rate", lambda: 0.2)  # any name, as upstream
        js.add_handler("shop", HOST_FUNCTIONS)
        js.add_handler("spin", SPIN)
        js.load()

        print("echo ->", js.call_handler("echo", {"hello": "world", "n": [1, 2]}))
        print("fibonacci ->", js.call_handler("fibonacci", {"n": 50}))
        print("regex ->", js.call_handler("regex", {"text": "Alice met Bob in paris"}))
        print("shop ->", js.call_handler("shop", {"prices": [1.25, 2.5]}))
        # A wrong argument type is a TypeError the handler can catch.
        print("shop (bad prices) ->", js.call_handler("shop", {"prices": "1.25"}))

        # interrupt(): from another thread, while the handler spins.
        threading.Timer(0.2, js.interrupt).start()
        started = time.monotonic()
        try:
            js.call_handler("spin", {})
        except GuestCancelled:
            print(f"interrupt -> GuestCancelled after {time.monotonic() - started:.1f} s")

        # Wall-clock and CPU-time limits, combined: the first to fire wins.
        limits: dict[str, float]
        for limits in ({"timeout": 0.3}, {"cpu_timeout": 0.2, "timeout": 5.0}):
            try:
                js.call_handler(
                    "spin", {}, timeout=limits.get("timeout"), cpu_timeout=limits.get("cpu_timeout")
                )
            except GuestTimeout as exc:
                where = exc.js_stack.strip().splitlines()[0] if exc.js_stack else "?"
                print(f"{limits} -> GuestTimeout ({exc.kind}) {where}")
        print("echo after all that ->", js.call_handler("echo", "still fine"))


if __name__ == "__main__":
    main()
