"""Arguments and host function results that cannot cross, seen from a sandbox:
the error says why, and guest memory keeps nothing of a refused frame."""

from __future__ import annotations

from pathlib import Path

import pytest

from hlasync import ArgumentError, HostFunctionError, Sandbox, SandboxConfig, SandboxState
from hlasync.kvm import Kvm

MARKER = "refused-argument-"


def test_refused_call_leaves_nothing_in_the_input_buffer(kvm: Kvm, simpleguest: Path) -> None:
    config = SandboxConfig(input_buffer_size=8 << 10)
    with Sandbox(simpleguest, config) as sb:
        before = sb.read_memory(sb.layout.input_addr, sb.layout.input_size)
        # The first string fits, the second does not: nothing at all may be written,
        # or the next caller of a pooled sandbox could read the first.
        with pytest.raises(ArgumentError, match="input_buffer_size"):
            sb.call("call_host_str", MARKER * 100, "x" * (8 << 10))
        after = sb.read_memory(sb.layout.input_addr, sb.layout.input_size)
        assert after == before
        assert MARKER.encode() not in after
        assert sb.state is SandboxState.READY


def test_lone_surrogate_argument_is_an_encoding_error(kvm: Kvm, simpleguest: Path) -> None:
    with Sandbox(simpleguest) as sb:
        with pytest.raises(ArgumentError, match="not valid UTF-8 text: lone surrogate") as info:
            sb.call("echo", "a\ud800b")
        assert "input buffer" not in str(info.value)
        assert sb.call("echo", "ok") == "ok"


@pytest.mark.parametrize(
    ("result", "explanation"),
    [
        ([1, 2], "returned a list; host functions may return int, float, bool, str, bytes or None"),
        ("a\udc80", "returned a str that is not valid UTF-8 text: lone surrogate"),
    ],
    ids=["list", "surrogate"],
)
def test_unsendable_host_result_is_explained(
    kvm: Kvm, simpleguest: Path, result: object, explanation: str
) -> None:
    with Sandbox(simpleguest) as sb:
        sb.register_host_function("give", lambda _text: result)
        with pytest.raises(HostFunctionError) as info:
            sb.call("call_host_str", "give", "x")
        assert str(info.value.__cause__).startswith(explanation)
        # Said as what happened: the function returned; it did not raise.
        assert info.value.message.startswith(f"host function 'give' {explanation}")
        assert "raised" not in info.value.message
        assert sb.state is SandboxState.READY
