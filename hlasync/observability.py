"""OpenTelemetry traces and metrics of hlasync, and a Prometheus endpoint.

hlasync speaks only the OpenTelemetry *API*: every guest call is a span named
:data:`SPAN_CALL`, and calls, dumps, timeouts, sandboxes, pools and worker
restarts are the metrics named in :data:`METRICS`. Nothing is recorded until
an OpenTelemetry SDK is configured, either globally
(``opentelemetry.trace.set_tracer_provider``,
``opentelemetry.metrics.set_meter_provider``) or for hlasync alone through
:func:`configure`. ``docs/observability.md`` lists every span, attribute,
metric and log record, and what the instrumentation costs.

:func:`serve_prometheus` is the one-line way to a scrape target: an SDK
``MeterProvider`` with OpenTelemetry's Prometheus reader, served over HTTP on
a loopback port. It needs the ``otel`` extra (``opentelemetry-sdk``,
``opentelemetry-exporter-prometheus``, ``prometheus-client``).
"""

from __future__ import annotations

import enum
import inspect
import ipaddress
import threading
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from . import _telemetry
from .errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from opentelemetry.metrics import MeterProvider as ApiMeterProvider
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider as ApiTracerProvider
    from prometheus_client import CollectorRegistry

__all__ = [
    "ATTR_CALL_ID",
    "ATTR_CORE_PATH",
    "ATTR_ERROR",
    "ATTR_EXIT_STATUS",
    "ATTR_FUNCTION",
    "ATTR_GUEST",
    "ATTR_KIND",
    "ATTR_OUTCOME",
    "ATTR_PATH",
    "ATTR_POOL",
    "ATTR_REASON",
    "ATTR_SANDBOX_ID",
    "ATTR_TARGET",
    "ATTR_WORKER",
    "EVENT_CRASHDUMP",
    "METRICS",
    "SPAN_CALL",
    "PrometheusEndpoint",
    "configure",
    "instrumentation_enabled",
    "serve_prometheus",
]

#: The span of every guest call.
SPAN_CALL: Final = _telemetry.SPAN_CALL
#: The span event added when a core dump of the call is written.
EVENT_CRASHDUMP: Final = _telemetry.EVENT_CRASHDUMP

# Attribute names: on spans, metric points and as ``extra`` keys of log records.
ATTR_SANDBOX_ID: Final = _telemetry.ATTR_SANDBOX_ID
ATTR_GUEST: Final = _telemetry.ATTR_GUEST
ATTR_FUNCTION: Final = _telemetry.ATTR_FUNCTION
ATTR_OUTCOME: Final = _telemetry.ATTR_OUTCOME
ATTR_PATH: Final = _telemetry.ATTR_PATH
ATTR_CORE_PATH: Final = _telemetry.ATTR_CORE_PATH
ATTR_TARGET: Final = _telemetry.ATTR_TARGET
ATTR_CALL_ID: Final = _telemetry.ATTR_CALL_ID
ATTR_REASON: Final = _telemetry.ATTR_REASON
ATTR_KIND: Final = _telemetry.ATTR_KIND
ATTR_POOL: Final = _telemetry.ATTR_POOL
ATTR_WORKER: Final = _telemetry.ATTR_WORKER
ATTR_EXIT_STATUS: Final = _telemetry.ATTR_EXIT_STATUS
ATTR_ERROR: Final = _telemetry.ATTR_ERROR

#: The names of hlasync's instruments (OpenTelemetry names; the Prometheus
#: exporter writes ``hlasync.calls`` as ``hlasync_calls_total`` and so on).
METRICS: Final = (
    "hlasync.calls",
    "hlasync.call.duration",
    "hlasync.crashdumps",
    "hlasync.crashdump.failures",
    "hlasync.timeouts",
    "hlasync.sandboxes",
    "hlasync.pool.size",
    "hlasync.pool.busy",
    "hlasync.worker.restarts",
    "hlasync.watchdog.lateness",
)

#: serve_prometheus's default port: the one OpenTelemetry's Prometheus exporter uses.
DEFAULT_PROMETHEUS_PORT: Final = 9464

_OTEL_EXTRA_HINT = (
    "install hlasync with its otel extra (hlasync[otel]; from a checkout: "
    "python -m pip install -e '.[otel]')"
)


class _Unset(enum.Enum):
    """A provider argument that was not given (None means "the global one")."""

    UNSET = enum.auto()


_UNSET: Final = _Unset.UNSET


def configure(
    *,
    enabled: bool | None = None,
    tracer_provider: ApiTracerProvider | _Unset | None = _UNSET,
    meter_provider: ApiMeterProvider | _Unset | None = _UNSET,
) -> None:
    """Choose what hlasync's instrumentation records to.

    ``tracer_provider`` and ``meter_provider``: providers hlasync uses instead
    of OpenTelemetry's global ones (so that a library inside a bigger
    program can record to providers of its own); ``None`` goes back to the
    global ones. An argument left out keeps its current setting.

    ``enabled=False`` switches the instrumentation off entirely: no span,
    metric or provider lookup on any call (``enabled=True`` switches it on
    again). The environment variable ``HLASYNC_OTEL=0`` (or ``off``,
    ``false``, ``no``) switches it off when hlasync is imported.

    Log records (``hlasync.*`` loggers) are written either way.
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None, not {type(enabled).__name__}")
    changes: dict[str, Any] = {}
    if tracer_provider is not _UNSET:
        changes["tracer_provider"] = tracer_provider
    if meter_provider is not _UNSET:
        changes["meter_provider"] = meter_provider
    _telemetry.configure(enabled=enabled, **changes)


def instrumentation_enabled() -> bool:
    """Whether the instrumentation is switched on (see :func:`configure`).
    On, it still records nothing until an SDK provider is configured."""
    return _telemetry.enabled()


# --------------------------------------------------------------- Prometheus
class PrometheusEndpoint:
    """A Prometheus scrape target serving hlasync's metrics, as
    :func:`serve_prometheus` started it.

    ``url`` is the address to scrape (``http://HOST:PORT/metrics``); ``port``
    is the real port (also when 0 asked for a free one). ``close()`` (or the
    end of a ``with`` block) stops the HTTP server and shuts the meter
    provider down (for ``set_global=False``, hlasync goes back to the meter
    provider it had before); it may be called more than once.
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        meter_provider: MeterProvider,
        registry: CollectorRegistry,
        server: WSGIServer,
        thread: threading.Thread,
        configured: bool,
        previous: ApiMeterProvider | None,
    ) -> None:
        self.host = host
        self.port = port
        #: The SDK provider whose metrics the endpoint serves.
        self.meter_provider = meter_provider
        #: The ``prometheus_client`` registry the endpoint serves.
        self.registry = registry
        self._server = server
        self._thread = thread
        #: Whether hlasync was given ``meter_provider`` (``set_global=False``),
        #: and the provider it had before (put back by close()).
        self._configured = configured
        self._previous = previous
        self._lock = threading.Lock()
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop serving, shut the provider down, and (for ``set_global=False``)
        give hlasync back the meter provider it had before."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._server.shutdown()  # returns once the serving thread's loop has ended
        self._server.server_close()
        self._thread.join()
        # hlasync stops recording to the provider before it is shut down; a
        # provider given to configure() since is left as it is.
        if self._configured and _telemetry._meter_provider is self.meter_provider:
            _telemetry.configure(meter_provider=self._previous)
        self.meter_provider.shutdown()

    def __enter__(self) -> PrometheusEndpoint:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "serving"
        return f"<PrometheusEndpoint {self.url} {state}>"


def _check_address(host: object, port: object) -> None:
    if not isinstance(host, str):
        raise TypeError(f"host must be a str, not {type(host).__name__}")
    if not host.strip():
        raise ValueError("host must name an interface, such as '127.0.0.1'")
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an int, not {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0 (any free port) to 65535, not {port}")


def _unbracketed(host: str) -> str:
    """``[::1]`` as ``::1`` (what the socket takes); other hosts unchanged."""
    inner = host.strip()
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1]
        ipaddress.IPv6Address(inner)  # a ValueError for anything else in brackets
    return inner


def _check_global_meter_provider() -> None:
    """A ConfigError when a meter provider is already set globally (OpenTelemetry
    takes one per process and ignores later ones with a warning)."""
    from opentelemetry import metrics
    from opentelemetry.metrics import _internal as metrics_internal

    current = metrics.get_meter_provider()
    if isinstance(current, metrics_internal._ProxyMeterProvider):
        return
    kind = f"{type(current).__module__}.{type(current).__qualname__}"
    raise ConfigError(
        f"a global OpenTelemetry meter provider ({kind}) is already set, and OpenTelemetry "
        "allows one per process: add a PrometheusMetricReader to it instead "
        "(MeterProvider(metric_readers=[PrometheusMetricReader(), ...]) from "
        "opentelemetry.exporter.prometheus, served with prometheus_client.start_http_server), "
        "or call serve_prometheus(set_global=False) to give hlasync a provider of its own"
    )


def serve_prometheus(
    port: int = DEFAULT_PROMETHEUS_PORT,
    host: str = "127.0.0.1",
    *,
    set_global: bool = True,
) -> PrometheusEndpoint:
    """Serve hlasync's metrics to Prometheus at ``http://HOST:PORT/metrics``.

    Builds an OpenTelemetry SDK ``MeterProvider`` whose one reader is the
    Prometheus exporter's ``PrometheusMetricReader``, and serves it with
    ``prometheus_client``'s HTTP server on a thread of its own. The default
    host is loopback: ``host="0.0.0.0"`` exposes the metrics to every
    network the machine is on. ``port=0`` picks a free port
    (:attr:`PrometheusEndpoint.port` says which).

    ``set_global=True`` (the default) makes the provider OpenTelemetry's
    global one, so the rest of the program's metrics are served too; that
    is refused with a :class:`~hlasync.errors.ConfigError` when a global
    meter provider is already set (add a ``PrometheusMetricReader`` to that
    one instead). The global provider stays set after ``close()`` (it cannot
    be unset) and records nothing more. ``set_global=False`` gives the
    provider to hlasync alone (``configure(meter_provider=...)``), which
    ``close()`` undoes (hlasync goes back to the provider it had before).

    A :class:`~hlasync.errors.ConfigError` too when the ``otel`` extra's
    packages are missing; ``TypeError`` or ``ValueError`` for a bad host or
    port, ``OSError`` when the port cannot be bound.
    """
    _check_address(host, port)
    if not isinstance(set_global, bool):
        raise TypeError(f"set_global must be a bool, not {type(set_global).__name__}")
    bind_host = _unbracketed(host)
    try:
        from opentelemetry import metrics
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
        from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
    except ImportError as exc:
        raise ConfigError(
            f"serve_prometheus needs opentelemetry-sdk, opentelemetry-exporter-prometheus and "
            f"prometheus-client ({exc}): {_OTEL_EXTRA_HINT}"
        ) from exc
    if set_global:
        _check_global_meter_provider()

    # A registry of the endpoint's own where the reader takes one (exporters
    # of 2026 on, open-telemetry/opentelemetry-python#5055), so that two
    # endpoints, or a program's own use of prometheus_client, do not mix;
    # older readers register in prometheus_client's default REGISTRY, which
    # then also serves its process and platform metrics.
    if "registry" in inspect.signature(PrometheusMetricReader).parameters:
        registry = CollectorRegistry()
        reader = PrometheusMetricReader(registry=registry)
    else:
        registry = REGISTRY
        reader = PrometheusMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        server, thread = start_http_server(port, addr=bind_host, registry=registry)
    except BaseException:
        provider.shutdown()  # unregisters the reader's collector
        raise
    if set_global:
        metrics.set_meter_provider(provider)
        if metrics.get_meter_provider() is not provider:  # another thread won the race
            server.shutdown()
            server.server_close()
            provider.shutdown()
            _check_global_meter_provider()  # raises, naming the provider that won
    previous = _telemetry._meter_provider
    if not set_global:
        _telemetry.configure(meter_provider=provider)
    return PrometheusEndpoint(
        host=bind_host,
        port=server.server_port,
        meter_provider=provider,
        registry=registry,
        server=server,
        thread=thread,
        configured=not set_global,
        previous=previous,
    )
