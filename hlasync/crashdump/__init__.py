"""ELF core dumps of guests: writing, placement and reading.

Dumps are written by :meth:`hlasync.Sandbox.generate_crashdump` and
automatically on guest faults, aborts and protocol errors; read them with
:class:`CoreDump` (or gdb, lldb, readelf).
"""

from .placement import DUMP_DIR_ENV, DUMP_GLOB, RetentionPolicy, resolve_directory
from .reader import CoreDump, DumpRegion, Frame
from .signals import dump_all_sandboxes, install_dump_signal, manifest_path
from .writer import CrashContext

__all__ = [
    "DUMP_DIR_ENV",
    "DUMP_GLOB",
    "CoreDump",
    "CrashContext",
    "DumpRegion",
    "Frame",
    "RetentionPolicy",
    "dump_all_sandboxes",
    "install_dump_signal",
    "manifest_path",
    "resolve_directory",
]
