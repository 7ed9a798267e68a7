"""Build guest binaries with the hlasync guest SDK (gcc or zig cc).

Parts: :mod:`.toolchain` chooses the compiler and its flags, :mod:`.fetch`
downloads pinned third-party files into a cache, :mod:`.jsruntime` builds the
QuickJS guest. Standard library only: ``setup.py`` loads this package to
compile the bundled guests during ``pip install``, before hlasync's
dependencies exist.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import fetch, jsruntime, native, toolchain
from .errors import FetchError, GuestBuildError
from .toolchain import Toolchain

__all__ = [
    "BUNDLED_DIR",
    "BundledGuest",
    "FetchError",
    "GuestBuildError",
    "Toolchain",
    "build_bundled",
    "build_guest",
    "build_js_guest",
    "bundled_guests",
    "bundled_sources",
    "sdk_dir",
]

BUILD_DIR = Path(__file__).resolve().parent
PACKAGE_DIR = BUILD_DIR.parent
#: Installed wheels carry the SDK in the package; a source checkout has it in guest/.
_INSTALLED_SDK = PACKAGE_DIR / "_sdk"
_SOURCE_GUEST_DIR = PACKAGE_DIR.parent / "guest"
BUNDLED_DIR = PACKAGE_DIR / "_bin"
_SOURCE_NATIVE_DIR = PACKAGE_DIR.parent / "native"


def sdk_dir() -> Path:
    """Directory holding ``include/hlasync_guest.h``, ``runtime.c`` and ``guest.ld``."""
    for candidate in (_INSTALLED_SDK, _SOURCE_GUEST_DIR / "sdk"):
        if (candidate / "include" / "hlasync_guest.h").is_file():
            return candidate
    raise GuestBuildError("hlasync guest SDK not found (broken installation?)")


def sdk_files() -> list[Path]:
    sdk = sdk_dir()
    return [sdk / "runtime.c", sdk / "guest.ld", sdk / "include" / "hlasync_guest.h"]


def bundled_sources() -> dict[str, Path]:
    """Bundled single-file guest name -> C source, when the sources are present."""
    for directory in (_INSTALLED_SDK.parent / "_guests", _SOURCE_GUEST_DIR / "guests"):
        if directory.is_dir():
            return {p.stem: p for p in sorted(directory.glob("*.c"))}
    return {}


def build_guest(
    sources: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    cc: str | Toolchain | None = None,
    extra_flags: Iterable[str] = (),
) -> Path:
    """Compile and link C ``sources`` with the SDK runtime into guest ELF ``output``.

    ``cc`` chooses the compiler (a name or command, see :mod:`.toolchain`). The
    file appears atomically (built to a temporary name, then renamed).
    """
    sdk = sdk_dir()
    missing = [str(s) for s in sources if not Path(s).is_file()]
    if missing:
        raise GuestBuildError(f"source file(s) not found: {', '.join(missing)}")
    if not sources:
        raise GuestBuildError("no source files given")
    tools = cc if isinstance(cc, Toolchain) else toolchain.select(cc)
    names = ", ".join(str(s) for s in sources)
    with atomic_output(output) as temp:
        tools.run(
            [
                *tools.cflags,
                f"-I{sdk / 'include'}",
                f"-T{sdk / 'guest.ld'}",
                *tools.ldflags,
                *extra_flags,  # last, so they override the defaults
                str(sdk / "runtime.c"),
                *(str(s) for s in sources),
                *tools.libs,
                "-o",
                str(temp),
            ],
            what=f"compiling {names} with {tools.identity}",
        )
    return Path(output)


def build_js_guest(
    sources: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    cc: str | Toolchain | None = None,
) -> Path:
    """Link C ``sources`` (glue that uses QuickJS's API, ``quickjs.h``) with the
    QuickJS engine, the guest libc and the SDK runtime into guest ELF ``output``,
    as the bundled ``jsruntime`` is built (see :mod:`.jsruntime`)."""
    paths = [Path(s) for s in sources]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise GuestBuildError(f"source file(s) not found: {', '.join(missing) or 'none given'}")
    if not jsruntime.LIBC_DIR.is_dir():
        raise GuestBuildError("the JS guest's libc sources (guest/js/libc) are not installed")
    tools = cc if isinstance(cc, Toolchain) else toolchain.select(cc)
    jsruntime.build(Path(output), tools, paths, sdk_dir())
    return Path(output)


@contextlib.contextmanager
def atomic_output(output: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``output`` that becomes ``output`` (mode 0755)
    when the block ends without an exception; it is removed otherwise."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    temp = Path(name)
    try:
        yield temp
        os.chmod(temp, 0o755)
        os.replace(temp, output)
    finally:
        temp.unlink(missing_ok=True)


@dataclass(frozen=True)
class BundledGuest:
    """A guest built into the package: what it is made of and how to build it."""

    name: str
    #: Our own files it is built from (the stamp hashes them; pinned downloads
    #: are identified by their pins and never change).
    inputs: Callable[[], list[Path]]
    build: Callable[[Path, Toolchain], None]  # writes the ELF at the path given
    pins: tuple[fetch.Pin, ...] = ()
    #: The file it becomes in _bin (default: ``<name>.elf``).
    filename: str = ""

    def stamp(self, identity: str) -> str:
        """Changes whenever the ELF would: inputs, build code, pins, compiler."""
        digest = hashlib.sha256(identity.encode())
        for pin in self.pins:
            digest.update(f"\0{pin.key}:{pin.sha256}".encode())
        for path in sorted({*self.inputs(), *BUILD_DIR.glob("*.py")}):
            digest.update(f"\0{path.name}\0".encode())
            digest.update(path.read_bytes())
        return digest.hexdigest()


def _single_file_guest(name: str, source: Path) -> BundledGuest:
    def build(target: Path, tools: Toolchain) -> None:
        build_guest([source], target, cc=tools)

    return BundledGuest(name, lambda: [source, *sdk_files()], build)


def bundled_guests() -> dict[str, BundledGuest]:
    """The bundled guests whose sources are present, by name."""
    guests = {name: _single_file_guest(name, p) for name, p in bundled_sources().items()}
    js_dir = _SOURCE_GUEST_DIR / "js"
    if (js_dir / "jsruntime.c").is_file():
        guests["jsruntime"] = BundledGuest(
            "jsruntime",
            lambda: [*jsruntime.inputs(js_dir), *sdk_files()],
            lambda target, tools: jsruntime.build(
                target, tools, sorted(js_dir.glob("*.c")), sdk_dir(), js_dir / "libc"
            ),
            (fetch.QUICKJS, fetch.ZIGLANG),
        )
    return guests


def bundled_builds() -> dict[str, BundledGuest]:
    """Everything built into _bin: the bundled guests and, from a source
    checkout, the host helper library (:mod:`.native`)."""
    builds = bundled_guests()
    sources = [_SOURCE_NATIVE_DIR / name for name in native.SOURCES]
    if all(source.is_file() for source in sources):

        def build(target: Path, tools: Toolchain) -> None:
            with atomic_output(target) as temp:
                native.build(temp, tools, sources)

        builds["libhlwait"] = BundledGuest(
            "libhlwait", lambda: list(sources), build, (), native.LIBRARY
        )
    return builds


def build_bundled(
    destination: Path | None = None,
    *,
    only_stale: bool = False,
    names: Iterable[str] | None = None,
    cc: str | None = None,
    stamps: bool = True,
) -> list[Path]:
    """Compile the bundled guests (``names``, default all) into ``destination``
    (default: the package's _bin); with ``only_stale``, only those whose stamp
    (inputs, build code, pins, compiler) changed since they were built. A
    wheel's guests are never rebuilt: it is built with ``stamps=False``."""
    destination = destination or BUNDLED_DIR
    guests = bundled_builds()
    wanted = list(guests) if names is None else [n for n in names if n in guests]
    built = []
    identity = toolchain.describe(cc)
    tools: Toolchain | None = None
    for name in wanted:
        guest = guests[name]
        target = destination / (guest.filename or f"{name}.elf")
        stamp_file = destination / f".{name}.stamp"
        stamp = guest.stamp(identity)
        if only_stale and target.exists():
            try:
                if stamp_file.read_text() == stamp:
                    continue
            except OSError:
                pass
        tools = tools or toolchain.select(cc)
        guest.build(target, tools)
        if stamps:
            stamp_file.write_text(stamp)
        built.append(target)
    return built
