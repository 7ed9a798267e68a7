"""hlasync's metrics as Prometheus scrapes them: ``serve_prometheus()`` serves
OpenTelemetry's Prometheus exporter on a loopback port, real guest calls
update it, and the scrape (over HTTP, as Prometheus makes it) is read with
``prometheus_client``'s own parser. Also the helper's refusals: bad
addresses, a port in use, missing packages, and a global meter provider set
already (OpenTelemetry sets one per process: those checks run in a process
of their own)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.exporter.prometheus")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families

from hlasync import (
    GuestCrashed,
    GuestTimeout,
    Sandbox,
    SandboxConfig,
    Supervisor,
    _telemetry,
    guests,
    observability,
)
from hlasync.errors import ConfigError
from hlasync.kvm import Kvm

ROOT = Path(__file__).resolve().parent.parent

#: (sample name, its hlasync_* labels) -> value
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """One scrape of ``url``, parsed by prometheus_client; the samples of
    hlasync's metrics keyed by name and their ``hlasync_*`` and ``le`` labels
    (the exporter's ``otel_scope_*`` labels left out)."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("hlasync_"):
                labels = frozenset(
                    (k, v)
                    for k, v in sample.labels.items()
                    if k.startswith("hlasync_") or k == "le"
                )
                samples[(sample.name, labels)] = sample.value
    return samples


def labels(**pairs: str) -> frozenset[tuple[str, str]]:
    return frozenset((f"hlasync_{key}", value) for key, value in pairs.items())


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def endpoint() -> Iterator[observability.PrometheusEndpoint]:
    """An endpoint of hlasync's own (set_global=False): its provider starts
    empty whatever other tests of the session recorded."""
    served = observability.serve_prometheus(port=0, set_global=False)
    try:
        yield served
    finally:
        served.close()


def test_the_scrape_shows_real_calls_crashes_and_open_sandboxes(
    kvm: Kvm, tmp_path: Path, endpoint: observability.PrometheusEndpoint
) -> None:
    assert endpoint.host == "127.0.0.1" and endpoint.port > 0
    assert endpoint.url == f"http://127.0.0.1:{endpoint.port}/metrics"
    config = SandboxConfig(crashdump_dir=tmp_path)
    with Sandbox(guests.path("simpleguest"), config) as sb:
        assert sb.call("add", 1, 2) == 3
        assert sb.call("add", 2, 3) == 5
        with pytest.raises(GuestCrashed) as crashed:
            sb.call("divide_by_zero")
        assert crashed.value.core_path is not None and crashed.value.core_path.parent == tmp_path
        open_ = scrape(endpoint.url)
    closed = scrape(endpoint.url)

    add_ok = labels(function="add", outcome="ok")
    crash = labels(function="divide_by_zero", outcome="crashed")
    assert open_[("hlasync_calls_total", add_ok)] == 2
    assert open_[("hlasync_calls_total", crash)] == 1
    assert open_[("hlasync_call_duration_seconds_count", add_ok)] == 2
    assert open_[("hlasync_call_duration_seconds_count", crash)] == 1
    assert open_[("hlasync_call_duration_seconds_sum", add_ok)] > 0
    infinite = frozenset({*add_ok, ("le", "+Inf")})
    assert open_[("hlasync_call_duration_seconds_bucket", infinite)] == 2
    assert open_[("hlasync_crashdumps_total", labels(reason="fault"))] == 1
    assert ("hlasync_crashdump_failures_total", labels(reason="fault")) not in open_
    # The sandboxes gauge counts this one while it is open, and not after.
    sandboxes = open_[("hlasync_sandboxes", frozenset())]
    assert sandboxes >= 1
    assert closed[("hlasync_sandboxes", frozenset())] == sandboxes - 1
    assert closed[("hlasync_calls_total", add_ok)] == 2  # counters keep their counts


@pytest.mark.anyio
async def test_the_scrape_shows_a_pool_and_a_timeout(
    kvm: Kvm, tmp_path: Path, endpoint: observability.PrometheusEndpoint
) -> None:
    config = SandboxConfig(crashdump_dir=tmp_path)
    async with Supervisor(workers=1) as sup:
        pool = await sup.create_pool(guests.path("simpleguest"), size=2, config=config, name="p")
        assert await pool.call("add", 1, 2) == 3
        with pytest.raises(GuestTimeout):
            await pool.call("spin", timeout=0.05)
        # The gauges are read on the HTTP server's thread, as Prometheus scrapes.
        samples = await anyio.to_thread.run_sync(scrape, endpoint.url)
    assert samples[("hlasync_pool_size", labels(pool="p"))] == 2
    assert samples[("hlasync_pool_busy", labels(pool="p"))] == 0
    assert samples[("hlasync_calls_total", labels(function="add", outcome="ok"))] == 1
    assert samples[("hlasync_calls_total", labels(function="spin", outcome="timeout"))] == 1
    assert samples[("hlasync_timeouts_total", labels(kind="wall"))] == 1
    assert samples[("hlasync_crashdumps_total", labels(reason="timeout"))] == 1
    assert samples[("hlasync_watchdog_lateness_seconds_count", labels(kind="wall"))] == 1


def test_close_stops_serving_and_gives_hlasync_back_its_provider() -> None:
    before = _telemetry._meter_provider
    with observability.serve_prometheus(port=0, set_global=False) as endpoint:
        assert _telemetry._meter_provider is endpoint.meter_provider
        scrape(endpoint.url)
        assert not endpoint.closed
    assert endpoint.closed and _telemetry._meter_provider is before
    endpoint.close()  # again: nothing more to do
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(endpoint.url, timeout=5)


def test_a_provider_configured_since_is_left_alone_by_close() -> None:
    from opentelemetry.sdk.metrics import MeterProvider

    before = _telemetry._meter_provider
    endpoint = observability.serve_prometheus(port=0, set_global=False)
    mine = MeterProvider()
    observability.configure(meter_provider=mine)
    try:
        endpoint.close()
        assert _telemetry._meter_provider is mine
    finally:
        observability.configure(meter_provider=before)
        mine.shutdown()


@pytest.mark.parametrize(
    ("port", "host", "error"),
    [
        (-1, "127.0.0.1", ValueError),
        (65536, "127.0.0.1", ValueError),
        ("9464", "127.0.0.1", TypeError),
        (True, "127.0.0.1", TypeError),
        (9464.0, "127.0.0.1", TypeError),
        (0, "", ValueError),
        (0, 127, TypeError),
    ],
)
def test_a_bad_address_is_refused_before_anything_starts(
    port: object, host: object, error: type[Exception]
) -> None:
    before = _telemetry._meter_provider
    with pytest.raises(error):
        observability.serve_prometheus(port, host, set_global=False)  # type: ignore[arg-type]
    assert _telemetry._meter_provider is before


def test_a_port_in_use_raises_oserror_and_leaves_nothing_set() -> None:
    before = _telemetry._meter_provider
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            observability.serve_prometheus(taken.getsockname()[1], set_global=False)
    assert _telemetry._meter_provider is before


def test_missing_packages_name_the_otel_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.prometheus", None)
    with pytest.raises(ConfigError, match=r"otel extra.*\[otel\]"):
        observability.serve_prometheus(port=0, set_global=False)


def _run(script: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a fresh interpreter (its own global meter provider)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_set_global_sets_the_global_provider_once_and_refuses_a_second() -> None:
    done = _run(
        """
        import urllib.request
        from opentelemetry import metrics
        from hlasync import observability
        from hlasync.errors import ConfigError

        with observability.serve_prometheus(port=0) as endpoint:
            assert metrics.get_meter_provider() is endpoint.meter_provider
            metrics.get_meter("app").create_counter("app.requests").add(3)
            text = urllib.request.urlopen(endpoint.url).read().decode()
            assert "app_requests_total" in text, text  # the program's own metrics too
            try:
                observability.serve_prometheus(port=0)
            except ConfigError as exc:
                assert "PrometheusMetricReader" in str(exc), exc
                print("refused:", exc)
            else:
                raise AssertionError("a second global endpoint was allowed")
        print("ok")
        """
    )
    assert done.returncode == 0, done.stderr
    assert "refused: a global OpenTelemetry meter provider" in done.stdout
    assert done.stdout.rstrip().endswith("ok")


def test_an_sdk_provider_set_globally_already_is_a_config_error() -> None:
    done = _run(
        """
        from opentelemetry import metrics
        from opentelemetry.sdk.metrics import MeterProvider
        from hlasync import observability
        from hlasync.errors import ConfigError

        theirs = MeterProvider()
        metrics.set_meter_provider(theirs)
        try:
            observability.serve_prometheus(port=0)
        except ConfigError as exc:
            print(exc)
        assert metrics.get_meter_provider() is theirs
        with observability.serve_prometheus(port=0, set_global=False) as endpoint:
            print("set_global=False serves", endpoint.url)
        """
    )
    assert done.returncode == 0, done.stderr
    assert "add a PrometheusMetricReader to it" in done.stdout
    assert "serve_prometheus(set_global=False)" in done.stdout
    assert "set_global=False serves http://127.0.0.1:" in done.stdout
