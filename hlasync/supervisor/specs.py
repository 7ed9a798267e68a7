"""What a target is made of, as plain data: a worker process receives it and
makes the sandboxes itself (a KVM VM belongs to the process that created it).
The thread mode makes its sandboxes from the same description, so both
modes share one construction path (:mod:`.creation`)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import SandboxConfig

__all__ = ["HostKey", "TargetSpec", "import_reference", "is_reference"]

#: A host function's key: ``(name,)`` for a guest's, ``(module, name)`` for a
#: JavaScript one (imported in JavaScript from ``module``).
HostKey = tuple[str, ...]


@dataclass(frozen=True)
class TargetSpec:
    kind: Literal["pool", "sandbox", "js"]
    name: str  # the target's name; a shard of a pool adds "#N"
    guest: str  # path of the guest ELF (for "js": the runtime guest's)
    config: SandboxConfig | None
    size: int
    #: Host functions the caller's process runs (a round trip from a worker).
    host_functions: tuple[HostKey, ...] = ()
    #: Host functions given as importable references ("package.module:function"):
    #: imported and run where the sandbox is, without a round trip.
    references: Mapping[HostKey, str] = field(default_factory=dict)
    output: bool = False  # the caller passed an output callback
    # JavaScript pools only:
    handlers: Mapping[str, str] = field(default_factory=dict)
    modules: Mapping[str, str] = field(default_factory=dict)
    heap: int = 0

    def keys(self) -> tuple[HostKey, ...]:
        return (*self.host_functions, *self.references)


def is_reference(value: object) -> bool:
    return isinstance(value, str)


def import_reference(reference: str) -> Callable[..., Any]:
    """The function named by ``"package.module:function"`` (a ``ValueError``
    that says what is wrong otherwise)."""
    module_name, colon, attribute = reference.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(
            f"host function reference {reference!r}: expected 'package.module:function'"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"host function reference {reference!r}: {exc}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(
                f"host function reference {reference!r}: {module_name} has no {attribute}"
            ) from None
    if not callable(target):
        raise ValueError(f"host function reference {reference!r} is not callable")
    if inspect.iscoroutinefunction(target):
        raise ValueError(
            f"host function reference {reference!r} is an async def: pass the function "
            "itself (it then runs on the supervisor's event loop)"
        )
    return target  # type: ignore[no-any-return]


def split_host_functions(
    functions: Mapping[HostKey, Callable[..., Any] | str],
) -> tuple[dict[HostKey, Callable[..., Any]], dict[HostKey, str]]:
    """(callables, importable references), each checked."""
    callables: dict[HostKey, Callable[..., Any]] = {}
    references: dict[HostKey, str] = {}
    for key, value in functions.items():
        if is_reference(value):
            assert isinstance(value, str)
            import_reference(value)  # fail early, in the caller's process
            references[key] = value
        elif callable(value):
            callables[key] = value
        else:
            raise TypeError(
                f"host function {'.'.join(key)}: expected a callable or "
                f"'package.module:function', got {type(value).__name__}"
            )
    return callables, references
