"""The messages between the supervisor and its worker processes (and the Ray
workers, which speak the same protocol), defined once for both ends: the
supervisor's side (:mod:`.processes`) and the worker's (:mod:`.worker`) build
these records and ``match`` on them, and :mod:`.channel` carries them.

Each record is a frozen dataclass with slots, pickled as its class and its
fields' values (no state dict, no per-field ``__setstate__``): a supervised
call costs a :class:`Call` and a :class:`Done`. Where a record says which
request it is, or answers, ``ident_field`` names that field: a record the
receiver cannot unpickle arrives as an :class:`Undecodable` of its class and
that identity (see :mod:`.channel`), so that only that request fails.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar, TypeAlias, get_args

from .. import events as ev
from .specs import HostKey, TargetSpec

__all__ = [
    "Abandon",
    "CancelHost",
    "Close",
    "Closed",
    "Create",
    "CreateFailed",
    "Created",
    "Done",
    "Dump",
    "DumpDone",
    "Hello",
    "HostCall",
    "HostReply",
    "Init",
    "Interest",
    "Log",
    "Message",
    "Output",
    "Published",
    "Register",
    "Shutdown",
    "Stderr",
    "ToSupervisor",
    "ToWorker",
    "Undecodable",
    "ident_of",
]


class Message:
    """What every record of the protocol is."""

    __slots__ = ()
    #: The field that says which request the record is, or answers (None when
    #: it has none: one the receiver cannot unpickle cannot be attributed).
    ident_field: ClassVar[str | None] = None
    #: The record's fields' values, in order (set for each record below).
    _values: ClassVar[Callable[[Any], tuple[Any, ...]]]

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), type(self)._values(self))


# --------------------------------------------------- supervisor -> worker
@dataclass(frozen=True, slots=True)
class Init(Message):
    """Supervisor -> worker, first on every launch: how to set up (the worker says Hello)."""

    workers: int
    pin_cpus: list[int] | None
    sys_path: list[str]
    interest: list[str]


@dataclass(frozen=True, slots=True)
class Create(Message):
    """Supervisor -> worker: make the sandboxes of shard ``key`` (Created or CreateFailed)."""

    ident_field: ClassVar[str | None] = "key"
    key: str
    spec: TargetSpec


@dataclass(frozen=True, slots=True)
class Call(Message):
    """Supervisor -> worker: run a call on shard ``key`` (a sandbox is free there; Done)."""

    ident_field: ClassVar[str | None] = "call_id"
    call_id: int
    key: str
    function: str
    args: tuple[Any, ...]
    timeout: float | None
    cpu_timeout: float | None
    #: The call's trace context (W3C ``traceparent``...), for host functions
    #: that run in the worker: they run inside the caller's span.
    trace: dict[str, str] | None = None
    #: Its byte in the worker's start marks (:mod:`.marks`), -1 for none.
    slot: int = -1


@dataclass(frozen=True, slots=True)
class Abandon(Message):
    """Supervisor -> worker: call ``call_id``'s caller gave up (stop it, dumped if ``dump``)."""

    ident_field: ClassVar[str | None] = "call_id"
    call_id: int
    dump: bool


@dataclass(frozen=True, slots=True)
class Register(Message):
    """Supervisor -> worker: shard ``key`` has a new host function ``name`` (run here)."""

    ident_field: ClassVar[str | None] = "key"
    key: str
    name: str


@dataclass(frozen=True, slots=True)
class Close(Message):
    """Supervisor -> worker: close shard ``key`` once its calls are done (Closed)."""

    ident_field: ClassVar[str | None] = "key"
    key: str


@dataclass(frozen=True, slots=True)
class Dump(Message):
    """Supervisor -> worker: write a core dump of shard ``key``'s sandbox (DumpDone)."""

    ident_field: ClassVar[str | None] = "reply_id"
    reply_id: int
    key: str
    directory: str | None


@dataclass(frozen=True, slots=True)
class Interest(Message):
    """Supervisor -> worker, when its subscriptions change: the event classes to send."""

    names: list[str]


@dataclass(frozen=True, slots=True)
class HostReply(Message):
    """Supervisor -> worker: HostCall ``reply_id``'s outcome (a value; the error if not ``ok``)."""

    ident_field: ClassVar[str | None] = "reply_id"
    reply_id: int
    ok: bool
    value: Any


@dataclass(frozen=True, slots=True)
class Shutdown(Message):
    """Supervisor -> worker, when it shuts down: stop every call and exit."""


# --------------------------------------------------- worker -> supervisor
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Worker -> supervisor, once Init is done: the worker (process ``pid``) is ready."""

    pid: int


@dataclass(frozen=True, slots=True)
class Created(Message):
    """Worker -> supervisor, answering Create: shard ``key`` is made (its sandboxes' ids)."""

    ident_field: ClassVar[str | None] = "key"
    key: str
    sandbox_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CreateFailed(Message):
    """Worker -> supervisor, answering Create: shard ``key`` could not be made (why)."""

    ident_field: ClassVar[str | None] = "key"
    key: str
    error: BaseException


@dataclass(frozen=True, slots=True)
class Done(Message):
    """Worker -> supervisor, answering Call: its outcome, and the worker's counters now."""

    ident_field: ClassVar[str | None] = "call_id"
    call_id: int
    result: Any
    error: BaseException | None
    sandbox_id: str | None
    counters: dict[str, int]
    #: How the call reached its guest: "exit" or "doorbell" (None: it never ran).
    path: str | None = None


@dataclass(frozen=True, slots=True)
class Published(Message):
    """Worker -> supervisor: an event one of the supervisor's subscribers wants (see Interest)."""

    event: ev.Event


@dataclass(frozen=True, slots=True)
class HostCall(Message):
    """Worker -> supervisor: call ``call_id``'s guest calls host function ``host_key``."""

    ident_field: ClassVar[str | None] = "reply_id"
    reply_id: int
    call_id: int
    key: str
    host_key: HostKey
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class CancelHost(Message):
    """Worker -> supervisor: the watchdog stops call ``call_id``: cancel its async host calls."""

    ident_field: ClassVar[str | None] = "call_id"
    call_id: int


@dataclass(frozen=True, slots=True)
class Output(Message):
    """Worker -> supervisor: a guest of shard ``key`` printed ``text`` (JS: at ``level``)."""

    ident_field: ClassVar[str | None] = "key"
    key: str
    level: str | None
    text: str


@dataclass(frozen=True, slots=True)
class Stderr(Message):
    """Worker -> supervisor: what the worker wrote to its stderr (dump paths, warnings)."""

    text: str


@dataclass(frozen=True, slots=True)
class Closed(Message):
    """Worker -> supervisor, answering Close: shard ``key``'s sandboxes are closed."""

    ident_field: ClassVar[str | None] = "key"
    key: str


@dataclass(frozen=True, slots=True)
class DumpDone(Message):
    """Worker -> supervisor, answering Dump: the dump's path, or why there is none."""

    ident_field: ClassVar[str | None] = "reply_id"
    reply_id: int
    path: str | None
    error: BaseException | None


@dataclass(frozen=True, slots=True)
class Log(Message):
    """Worker -> supervisor: a record of one of the worker's ``hlasync.*``
    loggers (a dump, a timeout), logged again on the supervisor's side."""

    name: str
    level: int
    message: str
    fields: dict[str, Any]  # its ``hlasync.*`` extra fields
    created: float


# ----------------------------------------------------------- either way
@dataclass(frozen=True, slots=True)
class Undecodable(Message):
    """Made by the receiving end's channel, never sent: a ``kind`` record that
    holds what this process cannot import, for request ``ident`` (and why)."""

    kind: type[Message]
    ident: int | str
    reason: str


ToWorker: TypeAlias = (
    Init | Create | Call | Abandon | Register | Close | Dump | Interest | HostReply | Shutdown
)
ToSupervisor: TypeAlias = (
    Hello
    | Created
    | CreateFailed
    | Done
    | Published
    | HostCall
    | CancelHost
    | Output
    | Stderr
    | Log
    | Closed
    | DumpDone
)


def ident_of(message: Message) -> int | str | None:
    """Which request ``message`` is, or answers (None when it does not say)."""
    name = type(message).ident_field
    if name is None:
        return None
    ident = getattr(message, name, None)
    if isinstance(ident, (int, str)) and not isinstance(ident, bool):
        return ident
    return None


def _values_getter(cls: type[Message]) -> Callable[[Any], tuple[Any, ...]]:
    names = [field.name for field in fields(cls)]  # type: ignore[arg-type]
    if not names:
        return lambda record: ()
    if len(names) == 1:
        (name,) = names
        return lambda record: (getattr(record, name),)
    return operator.attrgetter(*names)


for _record in (*get_args(ToWorker), *get_args(ToSupervisor), Undecodable):
    _record._values = _values_getter(_record)
del _record
