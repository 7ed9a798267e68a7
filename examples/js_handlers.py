"""JavaScript handlers in a KVM micro-VM: the synchronous JSSandbox.

Run it from a checkout (needs /dev/kvm)::

    python examples/js_handlers.py

It loads a handler that uses an ES module and a host function written in
Python, calls it with JSON events, shows a handler exception with its
JavaScript stack, console output with levels, and that every call starts
from the loaded state.
"""

from __future__ import annotations

from hlasync import JSError, JSSyntaxError, SandboxConfig
from hlasync.js import JSSandbox, default_config

PRICES = {"apple": 0.5, "pear": 0.75}

CART = """
import { price } from "shop";
import { round2 } from "money";

let calls = 0;  // module state: reset before every call

export function handler(event) {
  calls += 1;
  const total = event.items.reduce((sum, item) => sum + price(item.name) * item.count, 0);
  console.info(`cart of ${event.items.length} lines`);
  if (total > event.budget) throw new RangeError(`over budget by ${round2(total - event.budget)}`);
  return { total: round2(total), calls };
}
"""


def price(name: str) -> float:
    """A host function: JavaScript imports it from module "shop"."""
    return PRICES[name]  # an unknown name raises KeyError: thrown in JavaScript


def main() -> None:
    config: SandboxConfig = default_config(16 << 20)  # dumps: the usual places
    output = lambda level, text: print(f"  console.{level}: {text}")  # noqa: E731
    with JSSandbox(heap_size=16 << 20, config=config, output=output) as js:
        js.register_host_function("shop", "price", price)
        js.add_module("money", "export const round2 = (x) => Math.round(x * 100) / 100;")
        js.add_handler("cart", CART)
        js.load()  # compiled once; every call starts from here

        event = {"items": [{"name": "apple", "count": 3}, {"name": "pear", "count": 2}]}
        print("cart ->", js.call_handler("cart", {**event, "budget": 10}))
        print("cart ->", js.call_handler("cart", {**event, "budget": 10}), "(calls is 1 again)")
        try:
            js.call_handler("cart", {**event, "budget": 1})
        except JSError as exc:
            print(f"JSError {exc.name}: {exc.js_message}")
            for line in exc.stack.splitlines():
                print("  " + line.strip())
        try:
            js.call_handler("cart", {"items": [{"name": "kiwi", "count": 1}], "budget": 1})
        except JSError as exc:
            print(f"host function's exception, thrown in JS: {exc.name}: {exc.js_message}")
        try:
            js.add_handler("broken", "function handler(e) {\n  return e +\n}")
        except JSSyntaxError as exc:
            where = f"{exc.file} at line {exc.line}, column {exc.column}"
            print(f"JSSyntaxError in {where}: {exc.js_message}")


if __name__ == "__main__":
    main()
