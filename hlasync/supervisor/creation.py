"""Making the sandboxes of a target: plain guests, and JavaScript runtimes
initialised once and copied from their loaded snapshot."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from .. import events as ev
from ..config import SandboxConfig
from ..guest.image import GuestImage
from ..sandbox import CrashdumpRecord, Sandbox
from ..sandbox.snapshots import Snapshot
from .hub import EventHub
from .jobs import current_job

__all__ = ["JSFactory", "create_all", "load_image", "new_sandbox"]


def load_image(guest: str | os.PathLike[str] | GuestImage) -> GuestImage:
    return guest if isinstance(guest, GuestImage) else GuestImage.load(guest)


def create_all(factory: Callable[[], Sandbox], count: int) -> list[Sandbox]:
    """``count`` sandboxes from ``factory``; none are left open if one fails."""
    made: list[Sandbox] = []
    try:
        for _ in range(count):
            made.append(factory())
    except BaseException:
        for sandbox in made:
            sandbox.close()
        raise
    return made


def new_sandbox(
    image: GuestImage,
    config: SandboxConfig | None,
    host_functions: Mapping[str, Callable[..., Any]],
    output: Callable[[str], None] | None,
    hub: EventHub,
    on_crashdump: Callable[[CrashdumpRecord], None],
) -> Sandbox:
    """A sandbox whose prints become :class:`~hlasync.events.GuestOutput`
    events (and go to ``output``, or to stdout when nobody subscribes)."""
    holder: list[Sandbox] = []

    def on_output(text: str) -> None:
        sandbox_id = holder[0].id if holder else None
        if output is not None:
            output(text)
        if hub.wants(ev.GuestOutput):
            # Long output is cut (visibly: ``truncated``) so events stay small.
            hub.post(ev.GuestOutput.from_text(sandbox_id, text))
        elif output is None:
            sys.stdout.write(text)
            sys.stdout.flush()

    sandbox = Sandbox(image, config, output=on_output)
    holder.append(sandbox)
    sandbox.add_crashdump_listener(on_crashdump)
    for name, function in dict(host_functions).items():
        sandbox.register_host_function(name, function)
    return sandbox


def js_console(
    hub: EventHub, output: Callable[[str, str], None] | None
) -> Callable[[str, str], None]:
    """Where a JS pool's ``console`` goes: ``GuestOutput`` events with their
    level, ``output(level, text)``, or stdout/stderr when nobody subscribes."""
    from ..js.host import default_output

    def console(level: str, text: str) -> None:
        job = current_job()
        sandbox_id = job.sandbox.id if job is not None and job.sandbox is not None else None
        if output is not None:
            output(level, text)
        if hub.wants(ev.GuestOutput):
            hub.post(ev.GuestOutput.from_text(sandbox_id, text, level=level))
        elif output is None:
            default_output(level, text)

    return console


class JSFactory:
    """Sandboxes of the JS runtime loaded with one set of handlers: the first
    starts the engine, compiles everything and takes the loaded snapshot;
    every other one (and every replacement) is a new sandbox restored to it."""

    def __init__(
        self,
        make: Callable[[], Sandbox],
        heap: int,
        handlers: Mapping[str, str],
        modules: Mapping[str, str],
        host_modules: Mapping[str, list[str]],
    ) -> None:
        self._make = make
        self._heap = heap
        self._handlers = dict(handlers)
        self._modules = dict(modules)
        self._host_modules = host_modules
        self._loaded: Snapshot | None = None

    def first(self) -> Sandbox:
        from ..js import runtime

        sandbox = self._make()
        try:
            runtime.start_engine(sandbox, self._heap)
            runtime.install(
                sandbox,
                handlers=self._handlers,
                modules=self._modules,
                host_modules=self._host_modules,
            )
            loaded = sandbox.snapshot()
            sandbox._set_baseline(loaded)
        except BaseException:
            sandbox.close()
            raise
        self._loaded = loaded
        return sandbox

    def another(self) -> Sandbox:
        """From the loaded snapshot: no engine start, no compiling."""
        assert self._loaded is not None, "first() makes the loaded snapshot"
        sandbox = self._make()
        try:
            sandbox.restore(self._loaded)
            sandbox._set_baseline(self._loaded)
        except BaseException:
            sandbox.close()
            raise
        return sandbox

    def make_all(self, size: int) -> list[Sandbox]:
        made = [self.first()]
        try:
            made += create_all(self.another, size - 1)
        except BaseException:
            made[0].close()
            raise
        return made
