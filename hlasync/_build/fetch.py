"""Third-party files the guests are built from, fetched from the package index.

Nothing third-party is copied into the repository: the QuickJS sources (the
``quickjs-ng`` sdist) and the zig toolchain with musl's sources and headers
(the ``ziglang`` wheel) are downloaded with pip, so proxies and mirrors
configured for pip keep working. Each is pinned by version and sha256
(:data:`QUICKJS`, :data:`ZIGLANG`), checked twice (pip's ``--require-hashes``
and our own hash), extracted once into the cache and reused from there.

Cache: ``$HLASYNC_CACHE_DIR``, else ``$XDG_CACHE_HOME/hlasync``, else
``~/.cache/hlasync``; one directory per pin, ``<name>-<version>``. A directory
appears only complete (extracted beside it, then renamed) and carries a
manifest of its files; one whose manifest does not match what is on disk is
fetched again.

Standard library only: ``setup.py`` loads it before hlasync's dependencies exist.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import FetchError

__all__ = ["QUICKJS", "ZIGLANG", "Pin", "cache_root", "cached", "fetch"]

MANIFEST = ".hlasync-fetched.json"


@dataclass(frozen=True)
class Pin:
    """One file of the package index, pinned, and the part of it we extract."""

    name: str  # project name on the index
    version: str
    sha256: str
    filename: str  # the exact file (a wheel's tags name its platform)
    #: Archive paths to extract (a prefix ending in "/" takes a whole folder); an
    #: sdist's top folder ``<name>-<version>/`` is stripped first.
    members: tuple[str, ...]
    #: pip's ``--platform`` for a binary wheel, so that exactly this file is chosen.
    platform: str | None = None

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")


#: The QuickJS engine (quickjs-ng): its C sources ship in the sdist's ``upstream-quickjs/``.
QUICKJS = Pin(
    name="quickjs-ng",
    version="0.17.0.2",
    sha256="43d2e48272208721a7aaea8e3f02d4b9318f12ef20cc4f5421b59d9a470706ef",
    filename="quickjs_ng-0.17.0.2.tar.gz",
    members=("upstream-quickjs/", "LICENSE"),
)

#: zig 0.13.0: clang 18 as ``zig cc`` plus lld, and musl's sources and headers.
#: Stay on 0.13: later wheels dropped sin, floor, fabs, sqrt... from musl's src/math.
#: Only what ``zig cc`` and the JS guest use is extracted (about 210 of 310 MB).
ZIGLANG = Pin(
    name="ziglang",
    version="0.13.0",
    sha256="3ce0c9f16547e5d61b32e0d226926e9a2552ef4b91fccf7ab5ea1a623a77824b",
    filename="ziglang-0.13.0-py3-none-manylinux_2_12_x86_64.manylinux2010_x86_64.musllinux_1_1_x86_64.whl",
    members=(
        "ziglang/zig",
        "ziglang/LICENSE",
        # zig finds its lib folder by std/std.zig and builds compiler_rt from it
        "ziglang/lib/std/",
        "ziglang/lib/compiler_rt/",
        "ziglang/lib/compiler_rt.zig",
        "ziglang/lib/c.zig",
        "ziglang/lib/include/",  # clang's own headers (stdatomic.h, ...)
        "ziglang/lib/libc/musl/",
        "ziglang/lib/libc/include/x86_64-linux-musl/",
        "ziglang/lib/libc/include/generic-musl/",
        "ziglang/lib/libc/include/any-linux-any/",
    ),
    platform="manylinux_2_12_x86_64",
)


def cache_root() -> Path:
    """Where fetched files and build products are cached."""
    if os.environ.get("HLASYNC_CACHE_DIR"):
        return Path(os.environ["HLASYNC_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "hlasync"


def cached(pin: Pin, root: Path | None = None) -> Path | None:
    """The pin's extracted directory if it is in the cache and intact, else None."""
    directory = (root or cache_root()) / pin.key
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("sha256") != pin.sha256:
        return None
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return None
    for relative, size in files.items():
        try:
            if (directory / relative).stat().st_size != size:
                return None
        except OSError:
            return None
    return directory


def fetch(pin: Pin, *, root: Path | None = None, index_args: Sequence[str] = ()) -> Path:
    """The pin's extracted directory, downloaded and extracted first if needed.

    ``index_args`` are extra pip options (the tests point pip at a local folder).
    Raises :class:`FetchError` when pip fails or the file's sha256 is not the pinned
    one; nothing is left in the cache then.
    """
    root = root or cache_root()
    found = cached(pin, root)
    if found is not None:
        return found
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FetchError(
            f"cannot create the cache directory {root}: {exc}; set HLASYNC_CACHE_DIR to a "
            "writable directory"
        ) from None
    with _locked(root / f".{pin.key}.lock"):
        found = cached(pin, root)  # another process may have fetched it meanwhile
        if found is not None:
            return found
        with tempfile.TemporaryDirectory(prefix=f".{pin.key}.", dir=root) as work:
            archive = _download(pin, Path(work) / "download", index_args)
            tree = Path(work) / "tree"
            files = _extract(pin, archive, tree)
            manifest = {
                "name": pin.name,
                "version": pin.version,
                "sha256": pin.sha256,
                "files": files,
            }
            (tree / MANIFEST).write_text(json.dumps(manifest, indent=0, sort_keys=True))
            final = root / pin.key
            if final.exists():  # an incomplete or damaged earlier copy
                shutil.rmtree(final)
            tree.rename(final)
    return final


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (a build and a test run may fetch at once)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download(pin: Pin, directory: Path, index_args: Sequence[str]) -> Path:
    directory.mkdir()
    requirements = directory / "requirements.txt"
    requirements.write_text(f"{pin.name}=={pin.version} --hash=sha256:{pin.sha256}\n")
    if pin.is_wheel:
        kind = ["--only-binary", ":all:"]
        if pin.platform:
            kind += ["--platform", pin.platform]
    else:
        kind = ["--no-binary", ":all:"]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--require-hashes",
        "--disable-pip-version-check",
        "--no-input",
        "-r",
        str(requirements),
        *kind,
        *index_args,
        "-d",
        str(directory / "files"),
    ]
    # pip's build isolation (we may run inside `pip install`) hides the real
    # site-packages through PYTHONPATH; the pip we start needs them back.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=900, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FetchError(f"could not run pip to download {pin.filename}: {exc}") from None
    if result.returncode != 0:
        raise FetchError(
            f"pip could not download {pin.name}=={pin.version} ({pin.filename}, sha256 "
            f"{pin.sha256}). hlasync fetches it once from the package index pip is set up for "
            f"(PyPI, a mirror or a proxy) and keeps it in {cache_root()}. Without network: "
            "copy that directory from a machine that has it and point HLASYNC_CACHE_DIR at it.",
            result.stdout + result.stderr,
        )
    archive = directory / "files" / pin.filename
    if not archive.is_file():
        got = sorted(p.name for p in (directory / "files").iterdir())
        raise FetchError(f"pip downloaded {got}, not the pinned file {pin.filename}")
    digest = _sha256(archive)
    if digest != pin.sha256:
        raise FetchError(
            f"{pin.filename} has sha256 {digest}, but {pin.sha256} is pinned "
            "(hlasync/_build/fetch.py): the index served another file. Nothing was "
            "extracted; check the index or mirror pip uses."
        )
    return archive


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _wanted(pin: Pin, name: str) -> bool:
    return any(name == m or (m.endswith("/") and name.startswith(m)) for m in pin.members)


def _safe(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise FetchError(f"refusing archive member {name!r}: it points outside the cache")
    return path


def _extract(pin: Pin, archive: Path, tree: Path) -> dict[str, int]:
    """Extract the pin's members into ``tree``; return {relative path: size}."""
    files: dict[str, int] = {}
    tree.mkdir()
    if pin.is_wheel:
        with zipfile.ZipFile(archive) as wheel:
            for info in wheel.infolist():
                if info.is_dir() or not _wanted(pin, info.filename):
                    continue
                target = tree / _safe(info.filename)
                target.parent.mkdir(parents=True, exist_ok=True)
                with wheel.open(info) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink, 1 << 20)
                if (info.external_attr >> 16) & 0o111:  # keep the zig binary executable
                    target.chmod(0o755)
                files[info.filename] = info.file_size
    else:
        prefix = f"{archive.name.removesuffix('.tar.gz')}/"
        with tarfile.open(archive, "r:gz") as sdist:
            for member in sdist.getmembers():
                name = member.name.removeprefix(prefix)
                if not member.isfile() or not _wanted(pin, name):
                    continue
                target = tree / _safe(name)
                target.parent.mkdir(parents=True, exist_ok=True)
                data = sdist.extractfile(member)
                assert data is not None  # a regular file
                with data, open(target, "wb") as sink:
                    shutil.copyfileobj(data, sink, 1 << 20)
                files[name] = member.size
    missing = [m for m in pin.members if not any(f.startswith(m) for f in files)]
    if missing:
        raise FetchError(f"{pin.filename} lacks {', '.join(missing)}: is the pin right?")
    return files
