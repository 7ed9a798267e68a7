"""Why a ported hyperlight-js test does not pass against hlasync.js today.

One constant per capability that hlasync.js lacks (issue 19): a test that
needs it is marked ``@xfail(CONSTANT, ...)``, which is
``pytest.mark.xfail(strict=True, reason=...)``; once the capability exists,
the strict mark turns the test red until the mark is removed. ``DELIBERATE_*``
reasons mark differences that stay (the test documents them); ``SKIP_*``
reasons, tests that cannot be expressed against hlasync at all.
"""

from __future__ import annotations

import pytest

__all__ = [
    "DELIBERATE_CONSUMED",
    "DELIBERATE_TIMEOUT_MAX",
    "SKIP_BUILDER",
    "SKIP_HOST_MODULE_OBJECT",
    "SKIP_RUST_CPU_CLOCK",
    "SKIP_RUST_EMBEDDED_FS",
    "SKIP_RUST_METRICS",
    "SKIP_RUST_MONITOR_FUTURE",
    "SKIP_WINDOWS_ONLY",
    "xfail",
]

# ------------------------------------------------------------ missing (issue 19)

# ------------------------------------------------------- deliberate differences
DELIBERATE_CONSUMED = (
    "deliberate: one JSSandbox object serves every stage (add, load, call, reload), so "
    "nothing is consumed; the Node binding's builder/proto/loaded objects are consumed "
    "by each transition and refuse later use (ERR_CONSUMED)"
)
DELIBERATE_TIMEOUT_MAX = (
    "deliberate: the Node binding caps timeouts at one hour because JavaScript's "
    "ToUint32 turns -1 into 49.7 days; Python has no such wrap (negative timeouts are "
    "refused) and the Rust API has no cap either"
)

# ----------------------------------------------------------- cannot be expressed
SKIP_BUILDER = (
    "Node binding only: hlasync has no SandboxBuilder or proto sandbox object to chain, "
    "consume or build twice; sizes are keyword arguments of JSSandbox()/default_config()"
)
SKIP_HOST_MODULE_OBJECT = (
    "Node binding only: hlasync has no HostModule builder object; "
    "register_host_function(module, name, fn) is one call (tested by the other ports)"
)
SKIP_RUST_EMBEDDED_FS = (
    "Rust only: tests the embed_modules! file system's metadata (is_dir/is_file); "
    "hlasync registers modules by name (add_module), with no directories"
)
SKIP_RUST_METRICS = (
    "Rust only: counts the metrics crate's recorded metrics; hlasync has no such recorder"
)
SKIP_RUST_CPU_CLOCK = (
    "Rust only: tests the monitor's per-thread CPU clock handle; the observable part "
    "(cpu_timeout stops a handler) is ported from monitors.rs"
)
SKIP_RUST_MONITOR_FUTURE = (
    "Rust only: tests the future a monitor returns; the observable part (a limit "
    "accepted and reusable across calls) is ported from monitors.rs"
)
SKIP_WINDOWS_ONLY = "upstream runs it on Windows only (TSC tick conversion)"


def xfail(*reasons: str) -> pytest.MarkDecorator:
    """``pytest.mark.xfail(strict=True)`` for what hlasync lacks (or deliberately differs in)."""
    return pytest.mark.xfail(strict=True, reason="; ".join(reasons))
