"""Compiles the bundled guests during installation (see hlasync/_build/)."""

import importlib.util
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load_builder():  # type: ignore[no-untyped-def]
    # hlasync/_build is loaded on its own, as a package: hlasync/__init__.py
    # imports dependencies that do not exist yet.
    directory = ROOT / "hlasync" / "_build"
    spec = importlib.util.spec_from_file_location(
        "_hlasync_build", directory / "__init__.py", submodule_search_locations=[str(directory)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for its relative imports
    spec.loader.exec_module(module)
    return module


class BuildPyWithGuests(build_py):
    def run(self) -> None:
        super().run()
        builder = _load_builder()
        if getattr(self, "editable_mode", False):
            builder.build_bundled(ROOT / "hlasync" / "_bin")
            return
        package = Path(self.build_lib) / "hlasync"
        shutil.copytree(ROOT / "guest" / "sdk", package / "_sdk", dirs_exist_ok=True)
        shutil.copytree(ROOT / "guest" / "guests", package / "_guests", dirs_exist_ok=True)
        builder.build_bundled(package / "_bin", stamps=False)


setup(cmdclass={"build_py": BuildPyWithGuests})
