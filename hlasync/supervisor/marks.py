"""Start marks: which of the calls sent to a worker process have started,
readable by the supervisor after the worker died.

A worker holds a finished call's outcome while it has more calls to start, to
send several in one frame (:meth:`~.channel.SocketSender.hold`). A worker
that dies meanwhile takes those outcomes with it, and from the channel alone
the supervisor could no longer tell a call that ran (it fails with
WorkerLost: a call runs at most once) from one that waited in the worker (it
is sent again). So each call sent to a local worker process gets a *slot*, a
byte of memory both processes map (a ``memfd``): the worker sets it to
:data:`RECEIVED` when it has read the call and to :data:`STARTED` before the
call's guest runs; the supervisor reads it when the worker is gone, and
clears it when the slot is given to the next call. The worker never reads it.
One more byte says that the worker ended because it could not read what the
supervisor sent: then a call it never read may be what killed it, and is not
sent again.

Workers without marks (a Ray actor's, on another machine) never hold an
outcome: their channel alone says which calls may have run.
"""

from __future__ import annotations

import mmap
import os

__all__ = ["RECEIVED", "SLOTS", "STARTED", "StartMarks"]

#: Slots per worker process: calls that may be sent to it and unanswered at
#: once (each shard's capacity, summed). A call sent when every slot is taken
#: gets none (-1), and counts as started if its worker dies.
SLOTS = 1 << 16
#: A slot's values: the worker read the call, the call started.
RECEIVED, STARTED = 2, 1


class StartMarks:
    """One worker's marks (see the module). The supervisor makes them with
    :meth:`create` and passes :attr:`fd` to the worker, which maps them with
    :meth:`attach` and calls :meth:`mark`."""

    def __init__(self, fd: int, slots: int = SLOTS) -> None:
        self.fd = fd
        self.slots = slots
        # The slots, then the byte that says the worker could not read a message.
        self._map = mmap.mmap(fd, slots + 1, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._free: list[int] = []
        self._next = 0

    @classmethod
    def create(cls, slots: int = SLOTS) -> StartMarks:
        """New marks, all clear (the supervisor's side; ``fd`` is inheritable by
        ``pass_fds``, and closed by :meth:`close`)."""
        fd = os.memfd_create("hlasync-start-marks", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, slots + 1)
            return cls(fd, slots)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int) -> StartMarks:
        """The marks the supervisor made, in a worker (``fd`` as passed)."""
        return cls(fd, os.fstat(fd).st_size - 1)

    # ---------------------------------------------------------- supervisor
    def take(self) -> int:
        """A clear slot for a call about to be sent; -1 when none is left."""
        if self._free:
            slot = self._free.pop()
        elif self._next < self.slots:
            slot = self._next
            self._next += 1
        else:
            return -1
        self._map[slot] = 0
        return slot

    def give_back(self, slot: int) -> None:
        """``slot``'s call was answered: the slot serves another."""
        if slot >= 0:
            self._free.append(slot)

    def may_have_run(self, slot: int) -> bool:
        """After the worker ended: whether the call of ``slot`` may have started,
        or be what the worker could not read (a call with no slot may)."""
        if slot < 0:
            return True
        state = self._map[slot]
        return state == STARTED or (state == 0 and self._map[self.slots] != 0)

    # -------------------------------------------------------------- worker
    def mark(self, slot: int, state: int) -> None:
        """The call of ``slot`` was read (:data:`RECEIVED`) or starts
        (:data:`STARTED`, before its guest runs)."""
        if 0 <= slot < self.slots:
            self._map[slot] = state

    def unreadable(self) -> None:
        """The worker ends: it could not read what the supervisor sent."""
        self._map[self.slots] = 1

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)
