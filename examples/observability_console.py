"""hlasync's OpenTelemetry spans and metrics, exported to the console.

Run it from a checkout (needs /dev/kvm and the ``otel`` extra)::

    python examples/observability_console.py

It configures the OpenTelemetry SDK as a program does (a tracer provider
with a ``ConsoleSpanExporter``, a meter provider with a
``ConsoleMetricExporter``), then makes a few guest calls inside spans of its
own: a plain call, one whose guest calls a host function that opens a span
(it nests under the call), one that crashes (its span names the core dump),
and a call through a supervisor's pool. Each span is printed when it ends,
one line each (the exporters' default is JSON: drop the ``formatter``
arguments to see it); the metrics are printed once at the end. Dumps go to
``HYPERLIGHT_CORE_DUMP_DIR``, else the temp directory, and stay there.
"""

from __future__ import annotations

import os

import anyio
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    HistogramDataPoint,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from hlasync import GuestCrashed, Sandbox, guests
from hlasync.supervisor import Supervisor

tracer = trace.get_tracer("observability-example")
#: The span event attributes printed.
SHOWN_EVENT_FIELDS = ("hlasync.core_path", "hlasync.reason", "exception.type")


def double(x: int) -> int:
    """A host function with a span of its own: a child of the guest call's span."""
    with tracer.start_as_current_span("double") as span:
        span.set_attribute("x", x)
        return 2 * x


def span_line(span: ReadableSpan) -> str:
    """One line per span: its name, its id and its parent's, its attributes and events."""
    own = span.context.span_id if span.context is not None else 0
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else "-" * 16
    attributes = " ".join(f"{key}={value!r}" for key, value in (span.attributes or {}).items())
    line = f"span {span.name:<18} {own:016x} parent {parent} {attributes}".rstrip()
    for event in span.events:  # the dump, and a failed call's exception (its stack left out)
        shown = {k: v for k, v in (event.attributes or {}).items() if k in SHOWN_EVENT_FIELDS}
        line += f"\n    event {event.name} {shown}"
    return line + os.linesep


def metric_lines(data: MetricsData) -> str:
    """hlasync's metric points, one line each."""
    lines = []
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            if scope.scope.name != "hlasync":
                continue
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    if isinstance(point, HistogramDataPoint):
                        value = f"count={point.count} sum={point.sum * 1e3:.3f} ms"
                    elif isinstance(point, NumberDataPoint):
                        value = f"{point.value}"
                    else:
                        value = repr(point)
                    lines.append(f"metric {metric.name} {dict(point.attributes or {})} {value}")
    return "".join(line + os.linesep for line in lines)


async def supervised() -> None:
    async with Supervisor(workers=1) as sup:
        pool = await sup.create_pool(
            guests.path("simpleguest"), size=1, host_functions={"double": double}
        )
        with tracer.start_as_current_span("supervised request"):
            # The host function runs on the supervisor's thread, inside the call's span.
            result = await pool.call("call_host", "double", 5)
        print(f"await pool.call('call_host', 'double', 5) -> {result!r}")


def main() -> None:
    resource = Resource.create({"service.name": "hlasync-observability-example"})
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        SimpleSpanProcessor(ConsoleSpanExporter(formatter=span_line))
    )
    trace.set_tracer_provider(tracer_provider)
    # A long interval: the metrics are exported once, when the provider shuts down.
    reader = PeriodicExportingMetricReader(
        ConsoleMetricExporter(formatter=metric_lines), export_interval_millis=3_600_000
    )
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    metrics.set_meter_provider(meter_provider)

    with tracer.start_as_current_span("sync request"), Sandbox(guests.path("simpleguest")) as sb:
        sb.register_host_function("double", double)
        print(f"add(2, 3) -> {sb.call('add', 2, 3)!r}")
        print(f"call_host('double', 21) -> {sb.call('call_host', 'double', 21)!r}")
        try:
            sb.call("divide_by_zero")
        except GuestCrashed as exc:
            print(f"divide_by_zero -> GuestCrashed; its span names the core: {exc.core_path}")
    anyio.run(supervised)

    print("metrics at the end:")
    meter_provider.shutdown()  # the reader exports a last time
    tracer_provider.shutdown()


if __name__ == "__main__":
    main()
