"""Port of the unit tests of hyperlight-js ``src/hyperlight-js/src/sandbox/metrics.rs``."""

from __future__ import annotations

import pytest

from ._missing import SKIP_RUST_METRICS


@pytest.mark.skip(reason=SKIP_RUST_METRICS)
def test_metrics() -> None:
    """metrics.rs ``test_metrics`` (``#[ignore]`` upstream): building, loading and
    calling a sandbox records 7 metrics (8 with ``function_call_metrics``)."""
