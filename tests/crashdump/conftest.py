"""Fixtures shared by the crash dump tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from hlasync import _build


@pytest.fixture(scope="session")
def rebuilt_simpleguest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``simpleguest.elf`` rebuilt from changed sources: same name, another build-id."""
    source = tmp_path_factory.mktemp("rebuilt") / "simpleguest.c"
    source.write_text(
        _build.bundled_sources()["simpleguest"].read_text()
        + "\nint64_t rebuilt(void) { return 7; }\nHL_EXPORT(rebuilt, HL_INT);\n"
    )
    return _build.build_guest([source], source.with_suffix(".elf"))
