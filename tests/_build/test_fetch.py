"""Pinned downloads: pip fetches a file, its sha256 is checked, it is extracted
into the cache once and reused; a wrong file leaves nothing behind.

The tests serve a small wheel of their own from a local folder (pip's
``--no-index --find-links``), so they need no network.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

from hlasync._build import fetch
from hlasync._build.errors import FetchError

WHEEL = "hlfake-1.0-py3-none-any.whl"


def make_wheel(folder: Path, payload: bytes = b"payload") -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / WHEEL
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("hlfake/data.txt", payload)
        tool = zipfile.ZipInfo("hlfake/bin/tool")
        tool.external_attr = 0o100755 << 16
        wheel.writestr(tool, "#!/bin/sh\necho tool\n")
        wheel.writestr("hlfake/unwanted.txt", "not extracted")
        info = "hlfake-1.0.dist-info"
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: hlfake\nVersion: 1.0\n")
        wheel.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr(f"{info}/RECORD", "")
    return path


def pin_for(wheel: Path, sha256: str | None = None) -> fetch.Pin:
    digest = sha256 or hashlib.sha256(wheel.read_bytes()).hexdigest()
    return fetch.Pin("hlfake", "1.0", digest, WHEEL, members=("hlfake/data.txt", "hlfake/bin/"))


def local(folder: Path) -> tuple[str, ...]:
    return ("--no-index", "--find-links", str(folder))


def test_fetch_extracts_the_members_and_reuses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = make_wheel(tmp_path / "index")
    pin = pin_for(wheel)
    root = tmp_path / "cache"
    directory = fetch.fetch(pin, root=root, index_args=local(tmp_path / "index"))
    assert directory == root / "hlfake-1.0"
    assert (directory / "hlfake" / "data.txt").read_bytes() == b"payload"
    assert os.access(directory / "hlfake" / "bin" / "tool", os.X_OK)
    assert not (directory / "hlfake" / "unwanted.txt").exists()
    assert fetch.cached(pin, root) == directory

    def no_pip(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pip ran although the cache holds the pin")

    monkeypatch.setattr(subprocess, "run", no_pip)
    assert fetch.fetch(pin, root=root) == directory


def test_a_damaged_cache_is_fetched_again(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "index")
    pin = pin_for(wheel)
    root = tmp_path / "cache"
    directory = fetch.fetch(pin, root=root, index_args=local(tmp_path / "index"))
    # The manifest records every file's size: a truncated or missing file is noticed.
    (directory / "hlfake" / "data.txt").write_bytes(b"pay")
    assert fetch.cached(pin, root) is None
    assert fetch.fetch(pin, root=root, index_args=local(tmp_path / "index")) == directory
    assert (directory / "hlfake" / "data.txt").read_bytes() == b"payload"


def test_pip_refuses_a_file_with_another_hash(tmp_path: Path) -> None:
    wheel = make_wheel(tmp_path / "index")
    pin = pin_for(wheel, sha256="0" * 64)
    root = tmp_path / "cache"
    with pytest.raises(FetchError, match=r"pip could not download hlfake==1\.0") as info:
        fetch.fetch(pin, root=root, index_args=local(tmp_path / "index"))
    assert "HLASYNC_CACHE_DIR" in str(info.value)  # says what to do
    assert "hash" in info.value.output.lower()  # pip's own report
    assert sorted(p.name for p in root.iterdir()) == [".hlfake-1.0.lock"]


def test_our_own_check_refuses_a_file_with_another_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Should pip hand over another file (a broken mirror, a pip that skips the
    # check), hlasync's own sha256 check refuses it before extracting anything.
    pinned = pin_for(make_wheel(tmp_path / "index"))
    other = make_wheel(tmp_path / "other", payload=b"tampered")

    def fake_pip(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        destination = Path(command[command.index("-d") + 1])
        destination.mkdir(parents=True)
        (destination / WHEEL).write_bytes(other.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    root = tmp_path / "cache"
    with pytest.raises(FetchError, match=f"has sha256 .* but {pinned.sha256} is pinned"):
        fetch.fetch(pinned, root=root)
    assert sorted(p.name for p in root.iterdir()) == [".hlfake-1.0.lock"]


def test_no_index_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    pin = pin_for(make_wheel(tmp_path / "index"))
    with pytest.raises(FetchError, match="fetches it once from the package index"):
        fetch.fetch(pin, root=tmp_path / "cache", index_args=local(empty))


def test_the_cache_location(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HLASYNC_CACHE_DIR", str(tmp_path / "mine"))
    assert fetch.cache_root() == tmp_path / "mine"
    monkeypatch.delenv("HLASYNC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert fetch.cache_root() == tmp_path / "xdg" / "hlasync"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert fetch.cache_root() == tmp_path / "home" / ".cache" / "hlasync"


@pytest.mark.parametrize("pin", [fetch.QUICKJS, fetch.ZIGLANG], ids=lambda p: p.key)
def test_the_pins_are_in_the_cache_after_a_build(pin: fetch.Pin) -> None:
    # Building the bundled jsruntime (pip install, or guests.path) fetched both.
    from hlasync import guests

    guests.path("jsruntime")
    directory = fetch.cached(pin)
    assert directory is not None
    expected = {"quickjs-ng": "upstream-quickjs/quickjs.c", "ziglang": "ziglang/zig"}
    assert (directory / expected[pin.name]).is_file()
