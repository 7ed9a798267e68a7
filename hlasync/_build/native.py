"""The host-side helper library (``native/hl_wait.c``, ``native/hl_owner.c``
-> ``_bin/libhlwait.so``): code that waits for a guest's doorbell and the loop
of a vCPU's owner thread, both without holding the GIL, loaded with ctypes.
Built at install with the guests' compiler (gcc, clang or the pinned zig cc),
as an ordinary shared object for this machine."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .toolchain import Toolchain

__all__ = ["FLAGS", "LIBRARY", "SOURCES", "build"]

#: The library's name in the package's _bin.
LIBRARY = "libhlwait.so"
#: Its sources, in native/.
SOURCES = ("hl_wait.c", "hl_owner.c")
FLAGS = (
    "-std=gnu11",
    "-O2",
    "-g",
    "-fPIC",
    "-shared",
    "-ffreestanding",
    "-nostdlib",
    "-fno-stack-protector",
    "-Wall",
    "-Wextra",
    "-Werror",
)


def build(target: Path, tools: Toolchain, sources: Sequence[Path]) -> None:
    """Compile ``sources`` into the shared object ``target``."""
    # Freestanding, it needs no libc: zig is given a target whose headers it has.
    machine = ("-target", "x86_64-linux-musl") if tools.kind == "zig" else ()
    tools.run(
        [*machine, *FLAGS, "-o", str(target), *map(str, sources)],
        what=f"building {target.name}",
    )
