"""Build guest binaries with the hlasync guest SDK (gcc).

Standard library only: ``setup.py`` loads this file to compile the bundled
guests during ``pip install``, before hlasync's dependencies exist.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
#: Installed wheels carry the SDK in the package; a source checkout has it in guest/.
_INSTALLED_SDK = PACKAGE_DIR / "_sdk"
_SOURCE_GUEST_DIR = PACKAGE_DIR.parent / "guest"
BUNDLED_DIR = PACKAGE_DIR / "_bin"

CFLAGS = (
    "-std=gnu11",
    "-O2",
    "-g",
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-fno-pie",
    "-no-pie",
    "-mno-red-zone",
    "-fno-stack-protector",
    "-fno-omit-frame-pointer",
    "-fcf-protection=none",
    "-fno-builtin",
    "-fno-tree-loop-distribute-patterns",
    "-Wall",
    "-Wextra",
)
LDFLAGS = ("-Wl,--build-id=sha1", "-Wl,-z,max-page-size=4096", "-Wl,-z,noexecstack")


class GuestBuildError(Exception):
    """The C compiler failed; ``output`` holds what it printed."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message + (f"\n{output}" if output else ""))
        self.output = output


def sdk_dir() -> Path:
    """Directory holding ``include/hlasync_guest.h``, ``runtime.c`` and ``guest.ld``."""
    for candidate in (_INSTALLED_SDK, _SOURCE_GUEST_DIR / "sdk"):
        if (candidate / "include" / "hlasync_guest.h").is_file():
            return candidate
    raise GuestBuildError("hlasync guest SDK not found (broken installation?)")


def bundled_sources() -> dict[str, Path]:
    """Bundled guest name -> C source, when the sources are present."""
    for directory in (_INSTALLED_SDK.parent / "_guests", _SOURCE_GUEST_DIR / "guests"):
        if directory.is_dir():
            return {p.stem: p for p in sorted(directory.glob("*.c"))}
    return {}


def find_compiler(cc: str | None = None) -> str:
    name = cc or os.environ.get("HLASYNC_CC") or os.environ.get("CC") or "gcc"
    found = shutil.which(name)
    if found is None:
        raise GuestBuildError(
            f"C compiler {name!r} not found: install gcc (Debian: apt-get install gcc) or set CC"
        )
    return found


def build_guest(
    sources: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    cc: str | None = None,
    extra_flags: Iterable[str] = (),
) -> Path:
    """Compile and link C ``sources`` with the SDK runtime into guest ELF ``output``.

    The file appears atomically (built to a temporary name, then renamed).
    """
    sdk = sdk_dir()
    output = Path(output)
    missing = [str(s) for s in sources if not Path(s).is_file()]
    if missing:
        raise GuestBuildError(f"source file(s) not found: {', '.join(missing)}")
    if not sources:
        raise GuestBuildError("no source files given")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    command = [
        find_compiler(cc),
        *CFLAGS,
        f"-I{sdk / 'include'}",
        f"-T{sdk / 'guest.ld'}",
        *LDFLAGS,
        *extra_flags,  # last, so they override the defaults
        str(sdk / "runtime.c"),
        *(str(s) for s in sources),
        "-lgcc",
        "-o",
        temp,
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise GuestBuildError(
                f"compiling {', '.join(str(s) for s in sources)} failed (exit {result.returncode})",
                result.stdout + result.stderr,
            )
        os.chmod(temp, 0o755)
        os.replace(temp, output)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return output


def build_bundled(destination: Path | None = None, *, only_stale: bool = False) -> list[Path]:
    """Compile every bundled guest into ``destination`` (default: the package's _bin)."""
    destination = destination or BUNDLED_DIR
    built = []
    runtime_inputs = [
        Path(__file__),  # compiler and linker flags
        sdk_dir() / "runtime.c",
        sdk_dir() / "guest.ld",
        sdk_dir() / "include" / "hlasync_guest.h",
    ]
    for name, source in bundled_sources().items():
        target = destination / f"{name}.elf"
        if only_stale and target.exists():
            newest = max(p.stat().st_mtime_ns for p in [source, *runtime_inputs])
            if target.stat().st_mtime_ns >= newest:
                continue
        built.append(build_guest([source], target))
    return built
