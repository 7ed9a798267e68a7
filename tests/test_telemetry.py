"""OpenTelemetry traces, metrics and log records of real calls, checked with
the real OpenTelemetry SDK (an in-memory span exporter and metric reader
given to hlasync through ``hlasync.observability.configure``): sync calls,
pools and dedicated sandboxes in threads and worker processes, JavaScript
handlers, host functions nested in the call's span, dumps, timeouts, worker
deaths. The Ray path is the last test of tests/ray/test_cluster.py and the
Prometheus endpoint in tests/test_prometheus.py."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from hlasync import (
    GuestCancelled,
    GuestCrashed,
    GuestTimeout,
    Sandbox,
    SandboxConfig,
    Supervisor,
    WorkerLost,
    observability,
)
from hlasync import events as ev
from hlasync.kvm import Kvm

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass
class Recorded:
    spans: InMemorySpanExporter
    reader: InMemoryMetricReader
    tracer: trace.Tracer

    def finished(self, name: str = "hlasync.call") -> list[ReadableSpan]:
        return [s for s in self.spans.get_finished_spans() if s.name == name]

    def metrics(self) -> dict[str, list[tuple[dict[str, Any], Any]]]:
        """Metric name -> [(attributes, value or histogram count)]."""
        found: dict[str, list[tuple[dict[str, Any], Any]]] = {}
        data = self.reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else []:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    points = found.setdefault(metric.name, [])
                    for point in metric.data.data_points:
                        value = getattr(point, "value", None)
                        if value is None:
                            value = point.count  # type: ignore[union-attr]
                        points.append((dict(point.attributes or {}), value))
        return found

    def total(self, name: str, **attributes: Any) -> Any:
        wanted = {f"hlasync.{k}": v for k, v in attributes.items()}
        return sum(
            value
            for attrs, value in self.metrics().get(name, [])
            if all(attrs.get(k) == v for k, v in wanted.items())
        )


@pytest.fixture
def otel() -> Iterator[Recorded]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    observability.configure(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        yield Recorded(spans, reader, tracer_provider.get_tracer("tests"))
    finally:
        observability.configure(tracer_provider=None, meter_provider=None)
        meter_provider.shutdown()


def _ids(span: ReadableSpan) -> tuple[int, int | None]:
    assert span.context is not None
    return span.context.span_id, span.parent.span_id if span.parent is not None else None


# ------------------------------------------------------------ Sandbox.call
def test_sync_calls_are_spans_under_the_callers_span_with_nested_host_spans(
    kvm: Kvm, simpleguest: Path, otel: Recorded, dump_dir: Path
) -> None:
    def double(x: int) -> int:
        with otel.tracer.start_as_current_span("double"):
            return 2 * x

    with Sandbox(simpleguest) as sb:
        sb.register_host_function("double", double)
        with otel.tracer.start_as_current_span("request") as request:
            assert sb.call("add", 2, 3) == 5
            assert sb.call("call_host", "double", 21) == 42
            with pytest.raises(GuestCrashed) as crashed:
                sb.call("divide_by_zero")
            sb.restore()
        dump = sb.generate_crashdump()
    request_id = request.get_span_context().span_id
    add, host_call, crash = otel.finished()
    assert all(_ids(s)[1] == request_id for s in (add, host_call, crash))
    assert add.attributes is not None and dict(add.attributes) == {
        "hlasync.sandbox.id": sb.id,
        "hlasync.guest": "simpleguest.elf",
        "hlasync.function": "add",
        "hlasync.outcome": "ok",
        "hlasync.path": "exit",
    }
    (nested,) = otel.finished("double")
    assert _ids(nested)[1] == _ids(host_call)[0]  # the host function ran inside the call
    assert crash.attributes is not None
    assert crash.attributes["hlasync.outcome"] == "crashed"
    assert crash.attributes["hlasync.error"] == "GuestCrashed"
    assert crash.attributes["hlasync.core_path"] == str(crashed.value.core_path)
    assert crash.status.status_code is trace.StatusCode.ERROR
    events = [e for e in crash.events if e.name == "hlasync.crashdump"]
    assert [dict(e.attributes or {}) for e in events] == [
        {"hlasync.core_path": str(crashed.value.core_path), "hlasync.reason": "fault"}
    ]
    assert otel.total("hlasync.calls", outcome="ok") == 2
    assert otel.total("hlasync.calls", outcome="crashed", function="divide_by_zero") == 1
    assert otel.total("hlasync.call.duration", function="add") == 1  # one recorded duration
    assert otel.total("hlasync.crashdumps", reason="fault") == 1
    assert otel.total("hlasync.crashdumps", reason="on_demand") == 1
    assert dump.exists()


def test_a_doorbell_call_says_so(kvm: Kvm, simpleguest: Path, otel: Recorded) -> None:
    with Sandbox(simpleguest, SandboxConfig(spin=1.0)) as sb:
        paths = []
        for _ in range(3):
            sb.call("add", 1, 1)
        paths = [s.attributes["hlasync.path"] for s in otel.finished() if s.attributes]
    assert paths[0] == "exit" and "doorbell" in paths[1:], paths


def test_an_interrupted_call_is_cancelled_without_an_exception_event(
    kvm: Kvm, simpleguest: Path, otel: Recorded
) -> None:
    import threading

    with Sandbox(simpleguest) as sb:
        timer = threading.Timer(0.2, sb.interrupt)
        timer.start()
        with pytest.raises(GuestCancelled):
            sb.call("spin")
        timer.join()
    (span,) = otel.finished()
    assert span.attributes is not None and span.attributes["hlasync.outcome"] == "cancelled"
    assert not [e for e in span.events if e.name == "exception"]
    assert otel.total("hlasync.calls", outcome="cancelled", function="spin") == 1


def test_nothing_is_recorded_when_instrumentation_is_off(
    kvm: Kvm, simpleguest: Path, otel: Recorded
) -> None:
    observability.configure(enabled=False)
    try:
        assert not observability.instrumentation_enabled()
        with Sandbox(simpleguest) as sb:
            assert sb.call("add", 1, 2) == 3
    finally:
        observability.configure(enabled=True)
    assert otel.finished() == []
    assert otel.total("hlasync.calls") == 0


def test_without_an_sdk_or_with_hlasync_otel_0_calls_work_and_record_nothing(
    kvm: Kvm, simpleguest: Path
) -> None:
    """A fresh process: the API's global providers are proxies (no SDK), then
    an SDK is set globally and spans appear; with HLASYNC_OTEL=0 they do not."""
    program = textwrap.dedent(
        f"""
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from hlasync import Sandbox, _telemetry
        with Sandbox({str(simpleguest)!r}) as sb:
            assert _telemetry.tracer() is None and _telemetry.instruments() is None
            assert sb.call("add", 1, 2) == 3
            exporter = InMemorySpanExporter()
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(exporter))
            trace.set_tracer_provider(provider)
            assert sb.call("add", 1, 2) == 3
            print(len(exporter.get_finished_spans()))
        """
    )
    for setting, spans in (("1", "1"), ("0", "0")):
        env = {**os.environ, "HLASYNC_OTEL": setting}
        done = subprocess.run(
            [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == spans


# -------------------------------------------------------------- supervisor
async def test_supervised_calls_nest_host_functions_in_threads_and_processes(
    kvm: Kvm, simpleguest: Path, otel: Recorded, supervisor_mode: str
) -> None:
    seen: dict[str, tuple[int, int]] = {}

    def plain(x: int) -> int:
        with otel.tracer.start_as_current_span("plain") as span:
            context = span.get_span_context()
            seen["plain"] = (context.trace_id, context.span_id)
            return x + 1

    async def coroutine(x: int) -> int:
        with otel.tracer.start_as_current_span("coroutine"):
            await anyio.sleep(0)
            return x + 2

    async with Supervisor(workers=2) as sup:
        pool = await sup.create_pool(
            simpleguest,
            size=2,
            host_functions={
                "plain": plain,
                "coroutine": coroutine,
                "where": "tests.hostfns:current_trace",
            },
        )
        with otel.tracer.start_as_current_span("request") as request:
            assert await pool.call("add", 1, 2) == 3
            assert await pool.call("call_host", "plain", 1) == 2
            assert await pool.call("call_host", "coroutine", 1) == 3
            remote = await pool.call("call_host_str", "where", "x")
    request_context = request.get_span_context()
    calls = otel.finished()
    assert len(calls) == 4
    assert {_ids(s)[1] for s in calls} == {request_context.span_id}
    add, via_plain, via_coroutine, via_where = calls
    for span in calls:
        assert span.attributes is not None
        assert span.attributes["hlasync.outcome"] == "ok"
        assert span.attributes["hlasync.path"] in ("exit", "doorbell")
        assert str(span.attributes["hlasync.sandbox.id"]) in pool.sandbox_ids
        assert span.attributes["hlasync.target"] == pool.name
        assert span.attributes["hlasync.guest"] == "simpleguest.elf"
    assert add.attributes is not None and add.attributes["hlasync.function"] == "add"
    (plain_span,) = otel.finished("plain")
    (coroutine_span,) = otel.finished("coroutine")
    assert _ids(plain_span)[1] == _ids(via_plain)[0]
    assert _ids(coroutine_span)[1] == _ids(via_coroutine)[0]
    # A host function given by reference runs where the sandbox is (a worker
    # process in that mode): the caller's span is current there too.
    assert via_where.context is not None
    assert remote == f"{via_where.context.trace_id:032x}/{via_where.context.span_id:016x}"
    assert otel.total("hlasync.calls", outcome="ok", function="call_host") == 2


async def test_supervised_crashes_timeouts_and_cancels_are_counted(
    kvm: Kvm, simpleguest: Path, otel: Recorded, supervisor_mode: str
) -> None:
    async with Supervisor(workers=2) as sup:
        pool = await sup.create_pool(simpleguest, size=2)
        dedicated = await sup.create_sandbox(simpleguest)
        with pytest.raises(GuestCrashed) as crashed:
            await pool.call("divide_by_zero")
        with pytest.raises(GuestTimeout) as timed_out:
            await pool.call("spin", timeout=0.3)
        with pytest.raises(GuestTimeout):
            await dedicated.call("spin", cpu_timeout=0.2)
        with anyio.move_on_after(0.3):
            await pool.call("spin")
        on_demand = await dedicated.generate_crashdump()
        with anyio.fail_after(10):  # the cancelled call's outcome reaches the loop
            while len(otel.finished()) < 4:
                await anyio.sleep(0.01)
    by_function: dict[object, list[Any]] = {}
    for span in otel.finished():
        assert span.attributes is not None
        by_function.setdefault(span.attributes["hlasync.function"], []).append(span.attributes)
    crash = by_function["divide_by_zero"][0]
    assert crash["hlasync.outcome"] == "crashed"
    assert crash["hlasync.core_path"] == str(crashed.value.core_path)
    outcomes = sorted(str(a["hlasync.outcome"]) for a in by_function["spin"])
    assert outcomes == ["cancelled", "timeout", "timeout"]
    wall = [a for a in by_function["spin"] if a.get("hlasync.target") == pool.name]
    assert any(a.get("hlasync.core_path") == str(timed_out.value.core_path) for a in wall)
    assert otel.total("hlasync.timeouts", kind="wall") == 1
    assert otel.total("hlasync.timeouts", kind="cpu") == 1
    assert otel.total("hlasync.calls", outcome="cancelled") == 1
    assert otel.total("hlasync.crashdumps", reason="fault") == 1
    assert otel.total("hlasync.crashdumps", reason="timeout") == 2
    assert otel.total("hlasync.crashdumps", reason="on_demand") == 1
    assert otel.total("hlasync.watchdog.lateness") == 2  # one per expired limit
    assert on_demand.exists()


async def test_pool_and_sandbox_gauges(
    kvm: Kvm, simpleguest: Path, otel: Recorded, supervisor_mode: str
) -> None:
    before = otel.total("hlasync.sandboxes")
    async with Supervisor(workers=2) as sup:
        pool = await sup.create_pool(simpleguest, size=3)
        await sup.create_sandbox(simpleguest)
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: pool.call("spin", timeout=5))
            await anyio.sleep(0.3)
            size = otel.total("hlasync.pool.size", pool=pool.name)
            busy = otel.total("hlasync.pool.busy", pool=pool.name)
            open_now = otel.total("hlasync.sandboxes")
            group.cancel_scope.cancel()
    assert (size, busy) == (3, 1)
    assert open_now - before == 4
    assert otel.total("hlasync.sandboxes") == before
    assert otel.total("hlasync.pool.size", pool=pool.name) == 0  # gone with its supervisor


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_worker_death_is_counted_and_logged(
    kvm: Kvm, simpleguest: Path, otel: Recorded, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        Supervisor(processes=1, workers=1) as sup,
        sup.subscribe(ev.WorkerStarted) as started,
    ):
        pool = await sup.create_pool(simpleguest, size=1)
        (victim,) = [c for c in psutil.Process().children() if "hlasync" in " ".join(c.cmdline())]
        with caplog.at_level(logging.ERROR, logger="hlasync.supervisor"):
            async with anyio.create_task_group() as group:

                async def spin() -> None:
                    with pytest.raises(WorkerLost):
                        await pool.call("spin", timeout=20)

                group.start_soon(spin)
                await anyio.sleep(0.3)
                victim.send_signal(signal.SIGKILL)
            with anyio.fail_after(30):
                await started.receive()
        assert await pool.call("add", 1, 2) == 3
    (record,) = [r for r in caplog.records if r.name == "hlasync.supervisor"]
    assert getattr(record, "hlasync.worker") == 0
    assert getattr(record, "hlasync.exit_status") == -signal.SIGKILL
    assert otel.total("hlasync.worker.restarts", worker=0) == 1
    assert otel.total("hlasync.calls", outcome="error", function="spin") == 1


# ------------------------------------------------------------------- logs
def test_dump_and_timeout_log_records_carry_the_attributes(
    kvm: Kvm, simpleguest: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from hlasync.js import JSSandbox

    with (
        caplog.at_level(logging.WARNING, logger="hlasync"),
        Sandbox(simpleguest) as sb,
        pytest.raises(GuestCrashed) as crashed,
    ):
        sb.call("divide_by_zero")
    (dumped,) = [r for r in caplog.records if r.getMessage().startswith("Core dump created")]
    assert dumped.name == "hlasync.crashdump"
    assert getattr(dumped, "hlasync.core_path") == str(crashed.value.core_path)
    assert getattr(dumped, "hlasync.sandbox.id") == sb.id
    assert getattr(dumped, "hlasync.reason") == "fault"
    assert getattr(dumped, "hlasync.function") == "divide_by_zero"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hlasync"), JSSandbox() as js:
        js.add_handler("loop", "export function handler() { for (;;) {} }")
        js.load()
        with pytest.raises(GuestTimeout):
            js.call_handler("loop", timeout=0.2)
    (late,) = [r for r in caplog.records if r.name == "hlasync.supervisor"]
    assert getattr(late, "hlasync.kind") == "wall"
    assert getattr(late, "hlasync.function") == "loop"
    assert getattr(late, "hlasync.sandbox.id") == js.id
    assert getattr(late, "hlasync.limit") == 0.2


# ------------------------------------------------------------- JavaScript
def test_js_handler_calls_are_spans_named_by_the_handler(otel: Recorded, kvm: Kvm) -> None:
    from hlasync import JSError
    from hlasync.js import JSSandbox

    with JSSandbox() as js:
        js.add_handler("echo", "export function handler(e) { return e; }")
        js.add_handler("boom", "export function handler() { throw new Error('no'); }")
        js.load()
        assert js.call_handler("echo", {"a": 1}) == {"a": 1}
        with pytest.raises(JSError):
            js.call_handler("boom")
    echo, boom = otel.finished()
    assert echo.attributes is not None and boom.attributes is not None
    assert echo.attributes["hlasync.function"] == "echo"
    assert echo.attributes["hlasync.outcome"] == "ok"
    assert boom.attributes["hlasync.function"] == "boom"
    assert boom.attributes["hlasync.outcome"] == "error"
    assert otel.total("hlasync.calls", function="boom", outcome="error") == 1


async def test_js_pool_handler_calls_are_spans_named_by_the_handler(
    otel: Recorded, kvm: Kvm, supervisor_mode: str
) -> None:
    from hlasync import JSError

    async with Supervisor(workers=1) as sup:
        pool = await sup.create_js_pool(
            {
                "echo": "export function handler(e) { return e; }",
                "boom": "export function handler() { throw new Error('no'); }",
            },
            size=1,
        )
        with otel.tracer.start_as_current_span("request") as request:
            assert await pool.call_handler("echo", [1, 2]) == [1, 2]
            with pytest.raises(JSError):
                await pool.call_handler("boom")
    echo, boom = otel.finished()
    assert {_ids(echo)[1], _ids(boom)[1]} == {request.get_span_context().span_id}
    assert echo.attributes is not None and boom.attributes is not None
    assert (echo.attributes["hlasync.function"], echo.attributes["hlasync.outcome"]) == (
        "echo",
        "ok",
    )
    assert (boom.attributes["hlasync.function"], boom.attributes["hlasync.outcome"]) == (
        "boom",
        "error",
    )
    assert otel.total("hlasync.calls", function="js_call") == 0


def test_a_protocol_error_is_a_log_record(
    kvm: Kvm, hostile_guest: Path, caplog: pytest.LogCaptureFixture, otel: Recorded
) -> None:
    from hlasync import GuestProtocolError

    with (
        caplog.at_level(logging.WARNING, logger="hlasync"),
        Sandbox(hostile_guest) as sb,
        pytest.raises(GuestProtocolError) as info,
    ):
        sb.call("in_port")
    (record,) = [r for r in caplog.records if r.name == "hlasync.sandbox"]
    assert record.levelno == logging.WARNING
    assert getattr(record, "hlasync.reason") == "protocol"
    assert getattr(record, "hlasync.function") == "in_port"
    assert getattr(record, "hlasync.core_path") == str(info.value.core_path)
    assert otel.total("hlasync.crashdumps", reason="protocol") == 1
    assert otel.total("hlasync.calls", outcome="crashed", function="in_port") == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_worker_process_logs_through_the_supervisors_loggers(
    kvm: Kvm, simpleguest: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A timeout and its dump in a worker process: their records reach this
    process's ``hlasync.*`` loggers with their fields and the worker's."""
    with caplog.at_level(logging.WARNING, logger="hlasync"):
        async with Supervisor(processes=1, workers=1) as sup:
            pool = await sup.create_pool(simpleguest, size=1)
            with pytest.raises(GuestTimeout) as info:
                await pool.call("spin", timeout=0.2)
            assert await pool.call("add", 1, 2) == 3  # the dump's record arrived before
    (late,) = [r for r in caplog.records if r.name == "hlasync.supervisor"]
    assert getattr(late, "hlasync.kind") == "wall"
    assert getattr(late, "hlasync.function") == "spin"
    assert getattr(late, "hlasync.worker") == 0
    assert getattr(late, "hlasync.pid") != os.getpid()
    (dumped,) = [r for r in caplog.records if r.name == "hlasync.crashdump"]
    assert getattr(dumped, "hlasync.core_path") == str(info.value.core_path)
    assert getattr(dumped, "hlasync.reason") == "timeout"
    assert dumped.getMessage() == f"Core dump created: {info.value.core_path}"


def test_a_broken_sdk_never_fails_a_call(
    kvm: Kvm, simpleguest: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from opentelemetry.sdk.trace import SpanProcessor

    class Broken(SpanProcessor):
        def on_start(self, span: Any, parent_context: Any = None) -> None:
            raise RuntimeError("processor on_start broke")

        def on_end(self, span: Any) -> None:
            raise RuntimeError("processor on_end broke")

    provider = TracerProvider()
    provider.add_span_processor(Broken())
    observability.configure(tracer_provider=provider)
    try:
        with caplog.at_level(logging.WARNING, logger="hlasync"), Sandbox(simpleguest) as sb:
            assert [sb.call("add", i, 1) for i in range(3)] == [1, 2, 3]
            with pytest.raises(GuestCrashed):
                sb.call("divide_by_zero")
    finally:
        observability.configure(tracer_provider=None)
    warned = [r for r in caplog.records if r.name == "hlasync.telemetry"]
    assert warned and len(warned) == len({r.getMessage() for r in warned})  # once per kind
    assert all("hlasync goes on without it" in r.getMessage() for r in warned)


# ------------------------------------------- what a review found (each a bug)
async def test_a_broken_propagator_never_sticks_a_worker_pool(
    kvm: Kvm, simpleguest: Path, otel: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trace context of a call whose host functions run in the worker
    could not be injected: the call must still go (it stayed 'running',
    never sent, and the next call on the pool hung)."""
    from opentelemetry import propagate
    from opentelemetry.propagators.textmap import TextMapPropagator

    class Broken(TextMapPropagator):
        def inject(self, carrier: Any, context: Any = None, setter: Any = None) -> None:
            raise RuntimeError("propagator broke")

        def extract(self, carrier: Any, context: Any = None, getter: Any = None) -> Any:
            raise RuntimeError("propagator broke")

        @property
        def fields(self) -> set[str]:
            return set()

    monkeypatch.setattr(propagate, "_HTTP_TEXT_FORMAT", Broken())
    async with Supervisor(processes=1, workers=1) as sup:
        pool = await sup.create_pool(
            simpleguest, size=1, host_functions={"where": "tests.hostfns:current_trace"}
        )
        with anyio.fail_after(20):
            for _ in range(3):
                assert await pool.call("call_host_str", "where", "x") == "0" * 32 + "/" + "0" * 16


async def test_a_propagator_the_worker_cannot_load_never_kills_it(
    kvm: Kvm, simpleguest: Path, otel: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTEL_PROPAGATORS naming a propagator that is not installed makes the
    API's propagate module fail to import in the worker: every call with a
    trace context killed the worker (WorkerLost)."""
    from opentelemetry import propagate  # noqa: F401 - this process has it already

    monkeypatch.setenv("OTEL_PROPAGATORS", "no_such_propagator")
    async with Supervisor(processes=1, workers=1) as sup:
        pool = await sup.create_pool(
            simpleguest, size=1, host_functions={"where": "tests.hostfns:current_trace"}
        )
        with anyio.fail_after(20):
            for _ in range(2):
                assert await pool.call("call_host_str", "where", "x") == "0" * 32 + "/" + "0" * 16
        assert sup.statistics().workers_lost == 0


def _raising_meter_provider() -> MeterProvider:
    from opentelemetry.sdk.metrics._internal.exemplar import ExemplarFilter

    class Raising(ExemplarFilter):
        def should_sample(self, *args: Any, **kwargs: Any) -> bool:
            raise RuntimeError("exemplar filter broke")

    return MeterProvider(metric_readers=[InMemoryMetricReader()], exemplar_filter=Raising())


async def test_instruments_that_raise_never_wedge_a_call_or_a_relaunch(
    kvm: Kvm, simpleguest: Path, supervisor_mode: str
) -> None:
    """Every measurement raises (a broken SDK): a timed-out call must still
    answer its caller (its lateness was recorded before its completion and
    the exception escaped the loop's batch)."""
    provider = _raising_meter_provider()
    observability.configure(meter_provider=provider)
    try:
        async with Supervisor(workers=1, shutdown_grace=2) as sup:
            pool = await sup.create_pool(simpleguest, size=1)
            with anyio.fail_after(20):
                with pytest.raises(GuestTimeout):
                    await pool.call("spin", timeout=0.2)
                assert await pool.call("add", 1, 2) == 3
                with pytest.raises(GuestCrashed):
                    await pool.call("divide_by_zero")
                assert await pool.call("add", 1, 2) == 3
    finally:
        observability.configure(meter_provider=None)
        provider.shutdown()


def test_a_span_processor_failing_on_end_loses_no_metrics(
    kvm: Kvm, simpleguest: Path, otel: Recorded
) -> None:
    from opentelemetry.sdk.trace import SpanProcessor

    class Broken(SpanProcessor):
        def on_end(self, span: Any) -> None:
            raise RuntimeError("on_end broke")

    provider = TracerProvider()
    provider.add_span_processor(Broken())
    observability.configure(tracer_provider=provider)
    with Sandbox(simpleguest) as sb:
        for _ in range(5):
            sb.call("add", 1, 2)
    assert otel.total("hlasync.calls", function="add") == 5
    assert otel.total("hlasync.call.duration", function="add") == 5


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cancelled_js_pool_call_keeps_its_span_until_the_guest_stops(
    kvm: Kvm, otel: Recorded, supervisor_mode: str
) -> None:
    """The span of a JSPool handler call cancelled while it ran ended at the
    cancel, before the guest stopped: no sandbox id, no dump on it."""
    async with Supervisor(workers=1, dump_on_cancel=True) as sup:
        pool = await sup.create_js_pool(
            {"loop": "export function handler() { for (;;) {} }"}, size=1
        )
        with anyio.move_on_after(0.5):
            await pool.call_handler("loop")
        with anyio.fail_after(10):
            while not otel.finished():
                await anyio.sleep(0.01)
    (span,) = otel.finished()
    assert span.attributes is not None
    assert span.attributes["hlasync.function"] == "loop"
    assert span.attributes["hlasync.outcome"] == "cancelled"
    assert str(span.attributes["hlasync.sandbox.id"]) in pool.sandbox_ids
    dumps = [e for e in span.events if e.name == "hlasync.crashdump"]
    assert len(dumps) == 1 and dumps[0].attributes is not None
    assert dumps[0].attributes["hlasync.reason"] == "cancelled"
    assert otel.total("hlasync.calls", function="loop", outcome="cancelled") == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_on_demand_dump_of_a_call_has_the_same_reason_in_both_modes(
    kvm: Kvm, simpleguest: Path, otel: Recorded, supervisor_mode: str
) -> None:
    """The span event of a dump written in a worker process named a reason
    guessed from the call's error (cancelled) where the metric said on_demand."""
    async with Supervisor(workers=1) as sup:
        dedicated = await sup.create_sandbox(simpleguest)
        async with anyio.create_task_group() as group:

            async def spin() -> None:
                with anyio.move_on_after(0.6):
                    await dedicated.call("spin")

            group.start_soon(spin)
            await anyio.sleep(0.3)
            await dedicated.generate_crashdump()
        with anyio.fail_after(10):
            while not otel.finished():
                await anyio.sleep(0.01)
    (span,) = otel.finished()
    reasons = [(e.attributes or {}).get("hlasync.reason") for e in span.events]
    assert reasons.count("on_demand") == 1 and "cancelled" not in reasons
    assert otel.total("hlasync.crashdumps", reason="on_demand") == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_host_functions_of_an_untraced_call_run_in_no_span(
    kvm: Kvm, simpleguest: Path, otel: Recorded, supervisor_mode: str
) -> None:
    """In worker-process mode the host function of a call made with the
    instrumentation off ran inside the span the supervisor was entered in."""
    seen: list[int] = []

    def where(x: int) -> int:
        seen.append(trace.get_current_span().get_span_context().span_id)
        return x

    with otel.tracer.start_as_current_span("setup"):
        async with Supervisor(workers=1) as sup:
            pool = await sup.create_pool(simpleguest, size=1, host_functions={"where": where})
            observability.configure(enabled=False)
            try:
                assert await pool.call("call_host", "where", 7) == 7
            finally:
                observability.configure(enabled=True)
    assert seen == [0]


def test_a_refused_call_says_no_path(kvm: Kvm, simpleguest: Path, otel: Recorded) -> None:
    from hlasync import SandboxClosed

    sb = Sandbox(simpleguest)
    sb.close()
    with pytest.raises(SandboxClosed):
        sb.call("add", 1, 2)
    (span,) = otel.finished()
    assert span.attributes is not None
    assert span.attributes["hlasync.outcome"] == "error"
    assert "hlasync.path" not in span.attributes


def test_without_the_opentelemetry_api_installed_everything_works(
    kvm: Kvm, simpleguest: Path
) -> None:
    """The otel extra absent: no opentelemetry package can be imported; calls,
    pools in threads and worker processes, dumps and log records work, and
    the instrumentation records nothing (its lookups answer None)."""
    program = textwrap.dedent(
        f"""
        import sys
        sys.modules["opentelemetry"] = None  # as if not installed
        import anyio
        from hlasync import GuestCrashed, Sandbox, Supervisor, _telemetry
        with Sandbox({str(simpleguest)!r}) as sb:
            assert sb.call("add", 1, 2) == 3
            try:
                sb.call("divide_by_zero")
            except GuestCrashed as exc:
                assert exc.core_path is not None
        assert _telemetry.tracer() is None and _telemetry.instruments() is None
        async def main():
            for processes in (0, 1):
                async with Supervisor(workers=1, processes=processes) as sup:
                    pool = await sup.create_pool(
                        {str(simpleguest)!r}, size=1,
                        host_functions={{"where": "tests.hostfns:process_id"}},
                    )
                    assert await pool.call("add", 2, 3) == 5
                    assert await pool.call("call_host", "where", 1) > 0
        anyio.run(main)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
