"""Tests of hlasync.ray on real local Ray clusters."""

from __future__ import annotations

import os
from typing import Any

import pytest


def require_ray() -> Any:
    """The ray module; skip without it, fail in CI (HLASYNC_REQUIRE_KVM=1)."""
    try:
        import ray
    except ImportError:
        if os.environ.get("HLASYNC_REQUIRE_KVM") == "1":
            pytest.fail("ray is not installed (README's install command installs it)")
        pytest.skip("ray is not installed (python -m pip install -e '.[ray]')")
    return ray
