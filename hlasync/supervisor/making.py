"""Making the front's targets: :class:`TargetMaker` checks the arguments of
``create_pool``, ``create_sandbox`` and ``create_js_pool``, loads the guest on
an operation thread, names the target, describes it (:class:`~.specs.TargetSpec`)
and has the backend make its sandboxes (which announces them)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..config import SandboxConfig
from ..guest.image import GuestImage
from .creation import load_image
from .specs import HostKey, js_host_functions, plain_host_functions, target_spec
from .targets import JSPool, Owner, Pool, SupervisedSandbox, Target

if TYPE_CHECKING:
    from .backend import Backend
    from .front import InThread

__all__ = ["TargetMaker"]


class TargetMaker:
    """Makes the targets of ``owner`` (the front) on ``backend``. ``ids``
    numbers unnamed targets (the front's own sequence); ``check_open`` raises
    when the front does not take new work."""

    def __init__(
        self,
        owner: Owner,
        backend: Backend,
        in_thread: InThread,
        ids: Iterator[int],
        check_open: Callable[[], None],
    ) -> None:
        self._owner = owner
        self._backend = backend
        self._in_thread = in_thread
        self._ids = ids
        self._check_open = check_open

    async def pool(
        self,
        guest: str | os.PathLike[str] | GuestImage,
        size: int,
        config: SandboxConfig | None,
        name: str | None,
        host_functions: Mapping[str, Callable[..., Any] | str] | None,
        output: Callable[[str], None] | None,
    ) -> Pool:
        self._check_open()
        if type(size) is not int or size < 1:
            raise ValueError("size must be a positive int")
        image = await self._in_thread(lambda: load_image(guest))
        pool = Pool(self._owner, name or f"pool-{next(self._ids)}", image, size)
        functions = plain_host_functions(host_functions)
        await self._create(pool, "pool", image, size, config, functions, output)
        return pool

    async def sandbox(
        self,
        guest: str | os.PathLike[str] | GuestImage,
        config: SandboxConfig | None,
        host_functions: Mapping[str, Callable[..., Any] | str] | None,
        output: Callable[[str], None] | None,
    ) -> SupervisedSandbox:
        self._check_open()
        image = await self._in_thread(lambda: load_image(guest))
        target = SupervisedSandbox(self._owner, f"sandbox-{next(self._ids)}", image)
        functions = plain_host_functions(host_functions)
        await self._create(target, "sandbox", image, 1, config, functions, output)
        return target

    async def js_pool(
        self,
        handlers: Mapping[str, str],
        size: int,
        modules: Mapping[str, str] | None,
        host_functions: Mapping[str, Mapping[str, Callable[..., Any] | str]] | None,
        heap_size: int | None,
        config: SandboxConfig | None,
        name: str | None,
        output: Callable[[str, str], None] | None,
    ) -> JSPool:
        from ..js import runtime

        self._check_open()
        if type(size) is not int or size < 1:
            raise ValueError("size must be a positive int")
        functions = js_host_functions(handlers, host_functions)
        heap = runtime.DEFAULT_HEAP_SIZE if heap_size is None else heap_size
        if config is None:
            config = runtime.default_config(heap)
        else:
            runtime.check_config(config, heap)  # heap_size too
        image = await self._in_thread(lambda: load_image(runtime.guest_path()))
        pool = JSPool(self._owner, name or f"js-pool-{next(self._ids)}", image, size, handlers)
        await self._create(
            pool,
            "js",
            image,
            size,
            config,
            functions,
            output,
            handlers=dict(handlers),
            modules=dict(modules or {}),
            heap=heap,
        )
        return pool

    async def _create(
        self,
        target: Target,
        kind: Any,
        image: GuestImage,
        size: int,
        config: SandboxConfig | None,
        functions: Mapping[HostKey, Callable[..., Any] | str],
        output: Callable[..., None] | None,
        **js: Any,
    ) -> None:
        spec, callables = target_spec(
            target.name, kind, image, size, config, functions, output, **js
        )
        await self._backend.create(target, spec, image, callables, output)
