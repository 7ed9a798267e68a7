"""Errors cross process boundaries (the supervisor's worker processes): every
class pickles with its message, attributes and cause."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

import hlasync.errors as errors
from hlasync.errors import HlasyncError

SAMPLES: list[HlasyncError] = [
    errors.HlasyncError("root"),
    errors.KvmError("kvm"),
    errors.KvmUnavailableError("no /dev/kvm"),
    errors.IoctlError("KVM_RUN", 4, "Interrupted system call"),
    errors.ConfigError("bad size"),
    errors.GuestImageError("not an ELF", path="/tmp/x.elf"),
    errors.DebuggerError("cannot serve a debugger on 127.0.0.1:1234: Address already in use"),
    errors.CallError("call", sandbox_id="sb-1-1", function="f"),
    errors.FunctionNotFound("no such function", sandbox_id="sb-1-1", function="f"),
    errors.ArgumentError("bad argument", sandbox_id="sb-1-1", function="f"),
    errors.SandboxStateError("state", sandbox_id="sb-1-1"),
    errors.SandboxPoisoned("poisoned", sandbox_id="sb-1-1"),
    errors.SandboxBusy("busy", sandbox_id="sb-1-1"),
    errors.OwnerBusy("owner busy", sandbox_id="sb-1-1"),
    errors.SandboxClosed("closed", sandbox_id="sb-1-1"),
    errors.GuestError("guest", sandbox_id="sb-1-1", function="f", core_path=Path("/tmp/c")),
    errors.GuestCrashed(
        sandbox_id="sb-1-1",
        function="f",
        vector=14,
        vector_name="#PF",
        description="page fault",
        error_code=4,
        rip=0x1234,
        cr2=0x10,
        symbol="f+0x4",
        core_path=Path("/tmp/c"),
    ),
    errors.GuestAborted(sandbox_id="sb-1-1", function="f", code=3, guest_message="bye"),
    errors.GuestCancelled("cancelled", sandbox_id="sb-1-1", function="f"),
    errors.GuestProtocolError("protocol", sandbox_id="sb-1-1", function="f"),
    errors.GuestResultError("result", sandbox_id="sb-1-1", function="f"),
    errors.GuestTimeout(
        sandbox_id="sb-1-1", function="f", kind="cpu", limit=0.1, elapsed=0.2, core_path=None
    ),
    errors.HostFunctionError("host", sandbox_id="sb-1-1", function="f", host_function="h"),
    errors.JSError(sandbox_id="p", function="h", name="TypeError", js_message="x", stack="at h"),
    errors.JSSyntaxError(
        sandbox_id="p",
        function="h",
        name="SyntaxError",
        js_message="unexpected token",
        stack="",
        file="h.js",
        line=2,
        column=3,
    ),
    errors.JSResultError(sandbox_id="p", function="h", name="", js_message="undefined", stack=""),
    errors.SupervisorError("supervisor"),
    errors.SupervisorBusy("busy"),
    errors.SupervisorClosed("closed"),
    errors.WorkerLost("worker 0 died", worker=0, exit_status=-9),
    errors.CrashdumpError("no dump"),
    errors.InvalidCoreDump("not a core"),
]


def test_every_error_class_has_a_sample() -> None:
    classes = {
        getattr(errors, name)
        for name in errors.__all__
        if isinstance(getattr(errors, name), type) and issubclass(getattr(errors, name), Exception)
    }
    assert classes == {type(sample) for sample in SAMPLES}


@pytest.mark.parametrize("error", SAMPLES, ids=lambda e: type(e).__name__)
def test_errors_round_trip_through_pickle(error: HlasyncError) -> None:
    error.__dict__["extra"] = "set after construction"  # e.g. GuestTimeout.js_stack
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.args == error.args
    assert copy.__dict__ == error.__dict__
    if isinstance(error, OSError) and isinstance(copy, OSError):
        assert (copy.errno, copy.strerror) == (error.errno, error.strerror)


def test_causes_travel_too_and_unpicklable_ones_as_text() -> None:
    class Local(Exception):  # a class pickle cannot rebuild (two arguments, one in args)
        def __init__(self, a: str, b: int) -> None:
            super().__init__(a)
            self.b = b

    for cause, expected in ((KeyError("k"), KeyError("k")), (Local("l", 2), None)):
        error = errors.HostFunctionError("h", sandbox_id="s", function="f", host_function="h")
        error.__cause__ = cause
        copy = pickle.loads(pickle.dumps(error))
        if expected is not None:
            assert type(copy.__cause__) is type(expected) and copy.__cause__.args == expected.args
        else:
            assert isinstance(copy.__cause__, RuntimeError)
            assert str(copy.__cause__) == "Local: l"
