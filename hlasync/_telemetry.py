"""OpenTelemetry traces and metrics, and the structured log records that go
with them, for every guest call, dump, timeout and worker death.

Only the OpenTelemetry *API* is used, imported lazily: the library never
configures an SDK (users do, or pass providers to
:func:`hlasync.observability.configure`). While no SDK provider is set (the
API's proxy providers answer), or the ``otel`` extra is absent, or
instrumentation is switched off (``HLASYNC_OTEL=0`` or ``configure(enabled=
False)``), a call costs one provider lookup and nothing is recorded.

The names (span, attributes, metrics, log fields) are listed in
``docs/observability.md``; :mod:`hlasync.observability` is the public face.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.metrics import Meter, MeterProvider
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = [
    "ATTR_CORE_PATH",
    "ATTR_FUNCTION",
    "ATTR_GUEST",
    "ATTR_OUTCOME",
    "ATTR_PATH",
    "ATTR_SANDBOX_ID",
    "SPAN_CALL",
    "CallSpan",
    "begin_call",
    "crashdump_reason",
    "outcome_of",
]

SCOPE = "hlasync"
SPAN_CALL = "hlasync.call"
EVENT_CRASHDUMP = "hlasync.crashdump"

ATTR_SANDBOX_ID = "hlasync.sandbox.id"
ATTR_GUEST = "hlasync.guest"
ATTR_FUNCTION = "hlasync.function"
ATTR_OUTCOME = "hlasync.outcome"
ATTR_PATH = "hlasync.path"
ATTR_CORE_PATH = "hlasync.core_path"
ATTR_TARGET = "hlasync.target"  # the pool or dedicated sandbox of a supervised call
ATTR_CALL_ID = "hlasync.call.id"  # the supervisor's call id
ATTR_REASON = "hlasync.reason"  # why a dump was written
ATTR_KIND = "hlasync.kind"  # of a timeout: wall or cpu
ATTR_POOL = "hlasync.pool"
ATTR_WORKER = "hlasync.worker"
ATTR_EXIT_STATUS = "hlasync.exit_status"
ATTR_ERROR = "hlasync.error"  # an exception's type name

_dump_log = logging.getLogger("hlasync.crashdump")
_supervisor_log = logging.getLogger("hlasync.supervisor")

# ------------------------------------------------------------ the switch
_enabled = os.environ.get("HLASYNC_OTEL", "1").strip().lower() not in ("0", "off", "false", "no")
#: Providers given to configure() (None: the API's global ones).
_tracer_provider: TracerProvider | None = None
_meter_provider: MeterProvider | None = None

_UNSET: Any = object()


def configure(
    *,
    enabled: bool | None = None,
    tracer_provider: Any = _UNSET,
    meter_provider: Any = _UNSET,
) -> None:
    """See :func:`hlasync.observability.configure`."""
    global _enabled, _tracer_provider, _meter_provider
    if enabled is not None:
        if not isinstance(enabled, bool):
            raise TypeError("enabled must be a bool")
        _enabled = enabled
    if tracer_provider not in (_UNSET, None) or meter_provider not in (_UNSET, None):
        _api()  # a span made from a given provider is made current through the API
    if tracer_provider is not _UNSET:
        if tracer_provider is not None and not hasattr(tracer_provider, "get_tracer"):
            raise TypeError("tracer_provider must be an OpenTelemetry TracerProvider or None")
        _tracer_provider = tracer_provider
        _tracers.clear()
    if meter_provider is not _UNSET:
        if meter_provider is not None and not hasattr(meter_provider, "get_meter"):
            raise TypeError("meter_provider must be an OpenTelemetry MeterProvider or None")
        _meter_provider = meter_provider
        with _meters_lock:
            _meters.clear()


def enabled() -> bool:
    return _enabled


# ------------------------------------------------------- the API, lazily
class _Api:
    """The OpenTelemetry API's modules once imported (None: not installed)."""

    trace: Any = None
    metrics: Any = None
    metrics_internal: Any = None
    context: Any = None
    proxies: tuple[type, ...] = ()
    status_error: Any = None
    loaded = False


def _api() -> type[_Api] | None:
    if not _Api.loaded:
        try:
            from opentelemetry import context, metrics, trace
            from opentelemetry.metrics import _internal as metrics_internal
            from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, StatusCode

            _Api.trace, _Api.metrics, _Api.context = trace, metrics, context
            _Api.metrics_internal = metrics_internal
            _Api.proxies = (
                ProxyTracerProvider,
                NoOpTracerProvider,
                metrics_internal._ProxyMeterProvider,
                metrics.NoOpMeterProvider,
            )
            _Api.status_error = StatusCode.ERROR
        except ImportError:
            _Api.trace = None
        _Api.loaded = True
    return _Api if _Api.trace is not None else None


_tracers: dict[int, Tracer] = {}


def tracer() -> Tracer | None:
    """hlasync's tracer, or None when nothing would record its spans."""
    if not _enabled:
        return None
    if _tracer_provider is not None:
        provider: Any = _tracer_provider
    else:
        api = _api()
        if api is None or _unset(api.trace, "_TRACER_PROVIDER", "OTEL_PYTHON_TRACER_PROVIDER"):
            return None
        provider = api.trace.get_tracer_provider()
        if isinstance(provider, api.proxies):
            return None
    found = _tracers.get(id(provider))
    if found is None:
        try:
            found = provider.get_tracer(SCOPE, _version())
        except Exception as exc:  # noqa: BLE001 - a broken SDK never fails a call
            _failed_once(exc)
            return None
        _tracers[id(provider)] = found
    return found


def _unset(module: Any, name: str, variable: str) -> bool:
    """Whether the API's global provider ``name`` is certainly not set: the
    cheap test a call makes while no SDK is configured (the API's own lookup
    reads the environment every time)."""
    return getattr(module, name, False) is None and variable not in _environment


#: The environment as the process started (a provider named there is loaded
#: by the API at its first lookup).
_environment = frozenset(os.environ)


class _Instruments:
    """hlasync's instruments on one meter provider."""

    def __init__(self, meter: Meter) -> None:
        # Counted here and read by the SDK when it collects: a call costs a
        # dict increment instead of an SDK measurement.
        self._counts: dict[tuple[str, str], int] = {}
        self._counts_lock = threading.Lock()
        meter.create_observable_counter(
            "hlasync.calls",
            callbacks=[self._observe_calls],
            unit="{call}",
            description="Guest calls, by outcome and function",
        )
        self.duration = meter.create_histogram(
            "hlasync.call.duration",
            unit="s",
            description="Duration of guest calls",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.crashdumps = meter.create_counter(
            "hlasync.crashdumps", unit="{dump}", description="Core dumps written, by reason"
        )
        self.crashdump_failures = meter.create_counter(
            "hlasync.crashdump.failures",
            unit="{dump}",
            description="Core dumps that could not be written, by reason",
        )
        self.timeouts = meter.create_counter(
            "hlasync.timeouts", unit="{call}", description="Calls stopped by a wall or CPU limit"
        )
        self.worker_restarts = meter.create_counter(
            "hlasync.worker.restarts",
            unit="{process}",
            description="Worker processes (or Ray actors) started again after they died",
        )
        self.lateness = meter.create_histogram(
            "hlasync.watchdog.lateness",
            unit="s",
            description="How long after a call's deadline the watchdog acted on it",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        meter.create_observable_up_down_counter(
            "hlasync.sandboxes",
            callbacks=[_observe_sandboxes],
            unit="{sandbox}",
            description="Open sandboxes (this process's and its supervisors' workers')",
        )
        meter.create_observable_gauge(
            "hlasync.pool.size",
            callbacks=[_observe_pools("size")],
            unit="{sandbox}",
            description="Sandboxes of a pool",
        )
        meter.create_observable_gauge(
            "hlasync.pool.busy",
            callbacks=[_observe_pools("busy")],
            unit="{sandbox}",
            description="Sandboxes of a pool running a call",
        )

    def count_call(self, outcome: str, function: str) -> None:
        key = (outcome, function)
        with self._counts_lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def _observe_calls(self, options: Any) -> Iterator[Any]:
        from opentelemetry.metrics import Observation

        with self._counts_lock:
            counts = list(self._counts.items())
        for (outcome, function), count in counts:
            yield Observation(count, {ATTR_OUTCOME: outcome, ATTR_FUNCTION: function})


#: Histogram buckets for durations in seconds, 10 µs to 10 s (the SDK's
#: defaults are made for milliseconds: every call would land in the first).
SECONDS_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip

_meters: dict[int, _Instruments] = {}
_meters_lock = threading.Lock()


def instruments() -> _Instruments | None:
    """hlasync's instruments, or None when nothing would record them."""
    if not _enabled:
        return None
    if _meter_provider is not None:
        provider: Any = _meter_provider
    else:
        api = _api()
        if api is None or _unset(
            api.metrics_internal, "_METER_PROVIDER", "OTEL_PYTHON_METER_PROVIDER"
        ):
            return None
        provider = api.metrics.get_meter_provider()
        if isinstance(provider, api.proxies):
            return None
    found = _meters.get(id(provider))
    if found is None:
        with _meters_lock:
            found = _meters.get(id(provider))
            if found is None:
                try:
                    found = _Instruments(provider.get_meter(SCOPE, _version()))
                except Exception as exc:  # noqa: BLE001 - a broken SDK never fails a call
                    _failed_once(exc)
                    return None
                _meters[id(provider)] = found
    return found


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hlasync")
    except Exception:  # noqa: BLE001 - not installed as a distribution
        return "0"


# ---------------------------------------------- gauges read on collection
#: Things whose sandboxes and pools the observable instruments read: objects
#: with ``_telemetry_sandboxes() -> int`` and ``_telemetry_pools() ->
#: iterable of (pool name, size, busy)`` (supervisors); local sandboxes are
#: counted through hlasync.sandbox's registry.
_sources: weakref.WeakSet[Any] = weakref.WeakSet()


def add_source(source: Any) -> None:
    _sources.add(source)


def discard_source(source: Any) -> None:
    _sources.discard(source)


def _observe_sandboxes(options: Any) -> Iterator[Any]:
    from opentelemetry.metrics import Observation

    from .sandbox.core import live_sandboxes

    total = len(live_sandboxes())
    for source in list(_sources):
        try:
            total += source._telemetry_remote_sandboxes()
        except Exception:  # noqa: BLE001 - a closing supervisor counts none
            continue
    yield Observation(total)


def _observe_pools(which: str) -> Callable[[Any], Iterator[Any]]:
    def observe(options: Any) -> Iterator[Any]:
        from opentelemetry.metrics import Observation

        for source in list(_sources):
            try:
                pools = list(source._telemetry_pools())
            except Exception:  # noqa: BLE001 - a closing supervisor reports none
                continue
            for name, size, busy in pools:
                yield Observation(size if which == "size" else busy, {ATTR_POOL: name})

    return observe


# ----------------------------------------------------------------- calls
def outcome_of(error: BaseException | None, *, cancelled: bool = False) -> str:
    """``ok``, ``crashed``, ``timeout``, ``cancelled`` or ``error``."""
    from .errors import (
        GuestAborted,
        GuestCancelled,
        GuestCrashed,
        GuestProtocolError,
        GuestTimeout,
    )

    if error is None:
        return "ok"
    if isinstance(error, GuestTimeout):
        return "timeout"
    if cancelled or isinstance(error, GuestCancelled):
        return "cancelled"
    if isinstance(error, GuestCrashed | GuestAborted | GuestProtocolError):
        return "crashed"
    return "error"


class CallSpan:
    """One guest call's telemetry: its span, its timing for the call metrics,
    and its outcome.

    The span starts as the call begins, in the caller's context (a stand-in
    for a worker process's remote parent has only ``span``).
    """

    __slots__ = (
        "attributes",
        "dumped",
        "ended",
        "function",
        "held",
        "lock",
        "meters",
        "parent",
        "path",
        "pending",
        "sandbox_id",
        "span",
        "start",
        "start_ns",
        "tracer",
    )

    def __init__(
        self,
        tracer: Tracer | None,
        meters: _Instruments | None,
        function: str,
        attributes: dict[str, str | int],
    ) -> None:
        self.tracer = tracer
        self.meters = meters
        self.function = function
        self.attributes = attributes
        #: The caller's context: the span's parent.
        self.parent = _Api.context.get_current() if tracer is not None else None
        self.start_ns = time.time_ns()
        self.start = time.perf_counter()
        self.span: Span | None = None
        self.dumped: list[str] = []
        #: How the call reached its guest: ``exit`` or ``doorbell`` (once known).
        self.path: str | None = None
        self.sandbox_id: str | None = None
        #: Its outcome is decided by whoever holds it (a JS pool's handler call
        #: decodes the reply after the guest call ended): see :meth:`release`.
        self.held = False
        self.pending: tuple[BaseException | None, bool] | None = None
        self.ended = False
        self.lock = threading.Lock()

    def materialize(self) -> Span | None:
        """The span, made now if it was not yet (None without a tracer)."""
        with self.lock:
            if self.span is None and self.tracer is not None:
                try:
                    self.span = self.tracer.start_span(
                        SPAN_CALL,
                        context=self.parent,
                        attributes=self.attributes,
                        start_time=self.start_ns,
                    )
                except Exception as exc:  # noqa: BLE001 - a broken SDK never fails a call
                    _failed_once(exc)
                    self.tracer = None
            return self.span

    @contextmanager
    def current(self) -> Iterator[None]:
        """Make the span the current one of this thread's context meanwhile
        (host functions and nested calls run inside it)."""
        span = self.materialize()
        if span is None:
            yield
            return
        api = _Api
        try:
            token = api.context.attach(api.trace.set_span_in_context(span))
        except Exception as exc:  # noqa: BLE001 - a broken SDK never fails a call
            _failed_once(exc)
            yield
            return
        try:
            yield
        finally:
            api.context.detach(token)

    def dump_written(self, path: str, reason: str) -> None:
        """A dump of this call was written: a span event (once per path)."""
        if self.tracer is None and self.span is None:
            return
        span = self.materialize()
        if span is None or path in self.dumped:
            return
        self.dumped.append(path)
        try:
            span.set_attribute(ATTR_CORE_PATH, path)
            span.add_event(EVENT_CRASHDUMP, {ATTR_CORE_PATH: path, ATTR_REASON: reason})
        except Exception as exc:  # noqa: BLE001 - a broken SDK never fails a dump
            _failed_once(exc)

    def end(
        self,
        error: BaseException | None,
        *,
        path: str | None = None,
        sandbox_id: str | None = None,
        cancelled: bool = False,
    ) -> None:
        """The call's outcome: its span ends, its count and duration are
        recorded (once; a held span only notes its outcome until
        :meth:`release` or :meth:`unhold`)."""
        with self.lock:
            self.path = path or self.path
            self.sandbox_id = sandbox_id or self.sandbox_id
            if self.ended:
                return
            if self.held:
                self.pending = (error, cancelled)
                return
            self.ended = True
        duration = time.perf_counter() - self.start
        outcome = outcome_of(error, cancelled=cancelled)
        try:
            if self.tracer is not None or self.span is not None:
                self._end_span(error, outcome)
        except Exception as exc:  # noqa: BLE001 - a broken SDK never loses the metrics
            _failed_once(exc)
        meters = self.meters
        if meters is not None:
            meters.count_call(outcome, self.function)
            try:
                attributes = {ATTR_OUTCOME: outcome, ATTR_FUNCTION: self.function}
                meters.duration.record(duration, attributes)
                if outcome == "timeout":
                    meters.timeouts.add(1, {ATTR_KIND: getattr(error, "kind", "wall")})
            except Exception as exc:  # noqa: BLE001 - a broken SDK never fails a call
                _failed_once(exc)

    def release(self, error: BaseException | None, *, cancelled: bool = False) -> None:
        """End a held span with its holder's outcome."""
        with self.lock:
            self.held = False
        self.end(error, cancelled=cancelled)

    def unhold(self) -> None:
        """Its holder gave up (cancelled): the call's own outcome ends it,
        now if it is known already."""
        with self.lock:
            self.held = False
            pending, self.pending = self.pending, None
        if pending is not None:
            self.end(pending[0], cancelled=pending[1])

    def _end_span(self, error: BaseException | None, outcome: str) -> None:
        attributes: dict[str, str] = {ATTR_OUTCOME: outcome}
        if self.sandbox_id is not None:
            attributes[ATTR_SANDBOX_ID] = self.sandbox_id
        if self.path is not None:
            attributes[ATTR_PATH] = self.path
        if error is not None:
            attributes[ATTR_ERROR] = type(error).__name__
        span = self.materialize()
        if span is None:
            return
        span.set_attributes(attributes)
        core_path = getattr(error, "core_path", None)
        if core_path is not None:
            path = str(core_path)
            self.dump_written(path, _recent_reasons.get(path) or crashdump_reason_of_error(error))
        if error is not None:
            if outcome != "cancelled":
                span.record_exception(error)
            span.set_status(_Api.status_error, f"{type(error).__name__}: {error}"[:300])
        span.end()


class HandlerCall:
    """A JS pool's handler call as its supervised call sees it: the span is
    named after the handler and held for the handler call to end."""

    __slots__ = ("name", "span")

    def __init__(self, name: str) -> None:
        self.name = name
        self.span: CallSpan | None = None


#: Set by JSPool.call_handler around its guest call (see HandlerCall).
handler_call: ContextVar[HandlerCall | None] = ContextVar("hlasync_handler_call", default=None)


def begin_call(
    function: str,
    *,
    guest: str,
    sandbox_id: str | None = None,
    target: str | None = None,
    call_id: int | None = None,
) -> CallSpan | None:
    """Start one call's span (a child of the caller's current span) and its
    timing; None when neither traces nor metrics would be recorded."""
    if not _enabled:
        return None
    trace_ = tracer()
    meters = instruments()
    if trace_ is None and meters is None:
        return None
    attributes: dict[str, str | int] = {ATTR_GUEST: guest, ATTR_FUNCTION: function}
    if sandbox_id is not None:
        attributes[ATTR_SANDBOX_ID] = sandbox_id
    if target is not None:
        attributes[ATTR_TARGET] = target
    if call_id is not None:
        attributes[ATTR_CALL_ID] = call_id
    try:
        record = CallSpan(trace_, meters, function, attributes)
    except Exception as exc:  # noqa: BLE001 - a broken SDK never fails a call
        _failed_once(exc)
        return None
    if trace_ is not None:
        record.materialize()  # started now: span processors see it while it runs
    return record


_failures: set[str] = set()


def _failed_once(error: BaseException) -> None:
    """The SDK (or a processor, exporter or reader given to it) raised: the
    call goes on; logged once per kind of failure."""
    key = f"{type(error).__name__}: {error}"[:200]
    if key not in _failures:
        _failures.add(key)
        logging.getLogger("hlasync.telemetry").warning(
            "OpenTelemetry recording failed (%s); hlasync goes on without it", key
        )


@contextmanager
def no_span() -> Iterator[None]:
    """Run without a current span (not in one a spawning task happened to have)."""
    if not _Api.loaded or _Api.context is None:
        yield
        return
    token = _Api.context.attach(_Api.context.Context())
    try:
        yield
    finally:
        _Api.context.detach(token)


# ------------------------------------------------ across process borders
def inject(record: CallSpan | None) -> dict[str, str] | None:
    """The trace context of ``record``'s span for another process (through
    the API's global propagator: W3C ``traceparent`` by default)."""
    if record is None or (record.tracer is None and record.span is None):
        return None
    span = record.materialize()
    if span is None:
        return None
    try:
        from opentelemetry import propagate

        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=_Api.trace.set_span_in_context(span))
    except Exception as exc:  # noqa: BLE001 - a broken propagator never fails a call
        _failed_once(exc)
        return None
    return carrier or None


def remote_span(carrier: dict[str, str], function: str) -> CallSpan | None:
    """In a worker process: a stand-in for the caller's span, from its trace
    context (``carrier``), made current while the call runs so that host
    functions run here nest under the caller's span. It records nothing and
    ends nothing here: the span is the caller's, and so are the metrics."""
    api = _api()
    if api is None or not _enabled:
        return None
    try:
        from opentelemetry import propagate

        parent = api.trace.get_current_span(propagate.extract(carrier))
        if not parent.get_span_context().is_valid:
            return None
    except Exception:  # noqa: BLE001 - a malformed carrier or a broken propagator: no parent
        return None
    record = CallSpan(None, None, function, {})
    record.span = parent
    record.ended = True  # never ended or counted here
    return record


# ------------------------------------------------------------------ dumps
_REASONS = {
    "fault": "fault",
    "abort": "abort",
    "timeout": "timeout",
    "cpu-timeout": "timeout",
    "on-demand": "on_demand",
    "protocol-error": "protocol",
    "unexpected-exit": "protocol",
    "cancelled": "cancelled",
    "signal": "signal",
}


def crashdump_reason(reason: str) -> str:
    """The ``hlasync.reason`` of a dump's internal reason (as its note records it)."""
    return _REASONS.get(reason, reason.replace("-", "_"))


def crashdump_reason_of_error(error: BaseException | None) -> str:
    from .errors import GuestAborted, GuestCrashed, GuestProtocolError, GuestTimeout

    if isinstance(error, GuestTimeout):
        return "timeout"
    if isinstance(error, GuestCrashed):
        return "fault"
    if isinstance(error, GuestAborted):
        return "abort"
    if isinstance(error, GuestProtocolError):
        return "protocol"
    return "cancelled"


def dump_extra(sandbox_id: str, reason: str, function: str | None) -> dict[str, object]:
    """The ``extra`` fields of a dump's log record (the writer adds its path)."""
    return {
        ATTR_SANDBOX_ID: sandbox_id,
        ATTR_REASON: crashdump_reason(reason),
        ATTR_FUNCTION: function,
    }


def dump_done(
    sandbox_id: str,
    reason: str,
    function: str | None,
    path: str | None,
    error: BaseException | None,
    span: CallSpan | None,
) -> None:
    """A dump was written (``path``) or failed (``error``): counted, and an
    event on the span of the call it was made of (when known). The log
    record of a written dump is the "Core dump created" one
    (:mod:`hlasync.crashdump.placement`); a failure is logged here."""
    try:
        _dump_done(sandbox_id, reason, function, path, error, span)
    except Exception as exc:  # noqa: BLE001 - a broken SDK never fails a dump
        _failed_once(exc)


def _dump_done(
    sandbox_id: str,
    reason: str,
    function: str | None,
    path: str | None,
    error: BaseException | None,
    span: CallSpan | None,
) -> None:
    label = crashdump_reason(reason)
    if error is not None:
        _dump_log.warning(
            "sandbox %s: core dump (%s) failed: %s",
            sandbox_id,
            label,
            error,
            extra={**dump_extra(sandbox_id, reason, function), ATTR_ERROR: type(error).__name__},
        )
    elif span is not None and path is not None:
        span.dump_written(path, label)
    dump_counted(reason, failed=error is not None)


def dump_counted(reason: str, *, failed: bool, path: str | None = None) -> None:
    """One dump (internal ``reason``) in ``hlasync.crashdumps`` or, ``failed``,
    in ``hlasync.crashdump.failures``. ``path``: a written dump of a worker
    process, whose reason the span of its call names when the outcome comes."""
    if path is not None:
        _recent_reasons[path] = crashdump_reason(reason)
        while len(_recent_reasons) > RECENT_REASONS:
            _recent_reasons.pop(next(iter(_recent_reasons)), None)
    try:
        meters = instruments()
        if meters is not None:
            counter = meters.crashdump_failures if failed else meters.crashdumps
            counter.add(1, {ATTR_REASON: crashdump_reason(reason)})
    except Exception as exc:  # noqa: BLE001 - a broken SDK never fails a dump
        _failed_once(exc)


#: The reasons of the latest dumps worker processes wrote, by path.
_recent_reasons: dict[str, str] = {}
RECENT_REASONS = 256


_sandbox_log = logging.getLogger("hlasync.sandbox")


def protocol_error(sandbox_id: str, error: Any) -> None:
    """A guest broke the call protocol (a ``GuestProtocolError``): a log record."""
    _sandbox_log.warning(
        "%s",
        error,
        extra={
            ATTR_SANDBOX_ID: sandbox_id,
            ATTR_FUNCTION: error.function,
            ATTR_REASON: "protocol",
            ATTR_CORE_PATH: str(error.core_path) if error.core_path is not None else None,
        },
    )


# -------------------------------------------------------- the supervisor
def timed_out(
    kind: str, *, sandbox_id: str | None, function: str, limit: float | None, elapsed: float
) -> None:
    """A call's wall (``wall``) or CPU (``cpu``) limit expired: a log record
    (the count is the call's outcome's, in :meth:`CallSpan.end`)."""
    _supervisor_log.warning(
        "sandbox %s: %s() passed its %s limit of %s s (%.3f s): dumping and stopping it",
        sandbox_id,
        function,
        kind,
        limit,
        elapsed,
        extra={
            ATTR_SANDBOX_ID: sandbox_id,
            ATTR_FUNCTION: function,
            ATTR_KIND: kind,
            "hlasync.limit": limit,
            "hlasync.elapsed": elapsed,
        },
    )


def watchdog_late(seconds: float, kind: str) -> None:
    """A watchdog acted on a ``kind`` (wall or cpu) limit ``seconds`` after it
    expired (for cpu: CPU-seconds used past the limit)."""
    try:
        meters = instruments()
        if meters is not None:
            meters.lateness.record(max(seconds, 0.0), {ATTR_KIND: kind})
    except Exception as exc:  # noqa: BLE001 - a broken SDK never fails a call
        _failed_once(exc)


def worker_restarted(worker: int) -> None:
    """Worker process (or Ray actor) ``worker`` was started again after it died."""
    try:
        meters = instruments()
        if meters is not None:
            meters.worker_restarts.add(1, {ATTR_WORKER: worker})
    except Exception as exc:  # noqa: BLE001 - a broken SDK never stops a relaunch
        _failed_once(exc)
