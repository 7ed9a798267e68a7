"""The build's exceptions::

GuestBuildError      the compiler, the linker or a download failed
 +-- FetchError      a pinned download failed or did not match its sha256
"""

from __future__ import annotations


class GuestBuildError(Exception):
    """Building a guest failed; ``output`` holds what the compiler (or pip) printed."""

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message + (f"\n{output}" if output else ""))
        self.output = output


class FetchError(GuestBuildError):
    """A pinned third-party file could not be fetched, or it is not the pinned one."""
