"""Argument validation fuzzed with hypothesis: any Python values for any guest
function give a result or ArgumentError, never another error or a hang."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hlasync import ArgumentError, FunctionNotFound, Sandbox, SandboxState
from hlasync.kvm import Kvm
from tests.conftest import fuzz_examples

SAFE = [
    "add",
    "echo",
    "echo_bytes",
    "sum_bytes",
    "add_float",
    "negate",
    "format_pair",
    "increment",
    "write_sentinel",
    "spin_for",
    "heap_roundtrip",
]

values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300),
    st.binary(max_size=300),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@pytest.fixture(scope="module")
def fuzz_sandbox(kvm: Kvm, simpleguest: Path) -> Iterator[Sandbox]:
    with Sandbox(simpleguest, output=lambda text: None) as sb:
        yield sb


@settings(
    max_examples=fuzz_examples(400),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=st.sampled_from(SAFE), args=st.lists(values, max_size=4))
def test_any_arguments_give_a_result_or_argument_error(
    fuzz_sandbox: Sandbox, name: str, args: list[object]
) -> None:
    if name == "spin_for":
        args = [a if not isinstance(a, int) or isinstance(a, bool) else a % 10_000 for a in args]
    if name == "heap_roundtrip":
        args = [a if not isinstance(a, int) or isinstance(a, bool) else a % 100_000 for a in args]
    try:
        result = fuzz_sandbox.call(name, *args)  # type: ignore[arg-type]
    except ArgumentError as exc:
        assert exc.function == name and exc.sandbox_id == fuzz_sandbox.id
    else:
        if name == "add":
            assert result == ((args[0] + args[1] + 2**63) % 2**64) - 2**63  # type: ignore[operator]
        elif name in ("echo", "echo_bytes"):
            assert result == args[0]
        elif name == "add_float":
            expected = float(args[0]) + float(args[1])  # type: ignore[arg-type]
            assert result == expected or (math.isnan(expected) and math.isnan(result))  # type: ignore[arg-type]
    assert fuzz_sandbox.state is SandboxState.READY


@settings(
    max_examples=fuzz_examples(100),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=st.text(max_size=50))
def test_unknown_names_are_function_not_found(fuzz_sandbox: Sandbox, name: str) -> None:
    if name in fuzz_sandbox.functions:
        return
    with pytest.raises(FunctionNotFound):
        fuzz_sandbox.call(name)
