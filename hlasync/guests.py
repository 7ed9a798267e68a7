"""The guests bundled with hlasync.

``hlasync.guests.path("simpleguest")`` is the compiled bundled guest; the
functions it exports are listed in ``docs/guest-sdk.md``.
"""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

from . import _build
from .errors import GuestImageError

__all__ = ["names", "path"]

_lock = threading.Lock()


def names() -> list[str]:
    """Names of the bundled guests."""
    found = {p.stem for p in _build.BUNDLED_DIR.glob("*.elf")}
    found.update(_build.bundled_guests())
    return sorted(found)


def path(name: str) -> Path:
    """Path of bundled guest ``name``.

    Guests are compiled during installation. In a source checkout a guest
    whose sources, build code or compiler changed since is rebuilt first.
    """
    sources = _build.bundled_guests()
    target = _build.BUNDLED_DIR / f"{name}.elf"
    if name not in sources and not target.exists():
        raise GuestImageError(
            f"no bundled guest named {name!r} (available: {', '.join(names()) or 'none'})"
        )
    if name in sources and _build._SOURCE_GUEST_DIR.is_dir():
        with _lock:
            try:
                _build.build_bundled(only_stale=True, names=[name])
            except _build.GuestBuildError as exc:
                if not target.exists():
                    raise GuestImageError(f"bundled guest {name!r} is not built: {exc}") from None
                warnings.warn(
                    f"rebuilding the bundled guests failed, using the stale {target}: {exc}",
                    RuntimeWarning,
                    stacklevel=2,
                )
    if not target.exists():
        raise GuestImageError(f"bundled guest {name!r} is missing from the installation")
    return target
