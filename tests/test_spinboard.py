"""The spin board (``hlasync/supervisor/spinboard.py``): the worker processes
of one supervisor share one budget of spinning threads, counted in a memory
file they all map, instead of each spinning with a budget of its own."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import psutil
import pytest

from hlasync import events as ev
from hlasync.kvm import Kvm
from hlasync.kvm.helper import spin_slots
from hlasync.supervisor import Supervisor
from hlasync.supervisor.spinboard import CELL, SpinBoard

pytestmark = pytest.mark.anyio


def _in_child(code: str, *fds: int, board: SpinBoard | None = None, cell: int = 0) -> str:
    """Run ``code`` in a fresh interpreter (the helper library's counting is
    per process: a test must not attach the test process itself); with
    ``board``, after attaching it as ``cell`` (``board`` and ``lib``, the
    helper library, are defined for ``code`` then)."""
    if board is not None:
        fds += (board.fd,)
        code = (
            "import struct\n"
            "from hlasync.kvm.helper import library\n"
            "from hlasync.supervisor.spinboard import SpinBoard\n"
            f"board = SpinBoard({board.fd})\n"
            f"board.attach({cell})\n"
            "lib = library()\n"
        ) + textwrap.dedent(code)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        pass_fds=fds,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _worker_process(index: int) -> psutil.Process:
    """The process of worker ``index`` (the index is its command line's
    last but one argument)."""
    return next(
        p
        for p in psutil.Process().children()
        if "hlasync.supervisor.worker" in " ".join(p.cmdline()) and p.cmdline()[-2] == str(index)
    )


def test_a_board_holds_its_cells_and_slots() -> None:
    board = SpinBoard.create(3, slots=2)
    try:
        assert (board.cells, board.slots) == (3, 2)
        assert [board.count(cell) for cell in range(3)] == [0, 0, 0]
        other = SpinBoard(board.fd)  # as a worker maps it
        assert (other.cells, other.slots) == (3, 2)
        with pytest.raises(IndexError):
            board.count(3)
    finally:
        board.close()
    with pytest.raises(ValueError, match="slot"):
        SpinBoard.create(2, slots=0)
    with pytest.raises(ValueError, match="cell"):
        SpinBoard.create(0)


def test_a_file_that_is_no_board_is_refused(tmp_path: Path) -> None:
    import os

    for size in (0, CELL, 3 * CELL):
        path = tmp_path / f"board-{size}"
        path.write_bytes(b"\x07" * size)
        fd = os.open(path, os.O_RDWR)
        try:
            with pytest.raises(ValueError, match="spin board"):
                SpinBoard(fd)
        finally:
            os.close(fd)


def test_slots_are_taken_against_every_cell_of_the_board() -> None:
    """A process counts its slots in its own cell and may take one only while
    all the cells together leave one free; a cell below zero (cleared under a
    dying process, then given back to) counts as zero."""
    board = SpinBoard.create(2, slots=2)
    try:
        out = _in_child(
            f"""
            seen = [lib.hl_owner_take_spin(), lib.hl_owner_take_spin(), lib.hl_owner_take_spin()]
            seen += [board.count(0), lib.hl_owner_spinners()]
            lib.hl_owner_give_spin(); lib.hl_owner_give_spin()
            seen += [board.count(0)]
            struct.pack_into("=i", board._map, 2 * {CELL}, 2)  # the other worker holds both
            seen += [lib.hl_owner_take_spin(), board.count(0), lib.hl_owner_spinners()]
            struct.pack_into("=i", board._map, 2 * {CELL}, -5)  # cleared, then given back to
            seen += [lib.hl_owner_take_spin(), lib.hl_owner_take_spin(), lib.hl_owner_take_spin()]
            seen += [lib.hl_owner_spinners()]
            print(seen)
            """,
            board=board,
        )
        assert out.strip() == str([1, 1, 0, 2, 2, 0, 0, 0, 2, 1, 1, 0, 2])
    finally:
        board.close()


def test_hot_sandboxes_are_counted_against_every_cell_of_the_board() -> None:
    """A worker's budget lets a sandbox go hot only while the hot sandboxes
    of all the cells and the worker's own calls in flight leave a slot; it
    takes the board's slots as its own."""
    board = SpinBoard.create(2, slots=2)
    try:
        out = _in_child(
            f"""
            import struct
            from hlasync.kvm.helper import library
            from hlasync.sandbox.hot import budget
            from hlasync.supervisor.spinboard import SpinBoard
            lib = library()
            before = [lib.hl_owner_take_hot(5), lib.hl_owner_hot()]  # no board: no limit here
            board = SpinBoard({board.fd})
            board.attach(0)
            seen = before + [budget.slots]
            seen += [lib.hl_owner_take_hot(1), lib.hl_owner_take_hot(1), board.hot(0)]
            seen += [lib.hl_owner_take_hot(0), board.hot(0), lib.hl_owner_hot()]
            lib.hl_owner_give_hot(); lib.hl_owner_give_hot()
            struct.pack_into("=ii", board._map, 2 * {CELL}, 0, 2)  # the other worker's two
            seen += [board.hot(0), lib.hl_owner_take_hot(0), lib.hl_owner_hot()]
            # The budget itself: another process's hot sandboxes leave it no room.
            budget.call_started()
            seen += [budget.end_call(running=False, wanted=True, thread=1, now=100.0)]
            struct.pack_into("=ii", board._map, 2 * {CELL}, 0, 1)
            budget.call_started()
            seen += [budget.end_call(running=False, wanted=True, thread=1, now=101.0)]
            seen += [board.hot(0)]
            budget.give_back()
            seen += [board.hot(0)]
            print(seen)
            """,
            board.fd,
        )
        assert out.strip() == str([1, 0, 2, 1, 0, 1, 1, 2, 2, 0, 0, 2, False, True, 1, 0])
    finally:
        board.close()


def test_two_processes_never_hold_more_slots_than_the_board_has() -> None:
    """Two processes take and give the one slot of a board as fast as they can;
    the holder writes its mark in a word they share and finds it unchanged
    before it gives the slot back (an overlap would overwrite it)."""
    board = SpinBoard.create(2, slots=1)
    code = f"""
        import mmap, os, sys, time
        from hlasync.kvm.helper import library
        from hlasync.supervisor.spinboard import SpinBoard
        cell = int(sys.argv[1])
        board = SpinBoard({board.fd})
        board.attach(cell)
        shared = mmap.mmap({board.fd}, 0)  # the header's last bytes: nobody else writes there
        lib = library()
        mark, held, clashes, tries = bytes([cell + 1]) * 8, 0, 0, 0
        deadline = time.monotonic() + 60
        # Until both have tried many times and held it often (the other may
        # start late, and hold it all the while it runs alone).
        while (tries < 200_000 or held < 1000) and time.monotonic() < deadline:
            tries += 1
            if lib.hl_owner_take_spin():
                held += 1
                shared[56:64] = mark
                for _ in range(3):
                    if shared[56:64] != mark:
                        clashes += 1
                shared[56:64] = bytes(8)
                lib.hl_owner_give_spin()
        print(held, clashes)
        """
    try:
        children = [
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(code), str(cell)],
                stdout=subprocess.PIPE,
                text=True,
                pass_fds=(board.fd,),
            )
            for cell in (0, 1)
        ]
        results = [child.communicate(timeout=300)[0].split() for child in children]
        assert [child.returncode for child in children] == [0, 0]
        assert all(int(held) >= 1000 for held, _ in results)  # both took it, in turns
        assert [int(clashes) for _, clashes in results] == [0, 0]
        assert board.taken() == 0
    finally:
        board.close()


async def test_worker_processes_count_their_spinning_in_the_supervisors_board(
    kvm: Kvm, simpleguest: Path
) -> None:
    """The board has a cell per worker process and the machine's slots; calls
    in the workers take slots in it; a worker that died holding slots leaves
    none behind once its next process starts."""
    async with Supervisor(processes=2, workers=1) as sup:
        board = sup._backend.board  # type: ignore[attr-defined]
        assert board is not None
        assert (board.cells, board.slots) == (2, spin_slots())
        pool = await sup.create_pool(simpleguest, size=2)
        counted: set[int] = set()
        with anyio.fail_after(60):
            while counted != {0, 1}:
                async with anyio.create_task_group() as tg:
                    for _ in range(4):
                        tg.start_soon(pool.call, "add", 1, 2)
                counted |= {cell for cell in range(2) if board.count(cell) > 0}
        # A dead process's slots: the cell as a worker killed mid-spin would leave it.
        victim = _worker_process(0)
        victim.send_signal(signal.SIGSTOP)
        struct.pack_into("=i", board._map, CELL, 1000)
        async with sup.subscribe(ev.WorkerStarted) as started:
            victim.send_signal(signal.SIGKILL)
            with anyio.fail_after(30):
                event = await started.receive()
        assert isinstance(event, ev.WorkerStarted) and event.worker == 0
        assert board.count(0) <= board.slots
        for _ in range(4):
            assert await pool.call("add", 1, 2) == 3
    assert sup._backend.board is None  # type: ignore[attr-defined]  # closed at shutdown


async def test_the_hot_budget_of_a_worker_process_shares_the_boards_slots(
    kvm: Kvm, simpleguest: Path
) -> None:
    """Asked where its sandboxes run (a host function given by reference runs
    in the worker), a worker's hot budget counts in the board, with its slots;
    the supervisor's own process counts alone."""
    from hlasync.sandbox.hot import budget

    async with Supervisor(processes=2, workers=1) as sup:
        board = sup._backend.board  # type: ignore[attr-defined]
        pool = await sup.create_pool(
            simpleguest, size=2, host_functions={"slots": "tests.hostfns:hot_budget_slots"}
        )
        answers = {await pool.call("call_host", "slots", 1) for _ in range(8)}
        assert answers == {1000 + board.slots}
    assert budget._board is None


def test_a_cell_below_zero_takes_no_slot_of_its_own() -> None:
    """A give-back without its take left the process's own cell below zero:
    its takes would not show in the sum, so it takes none (rather than more
    than the board has)."""
    board = SpinBoard.create(2, slots=1)
    try:
        out = _in_child(
            f"""
            struct.pack_into("=ii", board._map, {CELL}, -1, -1)
            seen = [lib.hl_owner_take_spin(), lib.hl_owner_take_spin(), board.counts(0)]
            seen += [lib.hl_owner_take_hot(0), lib.hl_owner_take_hot(0)]
            board.clear(0)
            seen += [lib.hl_owner_take_spin(), lib.hl_owner_take_spin(), board.counts(0)]
            print(seen)
            """,
            board=board,
        )
        assert out.strip() == str([0, 0, (-1, -1), 0, 0, 1, 0, (1, 0)])
    finally:
        board.close()


def test_a_forked_child_of_a_worker_counts_alone() -> None:
    board = SpinBoard.create(2, slots=1)
    try:
        out = _in_child(
            f"""
            import os
            from hlasync.sandbox.hot import HotBudget, budget
            struct.pack_into("=ii", board._map, 2 * {CELL}, 1, 1)  # the other worker's
            seen = [lib.hl_owner_take_spin(), lib.hl_owner_take_hot(0)]
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                child = [lib.hl_owner_spinners(), lib.hl_owner_take_spin(), lib.hl_owner_hot()]
                child += [budget._board is None, budget.slots == HotBudget._slots()]
                os.write(write, repr(child).encode())
                os._exit(0)
            os.waitpid(pid, 0)
            print(seen, os.read(read, 200).decode())
            """,
            board=board,
        )
        assert out.strip() == "[0, 0] [0, 1, 0, True, True]"
    finally:
        board.close()


async def test_a_dead_workers_cell_is_cleared_also_when_no_new_process_starts(
    kvm: Kvm, simpleguest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an attacker: the cell was cleared only before the next launch,
    so a relaunch that failed left the dead process's slots counted for good
    (with one slot, no other worker could spin again)."""
    from hlasync import SupervisorError

    async with Supervisor(processes=2, workers=1) as sup:
        board = sup._backend.board  # type: ignore[attr-defined]
        await sup.create_pool(simpleguest, size=2)
        victim = _worker_process(0)

        async def cannot_start(worker: object) -> object:
            raise SupervisorError("no new process today")

        monkeypatch.setattr(sup._backend, "_start_worker", cannot_start)
        victim.send_signal(signal.SIGSTOP)
        struct.pack_into("=ii", board._map, CELL, 1, 1)  # as a holder killed mid-spin leaves it
        async with sup.subscribe(ev.WorkerDied) as died:
            victim.send_signal(signal.SIGKILL)
            with anyio.fail_after(30):
                await died.receive()
                while board.counts(0) != (0, 0):
                    await anyio.sleep(0.01)
