"""ELF core dumps of guests: writing, placement and reading.

Dumps are written by :meth:`hlasync.Sandbox.generate_crashdump` and
automatically on guest faults, aborts and protocol errors; read them with
:class:`CoreDump` (or gdb, lldb, readelf).
"""

from .placement import DUMP_DIR_ENV, RetentionPolicy, resolve_directory
from .writer import CrashContext

__all__ = ["DUMP_DIR_ENV", "CrashContext", "RetentionPolicy", "resolve_directory"]
