"""Host-function arguments checked against the Python function's annotations.

hyperlight-js deserialises the JSON arguments of a host function into its
Rust parameter types (serde): ``add(a: i32, b: i32)`` called from JavaScript
as ``add("10", "32")`` fails before ``add`` runs. :func:`checked` gives a
Python host function the same guard: each argument JavaScript passes is
checked against its parameter's annotation, and a mismatch raises
``TypeError`` naming the host function and the parameter, which JavaScript
receives as a ``TypeError`` exception (``hlasync.js.host.HostBridge.call``).

Checked annotations, as JSON values arrive (``json.loads``):

- ``int`` (not ``bool``), ``float`` (an ``int`` too, as in Python typing),
  ``str``, ``bool``, ``None``;
- ``list`` and ``list[X]``, ``dict`` and ``dict[K, V]`` (items checked),
  ``typing.List``/``typing.Dict``, a ``TypedDict`` (as ``dict``);
- ``Optional[X]``, ``Union[...]``, ``X | Y``, ``Literal[...]``,
  ``Annotated[X, ...]`` and ``NewType``\\ s of the above.

Not checked: unannotated parameters, ``typing.Any``, ``object``, and any
other annotation (a class of your own, ``tuple``, a protocol...): such an
argument reaches the function as JSON made it.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["checked"]

#: Annotations that accept any value.
_UNCHECKED = (inspect.Parameter.empty, Any, object)
#: Set on a function :func:`checked` made, so that it is not wrapped twice.
_MARK = "__hlasync_checked__"
_PREVIEW = 40


@dataclass(frozen=True, slots=True)
class _Check:
    """What an annotation accepts: ``accepts(value)``; ``text`` names it in messages."""

    text: str
    accepts: Callable[[Any], bool]


@dataclass(frozen=True, slots=True)
class _Parameter:
    name: str
    check: _Check | None


@dataclass(frozen=True, slots=True)
class _Plan:
    """The checks of one function's positional parameters, in order; ``rest``
    checks every argument beyond them (a ``*args`` parameter)."""

    module: str
    function: str
    parameters: tuple[_Parameter, ...]
    rest: _Parameter | None

    def check(self, args: Sequence[Any]) -> None:
        for index, value in enumerate(args):
            if index < len(self.parameters):
                parameter = self.parameters[index]
            elif self.rest is not None:
                parameter = self.rest
            else:
                return  # too many arguments: the call itself says so
            check = parameter.check
            if check is not None and not check.accepts(value):
                raise TypeError(
                    f"host function {self.module}.{self.function}: argument {index + 1} "
                    f"({parameter.name!r}) must be {check.text}, got {_describe(value)}"
                )


def checked(module: str, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with its arguments checked as the module docstring says, or
    ``function`` itself when none of its positional parameters has a checked
    annotation. An ``async def`` stays one."""
    if getattr(function, _MARK, False):
        return function
    plan = _plan(module, name, function)
    if plan is None:
        return function
    wrapper: Callable[..., Any]
    if inspect.iscoroutinefunction(function):

        async def check_then_await(*args: Any) -> Any:
            plan.check(args)
            return await function(*args)

        wrapper = check_then_await
    else:

        def check_then_call(*args: Any) -> Any:
            plan.check(args)
            return function(*args)

        wrapper = check_then_call
    with_metadata = functools.update_wrapper(wrapper, function)
    setattr(with_metadata, _MARK, True)
    return with_metadata


def _plan(module: str, name: str, function: Callable[..., Any]) -> _Plan | None:
    signature = _signature(function)
    if signature is None:
        return None
    parameters: list[_Parameter] = []
    rest: _Parameter | None = None
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            rest = _Parameter(parameter.name, _check(_evaluated(parameter.annotation, function)))
            break
        if parameter.kind not in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            break
        check = _check(_evaluated(parameter.annotation, function))
        parameters.append(_Parameter(parameter.name, check))
    if all(p.check is None for p in parameters) and (rest is None or rest.check is None):
        return None
    return _Plan(module, name, tuple(parameters), rest)


def _signature(function: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature
        return None


def _evaluated(annotation: Any, function: Callable[..., Any]) -> Any:
    """A string annotation (``from __future__ import annotations``) evaluated in
    the function's module; one that does not evaluate stays a string, which
    :func:`_check` does not check."""
    if not isinstance(annotation, str):
        return annotation
    namespace = getattr(inspect.unwrap(function), "__globals__", None)
    if namespace is None:
        namespace = getattr(inspect.getmodule(function), "__dict__", {})
    try:
        # The text is the host function's own annotation, not anything a guest sent.
        return eval(annotation, dict(namespace))
    except Exception:  # noqa: BLE001 - a name the annotation uses is not defined
        return annotation


def _check(annotation: Any) -> _Check | None:
    """The check of one annotation; None: not checked."""
    if any(annotation is free for free in _UNCHECKED) or isinstance(annotation, str):
        return None
    if annotation is None or annotation is type(None):
        return _Check("None", lambda value: value is None)
    if annotation is bool:
        return _Check("bool", lambda value: type(value) is bool)
    if annotation is int:
        return _Check("int", lambda value: type(value) is int)
    if annotation is float:
        return _Check("float", lambda value: type(value) in (int, float))
    if annotation is str:
        return _Check("str", lambda value: type(value) is str)
    if annotation is list:
        return _Check("list", lambda value: type(value) is list)
    if annotation is dict or typing.is_typeddict(annotation):
        return _Check("dict", lambda value: type(value) is dict)
    supertype = getattr(annotation, "__supertype__", None)  # typing.NewType
    if supertype is not None:
        return _check(supertype)
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _check(arguments[0])
    if origin is typing.Literal:
        return _literal(arguments)
    if origin in (typing.Union, types.UnionType):
        return _union(arguments)
    if origin is list:  # list[X], typing.List[X], typing.List
        return _list_of(_check(arguments[0]) if arguments else None)
    if origin is dict:  # dict[K, V], typing.Dict[K, V], typing.Dict
        if len(arguments) != 2:
            return _dict_of(None, None)
        return _dict_of(_check(arguments[0]), _check(arguments[1]))
    return None


def _literal(values: tuple[Any, ...]) -> _Check:
    def accepts(value: Any) -> bool:
        return any(type(value) is type(literal) and value == literal for literal in values)

    return _Check(" or ".join(repr(value) for value in values), accepts)


def _union(members: tuple[Any, ...]) -> _Check | None:
    checks = [_check(member) for member in members]
    if any(check is None for check in checks):
        return None  # a member that accepts anything: so does the union
    present = [check for check in checks if check is not None]
    return _Check(
        " | ".join(check.text for check in present),
        lambda value: any(check.accepts(value) for check in present),
    )


def _list_of(item: _Check | None) -> _Check:
    if item is None:
        return _Check("list", lambda value: type(value) is list)
    return _Check(
        f"list[{item.text}]",
        lambda value: type(value) is list and all(item.accepts(v) for v in value),
    )


def _dict_of(key: _Check | None, item: _Check | None) -> _Check:
    def accepts(value: Any) -> bool:
        if type(value) is not dict:
            return False
        keys_ok = key is None or all(key.accepts(k) for k in value)
        return keys_ok and (item is None or all(item.accepts(v) for v in value.values()))

    key_text = key.text if key is not None else "Any"
    item_text = item.text if item is not None else "Any"
    plain = key is None and item is None
    return _Check("dict" if plain else f"dict[{key_text}, {item_text}]", accepts)


def _describe(value: Any) -> str:
    """``str '10'``: the type JSON gave an argument, and a short preview of it."""
    if value is None:
        return "None"
    preview = repr(value)
    if len(preview) > _PREVIEW:
        preview = preview[: _PREVIEW - 3] + "..."
    return f"{type(value).__name__} {preview}"
