"""Which C compiler builds guests, and the flags each kind of compiler needs.

Two are supported and tested: **gcc** (with GNU ld) and **zig cc** (clang 18
with lld) from the pinned ``ziglang`` wheel (:data:`.fetch.ZIGLANG`), which
needs nothing installed on the machine. Another clang is used with clang's
flags, untested.

Choice: ``--cc`` (the ``cc`` argument), else ``$HLASYNC_CC``, else ``$CC``,
else ``gcc`` when it is on ``PATH``, else the pinned zig. The name ``zig``
always means the pinned zig (fetched into the cache on first use); a command
with spaces (``"ccache gcc"``) is split like a shell would.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import fetch
from .errors import GuestBuildError

__all__ = ["PINNED_ZIG", "Toolchain", "describe", "select"]

#: The name that selects the pinned zig cc.
PINNED_ZIG = "zig"

#: Flags every guest is compiled with. -g and frame pointers keep core dumps
#: readable (symbols, backtraces); asynchronous unwind tables give .eh_frame
#: with either compiler (clang emits only .debug_frame for freestanding code).
#: The first group is how code runs in a guest (any source: SDK, libc, engine).
CODE_CFLAGS = (
    "-O2",
    "-g",
    "-fno-pie",
    "-mno-red-zone",
    "-fno-stack-protector",
    "-fno-omit-frame-pointer",
    "-fcf-protection=none",
    "-fasynchronous-unwind-tables",
)
GUEST_CFLAGS = (
    "-std=gnu11",
    *CODE_CFLAGS,
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-no-pie",
    "-fno-builtin",
    "-Wall",
    "-Wextra",
)
#: gcc turns copy and fill loops into memcpy/memset calls, even inside memcpy.
GCC_CFLAGS = ("-fno-tree-loop-distribute-patterns",)
#: zig cc targets the host's Linux and libc unless told otherwise, and links with
#: LTO in release builds: guests are freestanding objects, linked as they are.
ZIG_CFLAGS = ("-target", "x86_64-freestanding-none", "-fno-lto")
#: --gc-sections: zig's lld always collects unused sections; gcc does the same so
#: that both link the same code.
LDFLAGS = (
    "-Wl,--build-id=sha1",
    "-Wl,-z,max-page-size=4096",
    "-Wl,-z,noexecstack",
    "-Wl,--gc-sections",
)


@dataclass(frozen=True)
class Toolchain:
    """A C compiler driver and what it needs to build guests."""

    command: tuple[str, ...]  # the driver: ("/usr/bin/gcc",) or (".../zig", "cc")
    kind: str  # "gcc", "clang" or "zig"
    identity: str  # changes when the compiler does: part of the bundled guests' stamps
    env: Mapping[str, str] = field(default_factory=dict)  # added to the environment

    @property
    def cflags(self) -> tuple[str, ...]:
        """Compiler flags of every guest object, for this compiler."""
        if self.kind == "gcc":
            return (*GUEST_CFLAGS, *GCC_CFLAGS)
        if self.kind == "zig":
            return (*ZIG_CFLAGS, *GUEST_CFLAGS)
        return GUEST_CFLAGS

    @property
    def code_cflags(self) -> tuple[str, ...]:
        """How code runs in a guest, without the SDK's language and warning flags:
        for third-party sources, which bring their own."""
        return (*ZIG_CFLAGS, *CODE_CFLAGS) if self.kind == "zig" else CODE_CFLAGS

    @property
    def ldflags(self) -> tuple[str, ...]:
        # zig passes `--entry _start` to lld, which overrides ENTRY() in guest.ld.
        return (*LDFLAGS, "-Wl,--entry=_hl_start") if self.kind == "zig" else LDFLAGS

    @property
    def libs(self) -> tuple[str, ...]:
        """Libraries after the objects: the compiler's runtime (128-bit division...).
        zig links its own compiler_rt; gcc and clang take libgcc."""
        return () if self.kind == "zig" else ("-lgcc",)

    def builtin_include(self) -> Path:
        """The compiler's own headers (stdatomic.h, ...), for builds with -nostdinc."""
        if self.kind == "zig":
            lib = _zig_lib_dir(self.command[0])
            return lib / "include"
        if self.kind == "gcc":
            out = self.run(["-print-file-name=include"], what="asking gcc for its headers")
            return Path(out.strip())
        out = self.run(["-print-resource-dir"], what="asking clang for its headers")
        return Path(out.strip()) / "include"

    def run(self, args: Sequence[str], *, what: str) -> str:
        """Run the driver with ``args``; its output, or GuestBuildError saying ``what`` failed."""
        env = {**os.environ, **self.env}
        try:
            result = subprocess.run(
                [*self.command, *args], capture_output=True, text=True, env=env, check=False
            )
        except OSError as exc:
            raise GuestBuildError(f"{what}: cannot run {self.command[0]}: {exc}") from None
        if result.returncode != 0:
            raise GuestBuildError(
                f"{what} failed (exit {result.returncode})", result.stdout + result.stderr
            )
        return result.stdout


def _requested(cc: str | None) -> str | None:
    return cc or os.environ.get("HLASYNC_CC") or os.environ.get("CC") or None


def _zig_env() -> dict[str, str]:
    """zig caches every compilation; keep its cache beside ours, not in ~/.cache/zig."""
    env = {}
    for variable in ("ZIG_GLOBAL_CACHE_DIR", "ZIG_LOCAL_CACHE_DIR"):
        if not os.environ.get(variable):
            env[variable] = str(fetch.cache_root() / "zig-cache")
    return env


def _pinned_zig_identity() -> str:
    return f"zig {fetch.ZIGLANG.version} (pinned, sha256 {fetch.ZIGLANG.sha256[:16]})"


def describe(cc: str | None = None) -> str:
    """The identity of the compiler :func:`select` would choose, without fetching it."""
    name = _requested(cc)
    if name == PINNED_ZIG or (name is None and shutil.which("gcc") is None):
        return _pinned_zig_identity()
    return select(cc).identity


def select(cc: str | None = None) -> Toolchain:
    """The compiler to build with (see the module docstring for the order)."""
    name = _requested(cc)
    if name is None:
        name = "gcc" if shutil.which("gcc") else PINNED_ZIG
    if name == PINNED_ZIG:
        zig = fetch.fetch(fetch.ZIGLANG) / "ziglang" / "zig"
        return Toolchain((str(zig), "cc"), "zig", _pinned_zig_identity(), _zig_env())
    words = shlex.split(name)
    found = shutil.which(words[0]) if words else None
    if found is None:
        raise GuestBuildError(
            f"C compiler {name!r} not found: install gcc (Debian: apt-get install gcc), "
            f"name another with --cc, HLASYNC_CC or CC, or use --cc {PINNED_ZIG} (the pinned "
            "zig cc, downloaded with pip on first use)"
        )
    command = (found, *words[1:])
    if Path(found).name == "zig":  # someone's own zig, as "zig cc"
        return Toolchain(command, "zig", _probe(command), _zig_env())
    identity = _probe(command)
    return Toolchain(command, "clang" if "clang" in identity.lower() else "gcc", identity)


@functools.lru_cache(maxsize=16)
def _probe(command: tuple[str, ...]) -> str:
    """``<driver> <__VERSION__>``: the compiler's version, from its predefined macros."""
    try:
        result = subprocess.run(
            [*command, "-dM", "-E", "-x", "c", os.devnull],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestBuildError(f"cannot run the C compiler {' '.join(command)}: {exc}") from None
    macros: dict[str, str] = {}
    for line in result.stdout.splitlines():
        _define, name, value = [*line.split(" ", 2), "", ""][:3]
        macros[name] = value
    version = macros.get("__VERSION__", "").strip('"')
    if result.returncode != 0 or not version:
        raise GuestBuildError(
            f"{' '.join(command)} does not look like a C compiler (gcc or clang)",
            result.stdout + result.stderr,
        )
    if "__clang__" in macros and "clang" not in version.lower():
        version = f"clang {version}"
    return f"{' '.join(command)} {version}"


@functools.lru_cache(maxsize=4)
def _zig_lib_dir(zig: str) -> Path:
    pinned = Path(zig).parent / "lib"
    if (pinned / "std" / "std.zig").is_file():
        return pinned
    result = subprocess.run([zig, "env"], capture_output=True, text=True, check=False)
    try:
        return Path(json.loads(result.stdout)["lib_dir"])
    except (ValueError, KeyError):
        raise GuestBuildError(f"{zig} env did not name its lib folder", result.stderr) from None
