"""The SDK dispatcher's doorbell (issue #12, first part): calls are announced
on the doorbell page, the dispatcher runs only announced calls, and with a
spin budget it serves calls posted through shared memory without a VM exit.

The last test drives the protocol by hand (a thread in ``KVM_RUN``, this
thread posting calls), as the exit-less call path will: it shows that the
guest side works on this host and what a round trip costs before any
host-side machinery is built on it.
"""

from __future__ import annotations

import statistics
import struct
import threading
import time

from hlasync import Sandbox, abi
from hlasync.kvm.exits import Exit, IoOut
from hlasync.sandbox import native, runner

_U64 = struct.Struct("<Q")


def _word(sb: Sandbox, address: int) -> int:
    return int(_U64.unpack(sb.read_memory(address, 8))[0])


def test_the_guest_says_it_has_a_doorbell(sandbox: Sandbox) -> None:
    features = abi.READY.unpack_from(sandbox._machine.output, 0)[3]
    assert features & abi.FEATURE_DOORBELL
    assert sandbox._doorbell


def test_every_call_is_announced_and_acknowledged(sandbox: Sandbox) -> None:
    for n in range(1, 6):
        assert sandbox.call("add", n, 1) == n + 1
        assert _word(sandbox, abi.DOORBELL_REQ_SEQ) == n
        assert _word(sandbox, abi.DOORBELL_DONE_SEQ) == n
    sandbox.restore()  # the doorbell page is guest memory: back to the snapshot
    assert _word(sandbox, abi.DOORBELL_REQ_SEQ) == 0
    assert _word(sandbox, abi.DOORBELL_DONE_SEQ) == 0
    assert sandbox.call("add", 2, 2) == 4


def test_a_dispatcher_resumed_without_a_new_call_parks_again(sandbox: Sandbox) -> None:
    """Resuming the guest never replays the last call frame: with no new
    ``req_seq`` the dispatcher goes straight back to its park exit."""
    assert sandbox.call("increment") == 1
    machine = sandbox._machine
    exit_ = machine.vcpu.run()  # no call posted
    assert isinstance(exit_, IoOut) and exit_.port == abi.PORT_RETURN
    assert _word(sandbox, abi.DOORBELL_DONE_SEQ) == 1
    assert sandbox.call("increment") == 2  # the state is that of one call, not two


def test_a_spinning_dispatcher_serves_calls_without_exits(sandbox: Sandbox) -> None:
    machine = sandbox._machine
    vcpu = machine.vcpu
    signature = sandbox.functions["add"]
    encode = sandbox._encoders["add"]
    ticks_per_second = vcpu.tsc_khz() * 1000
    exits: list[Exit] = []
    posted = 300

    def hot() -> None:
        exits.append(vcpu.run())

    with sandbox._operation("doorbell test"):  # nothing else may use the vCPU meanwhile
        words = machine.bell  # whole 8-byte words: the guest runs meanwhile
        words[abi.WORD_SPIN] = ticks_per_second  # 1 s
        thread = threading.Thread(target=hot)
        thread.start()
        deadline = time.monotonic() + 10
        while not words[abi.WORD_SPINNING]:
            assert time.monotonic() < deadline, "the dispatcher never started spinning"
        round_trips, results = [], []
        for n in range(posted):  # this thread polls in Python
            start = time.perf_counter_ns()
            encode(machine.input, (n, 1000))
            seq = runner.post(sandbox)
            while words[abi.WORD_DONE_SEQ] != seq:
                assert time.monotonic() < deadline, f"call {n} was not answered"
            results.append(abi.read_result(machine.output, signature.returns)[0])
            round_trips.append(time.perf_counter_ns() - start)
        assert machine.memory is not None
        done = machine.memory.address + abi.DOORBELL_DONE_SEQ
        flag = native.Flag()
        native_trips = []
        for n in range(posted, 2 * posted):  # the helper library waits, without the GIL
            start = time.perf_counter_ns()
            encode(machine.input, (n, 1000))
            seq = runner.post(sandbox)
            outcome = native.wait(done, seq, flag, spin_ns=1_000_000, timeout_ns=10**10)
            assert outcome == native.WAIT_WORD, f"call {n} was not answered"
            results.append(abi.read_result(machine.output, signature.returns)[0])
            native_trips.append(time.perf_counter_ns() - start)
        assert not exits, "a call through the doorbell left KVM_RUN"
        words[abi.WORD_SPIN] = 0  # park
        thread.join(10)
        assert not thread.is_alive()
    assert results == [n + 1000 for n in range(2 * posted)]
    # One KVM_RUN for all the calls: it ended with the park, nothing else.
    assert len(exits) == 1 and isinstance(exits[0], IoOut) and exits[0].port == abi.PORT_RETURN
    print(
        f"doorbell round trip p50: {statistics.median(round_trips) / 1000:.1f} us polling "
        f"in Python, {statistics.median(native_trips) / 1000:.1f} us with the helper library"
    )
    assert sandbox.call("add", 40, 2) == 42  # the exit path goes on from the park
