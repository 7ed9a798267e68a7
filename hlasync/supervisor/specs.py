"""What a target is made of, as plain data: a worker process receives it and
makes the sandboxes itself (a KVM VM belongs to the process that created it).
The thread mode makes its sandboxes from the same description, so both
modes share one construction path (:mod:`.creation`). Also the checks that
turn the front's arguments (host functions, JavaScript handlers) into it."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..config import SandboxConfig

if TYPE_CHECKING:
    from ..guest.image import GuestImage

__all__ = [
    "HostKey",
    "TargetSpec",
    "import_reference",
    "is_reference",
    "js_host_functions",
    "plain_host_functions",
    "split_host_functions",
    "target_spec",
]

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

    @property
    def hot_pool(self) -> bool:
        """A pool (C or JavaScript) whose members restore in place
        (``SandboxConfig.hot_restore``, whose default the environment gives)."""
        config = self.config if self.config is not None else SandboxConfig()
        return self.kind != "sandbox" and config.hot_restore


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


def target_spec(
    name: str,
    kind: Any,
    image: GuestImage,
    size: int,
    config: SandboxConfig | None,
    functions: Mapping[HostKey, Callable[..., Any] | str],
    output: Callable[..., None] | None,
    **js: Any,
) -> tuple[TargetSpec, dict[HostKey, Callable[..., Any]]]:
    """The spec of a new target ``name`` of ``size`` sandboxes of ``image``
    (``js``: a JavaScript pool's handlers, modules and heap), and the host
    functions among ``functions`` that run in the caller's process."""
    callables, references = split_host_functions(functions)
    spec = TargetSpec(
        kind=kind,
        name=name,
        guest=str(image.path),
        config=config,
        size=size,
        host_functions=tuple(callables),
        references=references,
        output=output is not None,
        **js,
    )
    return spec, callables


def plain_host_functions(
    functions: Mapping[str, Callable[..., Any] | str] | None,
) -> dict[HostKey, Callable[..., Any] | str]:
    """A plain guest's host functions (``name -> function``) by their keys."""
    return {(name,): function for name, function in (functions or {}).items()}


def js_host_functions(
    handlers: Mapping[str, str],
    host_functions: Mapping[str, Mapping[str, Callable[..., Any] | str]] | None,
) -> dict[HostKey, Callable[..., Any] | str]:
    """Check a JavaScript pool's ``handlers`` (name -> source); its host
    functions (``module -> name -> function``, their arguments checked against
    their annotations: :func:`hlasync.js.arguments.checked`) by their keys."""
    from ..js import protocol
    from ..js.arguments import checked

    if not isinstance(handlers, Mapping) or not handlers:
        raise ValueError("handlers must be a non-empty mapping of name -> source")
    for handler, source in handlers.items():
        protocol.check_name("handler", handler)
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"the source of handler {handler!r} must be a non-empty str")
    functions: dict[HostKey, Callable[..., Any] | str] = {}
    for module, members in (host_functions or {}).items():
        protocol.check_name("module", module)
        for function_name, function in members.items():
            protocol.check_function_name(function_name)
            # Arguments are checked where the function runs (this process, or
            # the worker's bridge for an importable reference).
            if callable(function):
                function = checked(module, function_name, function)
            functions[(module, function_name)] = function
    return functions
