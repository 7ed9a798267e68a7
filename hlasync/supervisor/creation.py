"""Making the sandboxes of a target from its :class:`~.specs.TargetSpec`:
plain guests, and JavaScript runtimes initialised once and copied from their
loaded snapshot. The same code runs in the supervisor's process (threads)
and in worker processes; only how host functions and output are reached
differs (``resolve``, ``output``)."""

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
from .hub import Publisher
from .jobs import current_job
from .specs import HostKey, TargetSpec, import_reference

__all__ = ["Builder", "create_all", "load_image", "new_sandbox"]


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
    hub: Publisher,
    on_crashdump: Callable[[CrashdumpRecord], None],
    *,
    spin: bool = False,
) -> Sandbox:
    """A sandbox whose prints become :class:`~hlasync.events.GuestOutput`
    events (and go to ``output``, or to stdout when nobody subscribes).
    ``spin``: its config's ``spin`` applies (a dedicated sandbox, or a pool
    whose config has ``hot_restore``: its members restore in place); other
    pools' members restore after every call on the exit path, which would
    park a spinning guest at every call."""
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
    sandbox._spin_allowed = spin and sandbox._debugger is None  # a debugger's stops exit
    holder.append(sandbox)
    sandbox.add_crashdump_listener(on_crashdump)
    for name, function in dict(host_functions).items():
        sandbox.register_host_function(name, function)
    return sandbox


def js_console(
    hub: Publisher, output: Callable[[str, str], None] | None
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


class Builder:
    """Makes the sandboxes of one target (or one worker's shard of it).

    ``resolve(key)`` gives the function a guest's host call ``key`` runs
    (the caller's own, or a proxy to the supervisor's process); importable
    references in the spec are imported here. ``output`` receives a plain
    guest's prints, ``output(level, text)`` a JavaScript guest's console.
    For JavaScript, the first sandbox starts the engine, compiles everything
    and takes the loaded snapshot; every other one (and every replacement)
    is a new sandbox restored to it.
    """

    def __init__(
        self,
        spec: TargetSpec,
        image: GuestImage,
        resolve: Callable[[HostKey], Callable[..., Any]],
        output: Callable[..., None] | None,
        hub: Publisher,
        on_crashdump: Callable[[CrashdumpRecord], None],
    ) -> None:
        self.spec = spec
        self.image = image
        #: A pool whose members restore in place: they spin.
        self._hot_pool = spec.hot_pool
        self._hub = hub
        self._on_crashdump = on_crashdump
        functions: dict[HostKey, Callable[..., Any]] = {
            key: resolve(key) for key in spec.host_functions
        }
        for key, reference in spec.references.items():
            functions[key] = import_reference(reference)
        self._loaded: Snapshot | None = None
        self._output: Callable[[str], None] | None
        if spec.kind == "js":
            from ..js.host import HostBridge

            bridge = HostBridge(js_console(hub, output))
            for (module, name), function in ((k, f) for k, f in functions.items() if len(k) == 2):
                bridge.register(module, name, function)
            #: What every sandbox registers (the bridge's two entry points for JS).
            self.sandbox_functions: dict[str, Callable[..., Any]] = bridge.sandbox_functions()
            self._host_modules = bridge.modules()
            self._output = None
        else:
            self.sandbox_functions = {key[0]: function for key, function in functions.items()}
            self._output = output

    def new(self) -> Sandbox:
        return new_sandbox(
            self.image,
            self.spec.config,
            self.sandbox_functions,
            self._output,
            self._hub,
            self._on_crashdump,
            spin=self.spec.kind == "sandbox" or self._hot_pool,
        )

    def make_all(self) -> list[Sandbox]:
        """The target's ``spec.size`` sandboxes; none are left open if one fails."""
        if self.spec.kind != "js":
            return create_all(self.new, self.spec.size)
        made = [self._first_js()]
        try:
            made += create_all(self.another, self.spec.size - 1)
        except BaseException:
            made[0].close()
            raise
        return made

    def another(self) -> Sandbox:
        """One more sandbox (a pool's replacement for a member that broke)."""
        if self.spec.kind != "js":
            return self.new()
        assert self._loaded is not None, "make_all() makes the loaded snapshot first"
        sandbox = self.new()
        try:
            sandbox.restore(self._loaded)
            sandbox._set_baseline(self._loaded)
        except BaseException:
            sandbox.close()
            raise
        return sandbox

    def _first_js(self) -> Sandbox:
        from ..js import runtime

        spec = self.spec
        sandbox = self.new()
        try:
            runtime.start_engine(sandbox, spec.heap)
            runtime.install(
                sandbox,
                handlers=dict(spec.handlers),
                modules=dict(spec.modules),
                host_modules=self._host_modules,
            )
            loaded = sandbox.snapshot()
            sandbox._set_baseline(loaded)
        except BaseException:
            sandbox.close()
            raise
        self._loaded = loaded
        return sandbox
