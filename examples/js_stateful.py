"""Handlers that keep their state between calls: ``JSSandbox(keep_state=True)``.

Run it from a checkout (needs /dev/kvm)::

    python examples/js_stateful.py

hyperlight-js's model, as an opt-in: a handler's module state (here a running
total) stays from one call to the next; ``snapshot()`` and ``restore()`` are
yours; a call stopped by its timeout leaves the sandbox poisoned, and calls are
refused until you restore a snapshot (or ``unload()`` / ``load()``). Without
``keep_state`` (the default, and in every pool) each call starts from the state
``load()`` left.
"""

from __future__ import annotations

from hlasync import GuestTimeout, SandboxPoisoned
from hlasync.js import JSSandbox, default_config

TALLY = """
let total = 0;  // module state: kept between calls with keep_state=True

function handler(event) {
  if (event.hang) { while (true) {} }
  total += event.amount;
  return { total };
}
"""


def main() -> None:
    config = default_config(16 << 20, crashdump_enabled=False)  # no dump for the timeout
    with JSSandbox(heap_size=16 << 20, config=config, keep_state=True) as js:
        js.add_handler("tally", TALLY)
        js.load()
        for amount in (5, 10):
            print(f"add {amount} ->", js.call_handler("tally", {"amount": amount}))
        saved = js.snapshot()  # the total (15) and the loaded handlers
        print("add 100 ->", js.call_handler("tally", {"amount": 100}, gc=False))

        try:
            js.call_handler("tally", {"hang": True}, timeout=0.2)
        except GuestTimeout as exc:
            print(f"GuestTimeout ({exc.kind} limit {exc.limit:g} s); poisoned: {js.poisoned}")
        try:
            js.call_handler("tally", {"amount": 1})
        except SandboxPoisoned:
            print("the next call is refused: SandboxPoisoned")

        js.restore(saved)
        print(f"after restore(saved): poisoned: {js.poisoned}")
        print("add 1 ->", js.call_handler("tally", {"amount": 1}), "(15 + 1: the snapshot's state)")
        js.restore()  # no snapshot: the state load() left
        print("after restore(): add 1 ->", js.call_handler("tally", {"amount": 1}))

    with JSSandbox(heap_size=16 << 20) as fresh:  # the default: every call starts over
        fresh.add_handler("tally", TALLY)
        fresh.load()
        totals = [fresh.call_handler("tally", {"amount": 5})["total"] for _ in range(3)]
        print("without keep_state: add 5 three times ->", totals)


if __name__ == "__main__":
    main()
