"""A GDB remote stub for one sandbox: gdb and lldb attach to its calls.

Two threads take part, and only one of them ever touches the vCPU:

- The sandbox's *calling* thread (the call's run loop, :mod:`hlasync.sandbox.
  runner`) meets every stop: an ``int3`` or single-step trap reported by the
  guest's exception stubs, a fault, an abort, a kick after Ctrl-C. It copies
  the registers (through the vCPU's owner thread, like every vCPU access),
  publishes a :class:`Stop`, and waits for the debugger's verdict; then it
  writes back what the debugger changed and runs the guest again.
- The server thread (``hlasync-debug-<sandbox>``) accepts one client at a
  time and speaks the protocol (:mod:`.session`). It reads and writes the
  published copies and guest memory (through the page tables), and answers
  a resume by handing a verdict to the calling thread. Ctrl-C while the
  guest runs is a kick through the owner.

While no debugger is attached the sandbox behaves as any other, except that
the first call waits at its guest function's entry until one attaches.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ..errors import DebuggerError
from .pages import Breakpoints, GuestBytes, Writer
from .registers import RegisterFile

if TYPE_CHECKING:
    from .session import Session

__all__ = ["DebugServer", "Stop", "Verdict"]

_logger = logging.getLogger("hlasync.debug")

#: How often waits look at whether the call was stopped or the server closed.
POLL = 0.1

Verdict = Literal["continue", "step", "signal", "kill", "detach"]


@dataclass
class Stop:
    """A stopped guest: why (``signal``, gdb's numbering), its registers, and
    whether it stopped at one of the debugger's breakpoints."""

    signal: int
    registers: RegisterFile
    cr3: int
    swbreak: bool = False
    #: The stop is a fault of the guest's (not a trap of the debugger's): the
    #: debugger may pass it on (``C`` with its signal), and the call then fails.
    fault: bool = False
    #: What the debugger decided.
    verdict: Verdict | None = None


class DebugServer:
    """Listens on ``host:port`` for one debugger at a time (port 0: any free port)."""

    def __init__(
        self,
        sandbox_id: str,
        host: str,
        port: int,
        *,
        image_path: str,
        memory: GuestBytes,
        write: Writer,
        kick: Callable[[], None],
    ) -> None:
        self.sandbox_id = sandbox_id
        self.image_path = image_path
        self.memory = memory
        self.write = write
        #: Kicks the guest out of KVM_RUN (through the vCPU's owner), from any thread.
        self.kick = kick
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, _, _, _, address = infos[0]
            listener = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            raise DebuggerError(f"debugger address {host}:{port}: {exc}") from exc
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(1)
            listener.settimeout(POLL)
        except OSError as exc:
            listener.close()
            raise DebuggerError(f"cannot serve a debugger on {host}:{port}: {exc}") from exc
        self._listener = listener
        self.address: tuple[str, int] = listener.getsockname()[:2]
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.breakpoints = Breakpoints()
        #: The stopped guest, while the calling thread waits for a verdict.
        self.stop: Stop | None = None
        #: The client waits for a stop reply (it resumed the guest, or asked ``?``).
        self.reply_due = False
        #: Stop the guest as soon as possible (Ctrl-C, a client attaching): at
        #: the next kick, or at the entry of the next call.
        self.want_stop = True  # the first call waits at its entry for a debugger
        #: An entry stop waits for a debugger to attach (until one has resumed
        #: or left): the first call's, or the one stop_at_next_call() asks for.
        self.hold = True
        #: The signal the next stop reports when ``want_stop`` makes it.
        self.want_signal = 5
        self.session: Session | None = None
        self.stepping = False
        self.closed = False
        #: Seconds guests spent stopped in the debugger (watchdogs leave them out).
        self._paused = 0.0
        self._stopped_since: float | None = None
        self._thread = threading.Thread(
            target=self._serve, name=f"hlasync-debug-{sandbox_id}", daemon=True
        )
        self._thread.start()

    # ------------------------------------------------------------- lifetime
    @property
    def attached(self) -> bool:
        return self.session is not None

    def close(self) -> None:
        """Stop serving: the client is disconnected, a waiting call goes on."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            session, due = self.session, self.reply_due
            self.changed.notify_all()
        if session is not None:
            if due:
                session.send(b"W00")  # the "process" (the sandbox) is gone
            session.shutdown()
        self._listener.close()
        if threading.current_thread() is not self._thread:
            self._thread.join(2 * POLL + 1.0)

    def abandon(self) -> None:
        """Stop serving, taking no lock and joining no thread: for the
        finalizer of a sandbox dropped unclosed (the cyclic GC may run it
        while any lock is held). The threads see ``closed`` within
        :data:`POLL` and end; a stopped call cannot exist (it would hold the
        sandbox)."""
        self.closed = True
        self._listener.close()
        session = self.session
        if session is not None:
            session.shutdown()

    def forget_in_child(self) -> None:
        """In a forked child: the threads stayed in the parent; close this
        process's copies of the sockets (the parent keeps serving)."""
        self.closed = True
        self._listener.close()
        session = self.session
        if session is not None:
            session.client.close()

    def _serve(self) -> None:
        """Accept clients: one is served (on a thread of its own), any other
        that connects meanwhile is refused at once (its connection closed)."""
        from .session import Session

        while not self.closed:
            try:
                client, peer = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            session = Session(self, client)
            with self.lock:
                refused = self.closed or self.session is not None
                if not refused:
                    self.session = session
                    if self.stop is None or self.stop.verdict is not None:
                        # An attaching debugger wants the guest stopped (a stop
                        # that waits already is the one it gets).
                        self.want_stop, self.want_signal = True, 5
                    self.changed.notify_all()
            if refused:
                _logger.warning(
                    "sandbox %s: refused a debugger from %s:%s: one is attached already",
                    self.sandbox_id,
                    *peer[:2],
                )
                session.shutdown()
                continue
            _logger.info("sandbox %s: debugger attached from %s:%s", self.sandbox_id, *peer[:2])
            threading.Thread(
                target=self._run_session,
                args=(session,),
                name=f"hlasync-debug-{self.sandbox_id}-client",
                daemon=True,
            ).start()

    def _run_session(self, session: Session) -> None:
        try:
            session.run()
        except Exception:  # a broken client must not end the server
            _logger.exception("sandbox %s: debugger session failed", self.sandbox_id)
        finally:
            self.detached(session)

    def detached(self, session: Session) -> None:
        """The client went away (detach, kill, disconnect): forget its
        breakpoints; a guest stopped for it goes on."""
        session.shutdown()
        with self.lock:
            if self.session is not session:
                return
            self.session = None
            self.reply_due = False
            self.want_stop = self.hold = False
            self.breakpoints.wanted.clear()
            self.breakpoints.entry = None  # a stop nobody waits for any more
            stop = self.stop
            if stop is not None and stop.verdict is None:
                stop.verdict = "detach"
            self.changed.notify_all()
        _logger.info("sandbox %s: debugger detached", self.sandbox_id)

    # ------------------------------------------- the calling thread's side
    def publish(self, stop: Stop, *, wait_for_client: bool = False) -> None:
        """A guest stopped: tell a client waiting for it. With no client
        attached (it left since the stop was decided) the stop is resumed at
        once, unless ``wait_for_client`` (a call waiting at its entry)."""
        with self.lock:
            self.stop = stop
            self._stopped_since = time.monotonic()
            self.want_stop = False
            session, due = self.session, self.reply_due
            self.reply_due = False
            if session is None and not (wait_for_client and self.hold):
                stop.verdict = "detach"
            self.changed.notify_all()
        if session is not None and due:
            session.send_stop(stop)

    def wait_verdict(self, stop: Stop, cancelled: Callable[[], bool]) -> Verdict:
        """Wait until the debugger resumes ``stop`` (or the call is stopped by
        its owner: ``cancelled()`` true, or the server closes: "kill")."""
        taken_away: Session | None = None
        with self.lock:
            try:
                while stop.verdict is None:
                    if self.closed or cancelled():
                        # The stop is gone under the debugger: it hears no more
                        # of this "process" (its connection ends, below).
                        stop.verdict, taken_away = "kill", self.session
                        break
                    self.changed.wait(POLL)
                return stop.verdict
            finally:
                self.stop = None
                if self._stopped_since is not None:
                    self._paused += time.monotonic() - self._stopped_since
                    self._stopped_since = None
                if taken_away is not None:
                    _logger.info(
                        "sandbox %s: the call stopped in the debugger was stopped by its "
                        "owner (interrupt(), close()); disconnecting the debugger",
                        self.sandbox_id,
                    )
                    self._end_session_later(taken_away)

    def _end_session_later(self, session: Session) -> None:
        """End ``session`` from another thread (this one holds the lock)."""
        threading.Thread(
            target=self.detached,
            args=(session,),
            name=f"hlasync-debug-{self.sandbox_id}-end",
            daemon=True,
        ).start()

    def paused(self) -> float:
        """Seconds the guest has spent stopped in the debugger so far (the
        current stop included): wall-clock limits leave them out."""
        with self.lock:
            since = self._stopped_since
            return self._paused + (0.0 if since is None else time.monotonic() - since)

    def cancel_stop(self) -> None:
        """No stop wanted now (a JavaScript sandbox's engine starts first)."""
        with self.lock:
            self.want_stop = self.hold = False

    def stop_at_next_call(self) -> None:
        """Have the next call stop at its entry and wait for a debugger."""
        with self.lock:
            self.want_stop, self.want_signal, self.hold = True, 5, True

    def terminated(self, signal: int) -> None:
        """The debugger passed a fault on and the call failed with it: the
        client, which waits for a stop, hears that its "process" ended with
        ``signal``, and the session ends (a restore and a later call run
        without it until a debugger attaches again)."""
        with self.lock:
            session, due = self.session, self.reply_due
            self.reply_due = False
        if session is not None:
            if due:
                session.send(b"X%02x" % signal)
            self.detached(session)

    def resumed(self, stop: Stop, verdict: Verdict) -> None:
        """The client resumed ``stop`` (server thread)."""
        with self.lock:
            stop.verdict = verdict
            self.hold = False
            self.reply_due = verdict in ("continue", "step", "signal")
            self.changed.notify_all()

    def request_stop(self, signal: int) -> None:
        """Ctrl-C or ``?`` while the guest runs: stop it at the next chance (a
        kick now, or the entry of the next call)."""
        with self.lock:
            if self.stop is not None and self.stop.verdict is None:
                return  # stopped already (a stop being resumed is not: it runs next)
            if not self.want_stop:  # a stop wanted already keeps its signal
                self.want_stop, self.want_signal = True, signal
        self.kick()

    def take_stop_request(self) -> int | None:
        """The signal of a wanted stop, consumed (None: none wanted, or no client)."""
        with self.lock:
            if not self.want_stop:
                return None
            self.want_stop = False
            return self.want_signal
