"""Host functions under the supervisor: plain callables run on the vCPU
thread that runs the call; ``async def`` ones run on the event loop, in a
cancel scope the watchdog (or an abandoning caller) cancels."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.from_thread

from .jobs import Job, current_job

__all__ = ["wrap_host_function", "wrap_host_functions"]


def wrap_host_function(function: Callable[..., Any], token: Any) -> Callable[..., Any]:
    """``function`` as a sandbox registers it: async ones go through the loop of ``token``."""
    if inspect.iscoroutinefunction(function):
        return _async_host(function, token)
    return function


def wrap_host_functions(
    functions: Mapping[str, Callable[..., Any]] | None, token: Any
) -> dict[str, Callable[..., Any]]:
    return {name: wrap_host_function(fn, token) for name, fn in (functions or {}).items()}


def _async_host(function: Callable[..., Awaitable[Any]], token: Any) -> Callable[..., Any]:
    async def run(job: Job | None, args: tuple[Any, ...]) -> Any:
        if job is not None and job.span is not None:
            with job.span.current():  # inside the call's span, as plain ones are
                return await run_scoped(job, args)
        return await run_scoped(job, args)

    async def run_scoped(job: Job | None, args: tuple[Any, ...]) -> Any:
        with anyio.CancelScope() as scope:
            if job is not None:
                job.host_scopes.append(scope)
                if job.expired or job.abandoned:
                    scope.cancel()
            try:
                return await function(*args)
            finally:
                if job is not None:
                    job.host_scopes.remove(scope)
        raise TimeoutError("host function cancelled by the watchdog")

    def call_from_worker(*args: Any) -> Any:
        return anyio.from_thread.run(run, current_job(), args, token=token)

    return call_from_worker
