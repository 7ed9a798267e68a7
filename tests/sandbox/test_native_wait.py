"""The helper library's wait (``native/hl_wait.c``): it returns on the word,
on the flag or at its timeout, and it leaves the GIL to other threads."""

from __future__ import annotations

import ctypes
import threading
import time

from hlasync.sandbox import native


def _word() -> tuple[ctypes.c_uint64, int]:
    word = ctypes.c_uint64(0)
    return word, ctypes.addressof(word)


def test_a_word_that_is_already_there_returns_at_once() -> None:
    word, address = _word()
    word.value = 7
    assert native.wait(address, 7, native.Flag(), spin_ns=0, timeout_ns=0) == native.WAIT_WORD


def test_the_word_set_by_another_thread_ends_the_wait_and_others_run_meanwhile() -> None:
    word, address = _word()
    ticks = 0
    stop = threading.Event()

    def other_python_work() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1

    def answer() -> None:
        time.sleep(0.05)
        word.value = 3

    counter = threading.Thread(target=other_python_work)
    counter.start()
    threading.Thread(target=answer).start()
    try:
        time.sleep(0.005)
        before = ticks
        started = time.monotonic()
        outcome = native.wait(address, 3, native.Flag(), spin_ns=1_000_000, timeout_ns=10**10)
        elapsed = time.monotonic() - started
        during = ticks - before
    finally:
        stop.set()
        counter.join()
    assert outcome == native.WAIT_WORD
    assert 0.03 < elapsed < 5
    assert during > 1000, "the waiting thread held the GIL"


def test_a_raised_flag_ends_the_wait() -> None:
    _, address = _word()
    flag = native.Flag()
    threading.Timer(0.02, flag.wake).start()
    started = time.monotonic()
    assert native.wait(address, 1, flag, spin_ns=0, timeout_ns=10**10) == native.WAIT_FLAG
    assert time.monotonic() - started < 5
    assert flag.raised
    flag.lower()
    assert not flag.raised


def test_the_wait_ends_at_its_timeout() -> None:
    _, address = _word()
    started = time.monotonic()
    outcome = native.wait(address, 1, native.Flag(), spin_ns=100_000, timeout_ns=30_000_000)
    elapsed = time.monotonic() - started
    assert outcome == native.WAIT_TIMEOUT
    assert 0.025 < elapsed < 5
