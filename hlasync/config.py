"""Sandbox configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .crashdump.placement import RetentionPolicy
from .errors import ConfigError

__all__ = ["SandboxConfig"]

KiB = 1024
MiB = 1024 * KiB
PAGE = 4 * KiB
#: Largest guest memory: the page tables live below 1 MiB (128 tables of 2 MiB each).
MAX_MEMORY = 256 * MiB
MIN_MEMORY = 2 * MiB


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """Sizes of a sandbox's guest memory and behaviour switches.

    All sizes are bytes and multiples of 4 KiB. ``heap_size=None`` gives the
    heap all memory left after the image, stack and buffers.

    ``crashdump_enabled`` writes a core dump on faults, aborts, protocol
    errors and watchdog timeouts; ``crashdump_dir`` overrides the directory
    (else ``HYPERLIGHT_CORE_DUMP_DIR``, else the system temp directory) and
    ``crashdump_retention`` bounds how many dumps that directory keeps.
    ``init_timeout`` bounds the guest's initialisation (from its entry point
    to its dispatcher) in seconds.
    """

    memory_size: int = 8 * MiB
    stack_size: int = 256 * KiB
    heap_size: int | None = None
    input_buffer_size: int = 256 * KiB
    output_buffer_size: int = 256 * KiB
    crashdump_enabled: bool = True
    crashdump_dir: str | os.PathLike[str] | None = None
    crashdump_retention: RetentionPolicy | None = None
    init_timeout: float = 10.0

    def __post_init__(self) -> None:
        for name in ("memory_size", "stack_size", "input_buffer_size", "output_buffer_size"):
            _check_size(name, getattr(self, name))
        if self.heap_size is not None:
            _check_size("heap_size", self.heap_size)
        if not MIN_MEMORY <= self.memory_size <= MAX_MEMORY:
            raise ConfigError(
                f"memory_size must be between {MIN_MEMORY // MiB} MiB and "
                f"{MAX_MEMORY // MiB} MiB, got {self.memory_size}"
            )
        if self.input_buffer_size < 4 * KiB or self.output_buffer_size < 4 * KiB:
            raise ConfigError("input and output buffers must be at least 4 KiB")
        if self.stack_size < 8 * KiB:
            raise ConfigError("stack_size must be at least 8 KiB")
        if (
            isinstance(self.init_timeout, bool)
            or not isinstance(self.init_timeout, (int, float))
            or not 0 < self.init_timeout <= 3600
        ):
            raise ConfigError(
                f"init_timeout must be a number of seconds in (0, 3600], got {self.init_timeout!r}"
            )
        if not isinstance(self.crashdump_enabled, bool):
            raise ConfigError("crashdump_enabled must be a bool")
        path_types = (str, os.PathLike)
        if self.crashdump_dir is not None and not isinstance(self.crashdump_dir, path_types):
            raise ConfigError("crashdump_dir must be a path or None")
        if self.crashdump_retention is not None and not isinstance(
            self.crashdump_retention, RetentionPolicy
        ):
            raise ConfigError("crashdump_retention must be a RetentionPolicy or None")


def _check_size(name: str, value: object) -> None:
    if type(value) is not int:
        raise ConfigError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0 or value % PAGE:
        raise ConfigError(f"{name} must be a positive multiple of 4096, got {value}")
