"""The wasmtime peer: an optional import and the module every wasmtime row uses."""

from __future__ import annotations

import importlib.util

#: ``add(i32, i32) -> i32``, an infinite ``spin`` loop and 8 MiB of linear
#: memory (128 pages of 64 KiB), the size of a default hlasync sandbox.
WAT = """
(module
  (memory (export "memory") 128)
  (func (export "add") (param i32 i32) (result i32)
    local.get 0
    local.get 1
    i32.add)
  (func (export "spin")
    (loop $forever
      br $forever)))
"""


def missing() -> str | None:
    """Why wasmtime rows are skipped, or None when wasmtime can be imported.

    Modules that measure wasmtime import it inside their functions, after
    this check, so that ``hlasync.bench`` runs (and type-checks) without it.
    """
    if importlib.util.find_spec("wasmtime") is None:
        return "wasmtime is not installed (python -m pip install -e '.[bench]')"
    try:
        import wasmtime  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
    except ImportError as exc:
        return f"wasmtime does not import: {exc}"
    return None
