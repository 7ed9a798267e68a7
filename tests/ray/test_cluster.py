"""hlasync.ray on a real local Ray cluster: a head and a second node (two
raylets on this machine, each offering the ``kvm`` resource and a label of
its own), started by the fixture and stopped after the module."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from hlasync import (
    CoreDump,
    CrashdumpError,
    GuestTimeout,
    SandboxConfig,
    SupervisorError,
    WorkerLost,
)
from hlasync import events as ev
from hlasync.kvm import Kvm
from tests.conftest import require_tool
from tests.ray import require_ray

pytestmark = pytest.mark.anyio

HEAD, SECOND = "hlasync_test_head", "hlasync_test_second"
#: The module's Ray cluster (ray.cluster_utils.Cluster), and the node arguments.
_CLUSTER: dict[str, Any] = {}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def cluster(kvm: Kvm) -> Iterator[dict[str, str]]:
    """Two Ray nodes: the head (kvm: 2) and a second node (kvm: 1); their ids."""
    ray = require_ray()
    import importlib

    Cluster: Any = importlib.import_module("ray.cluster_utils").Cluster  # noqa: N806

    # Ray's socket paths must stay under 108 bytes: a short directory of its own
    # (the tests' temp directory is a long pytest path).
    temp = tempfile.mkdtemp(prefix="hlray-", dir="/tmp")
    os.environ["RAY_TMPDIR"] = temp  # Ray's own files (ray_current_cluster, sessions)
    os.makedirs(os.path.join(temp, "ray"))
    small = {
        "object_store_memory": 80 << 20,
        "num_cpus": 2,
        "temp_dir": os.path.join(temp, "ray"),
    }
    made = Cluster(
        initialize_head=True,
        head_node_args={**small, "resources": {"kvm": 2, HEAD: 10}, "include_dashboard": False},
    )
    _CLUSTER.update(cluster=made, node_args=small)
    try:
        made.add_node(**small, resources={"kvm": 1, SECOND: 10})
        ray.init(address=made.address, log_to_driver=False, configure_logging=False)
        made.wait_for_nodes()
        ids = {}
        for node in ray.nodes():
            labels = node["Resources"]
            ids[HEAD if HEAD in labels else SECOND] = node["NodeID"]
        yield ids
    finally:
        _CLUSTER.clear()
        ray.shutdown()
        made.shutdown()
        del os.environ["RAY_TMPDIR"]
        shutil.rmtree(temp, ignore_errors=True)


async def test_calls_spread_over_both_nodes_and_events_name_them(
    cluster: dict[str, str], simpleguest: Path
) -> None:
    from hlasync.ray import RaySupervisor

    async with RaySupervisor(actors=1, workers=1, resources={"kvm": 1, SECOND: 1}) as one_node:
        assert set(one_node.nodes().values()) == {cluster[SECOND]}
    async with RaySupervisor(actors=3, workers=1) as sup:
        nodes = set(sup.nodes().values())
        assert nodes == {cluster[HEAD], cluster[SECOND]}  # kvm: 2 + 1
        async with sup.subscribe(ev.CallCompleted, ev.SandboxCreated) as stream:
            pool = await sup.create_pool(simpleguest, size=3)
            results: dict[int, object] = {}

            async def one(i: int) -> None:
                results[i] = await pool.call("add", i, 1000)

            async with anyio.create_task_group() as group:
                for i in range(300):
                    group.start_soon(one, i)
            assert results == {i: i + 1000 for i in range(300)}
            seen: dict[type, set[str | None]] = {ev.CallCompleted: set(), ev.SandboxCreated: set()}
            with anyio.fail_after(10):
                async for event in stream:
                    seen[type(event)].add(event.node)
                    if len(seen[ev.CallCompleted]) == 2 and len(seen[ev.SandboxCreated]) == 2:
                        break
        assert seen[ev.CallCompleted] == nodes


async def test_a_hung_guest_on_the_second_node_is_dumped_and_fetched(
    cluster: dict[str, str], simpleguest: Path, tmp_path: Path
) -> None:
    """The watchdog of the second node dumps the hung call there; the core
    comes home through the object store and gdb opens it here."""
    from hlasync.ray import RaySupervisor

    async with RaySupervisor(actors=1, workers=1, resources={"kvm": 1, SECOND: 1}) as sup:
        on_node = tmp_path / "node"  # where the node writes (the same machine here)
        on_node.mkdir()
        sandbox = await sup.create_sandbox(simpleguest, SandboxConfig(crashdump_dir=on_node))
        with pytest.raises(GuestTimeout) as info:
            await sandbox.call("spin", timeout=0.3)
        error = info.value
        assert error.node == cluster[SECOND] and error.core_path is not None
        assert Path(error.core_path).parent == on_node
        local = await sup.fetch_crashdump(error, directory=tmp_path / "home")
        assert local.parent == tmp_path / "home" and local.name == Path(error.core_path).name
        assert local.stat().st_mode & 0o777 == 0o600
        assert local.stat().st_blocks * 512 < local.stat().st_size  # still sparse
        with CoreDump.open(local) as dump:
            assert dump.metadata["reason"] == "timeout"
            assert (dump.backtrace()[0].symbol or "").startswith("spin")
        gdb = subprocess.run(
            [require_tool("gdb"), "-nx", "-batch", "-ex", "bt", str(simpleguest), str(local)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert " spin " in gdb.stdout or "in spin" in gdb.stdout, gdb.stdout + gdb.stderr
        with pytest.raises(CrashdumpError, match="not a core dump"):
            await sup.fetch_crashdump("/etc/passwd", node=cluster[SECOND])
        assert await sandbox.call("add", 2, 3) == 5  # restored after the timeout


async def test_cancel_and_cpu_timeout_stop_the_guest_on_its_node(
    cluster: dict[str, str], simpleguest: Path, tmp_path: Path
) -> None:
    """Cancelling the caller's await stops the guest on its node (dumped there
    with ``dump_on_cancel``); a CPU-time limit is enforced on the node too."""
    from hlasync.ray import RaySupervisor

    on_node = tmp_path / "node"
    on_node.mkdir()
    config = SandboxConfig(crashdump_dir=on_node)
    async with (
        RaySupervisor(actors=1, workers=1, dump_on_cancel=True) as sup,
        sup.subscribe(ev.CrashDumpWritten) as stream,
    ):
        sandbox = await sup.create_sandbox(simpleguest, config)
        with anyio.move_on_after(0.5) as scope:
            await sandbox.call("spin")
        assert scope.cancelled_caught
        with anyio.fail_after(30):
            written = await stream.receive()
        assert isinstance(written, ev.CrashDumpWritten) and written.reason == "cancelled"
        assert written.node == sup.node_of(sandbox) and written.path.parent == on_node
        assert await sandbox.call("add", 4, 5) == 9  # stopped and restored on its node
        with pytest.raises(GuestTimeout) as info:
            await sandbox.call("spin", cpu_timeout=0.2)
        assert info.value.kind == "cpu" and info.value.node == sup.node_of(sandbox)
        assert await sandbox.call("add", 1, 1) == 2


async def test_fetch_dumps_brings_every_core_home_before_the_caller_hears(
    cluster: dict[str, str], simpleguest: Path, tmp_path: Path
) -> None:
    """With ``fetch_dumps``, the error a caller gets already points at the
    local copy of its dump (a crash and a timeout), and the node's copy stays."""
    from hlasync import GuestCrashed
    from hlasync.ray import RaySupervisor

    home = tmp_path / "home"
    on_node = tmp_path / "node"
    on_node.mkdir()
    async with RaySupervisor(
        actors=1, workers=1, resources={"kvm": 1, SECOND: 1}, fetch_dumps=home
    ) as sup:
        config = SandboxConfig(crashdump_dir=on_node)
        pool = await sup.create_pool(simpleguest, size=1, config=config)
        with pytest.raises(GuestCrashed) as crashed:
            await pool.call("divide_by_zero")
        with pytest.raises(GuestTimeout) as hung:
            await pool.call("spin", timeout=0.3)
        for error, symbol in ((crashed.value, "divide_by_zero"), (hung.value, "spin")):
            assert error.node == cluster[SECOND]
            assert error.core_path is not None and error.core_path.parent == home
            assert (on_node / error.core_path.name).is_file()  # the node keeps its own
            with CoreDump.open(error.core_path) as dump:
                assert (dump.backtrace()[0].symbol or "").startswith(symbol)
        assert await pool.call("add", 1, 1) == 2
        sandbox = await sup.create_sandbox(simpleguest, config)
        assert sup.node_of(sandbox) == cluster[SECOND]
        on_demand = await sup.generate_crashdump(sandbox)
        assert on_demand.parent == home and (on_node / on_demand.name).is_file()
        with CoreDump.open(on_demand) as dump:
            assert dump.metadata["reason"] == "on-demand"


async def test_an_actor_killed_mid_load_fails_its_calls_and_comes_back(
    cluster: dict[str, str], simpleguest: Path
) -> None:
    """Two calls wait in a host function (one per actor), eight more queue
    (some of them on the actors: a Ray worker takes several calls per sandbox
    at once); one actor is killed: every call sent to it fails with
    WorkerLost naming the node, WorkerDied counts them, a new actor takes its
    place, and every other call completes."""
    ray = require_ray()
    from hlasync.ray import RaySupervisor

    entered: list[int] = []
    gate = threading.Event()

    def held(x: int) -> int:
        entered.append(x)
        gate.wait(30)
        return x

    async with (
        RaySupervisor(actors=2, workers=1) as sup,
        sup.subscribe(ev.WorkerDied, ev.WorkerStarted) as stream,
    ):
        pool = await sup.create_pool(simpleguest, size=2, host_functions={"held": held})
        victim = 0
        victim_node = sup.nodes()[victim]
        outcomes: dict[int, object] = {}

        async def one(i: int) -> None:
            try:
                outcomes[i] = await pool.call("call_host", "held", i)
            except WorkerLost as exc:
                outcomes[i] = exc

        async with anyio.create_task_group() as group:
            for i in range(10):
                group.start_soon(one, i)
            with anyio.fail_after(30):
                while len(entered) < 2:  # a call in each actor
                    await anyio.sleep(0.01)
            ray.kill(sup._ray_backend._actors[victim], no_restart=True)
            with anyio.fail_after(60):
                event = await stream.receive()
            assert isinstance(event, ev.WorkerDied) and event.node == victim_node
            died = event
            assert died.worker == victim and died.lost_calls >= 1
            gate.set()
        lost = [o for o in outcomes.values() if isinstance(o, WorkerLost)]
        assert len(outcomes) == 10 and len(lost) == died.lost_calls, outcomes
        assert lost[0].node == victim_node and "Ray node" in str(lost[0])
        assert sorted(o for o in outcomes.values() if isinstance(o, int)) == sorted(
            i for i, o in outcomes.items() if isinstance(o, int)
        )
        with anyio.fail_after(60):
            started = await stream.receive()
        assert isinstance(started, ev.WorkerStarted) and started.worker == victim
        # The pool was made again in the new actor: both sandboxes answer.
        assert [await pool.call("add", i, 1) for i in range(10)] == [i + 1 for i in range(10)]


async def test_a_node_that_dies_takes_its_calls_and_its_pool_moves(
    cluster: dict[str, str], simpleguest: Path
) -> None:
    """A third node joins, the actor is placed there (soft node affinity), a
    call waits in a host function, and the node is removed: the call fails
    with WorkerLost naming that node, and the actor and its pool are made
    again on a remaining node."""
    ray = require_ray()
    import importlib

    from hlasync.ray import RaySupervisor

    strategies: Any = importlib.import_module("ray.util.scheduling_strategies")
    made = _CLUSTER["cluster"]
    doomed = made.add_node(**_CLUSTER["node_args"], resources={"kvm": 1})
    made.wait_for_nodes()
    doomed_id = next(
        n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in cluster.values()
    )
    entered, gate = threading.Event(), threading.Event()

    def held(x: int) -> int:
        entered.set()
        gate.wait(30)
        return x

    affinity = strategies.NodeAffinitySchedulingStrategy(node_id=doomed_id, soft=True)
    try:
        async with (
            RaySupervisor(
                actors=1, workers=1, actor_options={"scheduling_strategy": affinity}
            ) as sup,
            sup.subscribe(ev.WorkerDied, ev.WorkerStarted) as stream,
        ):
            assert sup.nodes() == {0: doomed_id}
            pool = await sup.create_pool(simpleguest, size=1, host_functions={"held": held})
            outcome: list[object] = []

            async def one() -> None:
                try:
                    outcome.append(await pool.call("call_host", "held", 7))
                except WorkerLost as exc:
                    outcome.append(exc)

            async with anyio.create_task_group() as group:
                group.start_soon(one)
                with anyio.fail_after(30):
                    while not entered.is_set():
                        await anyio.sleep(0.01)
                await anyio.to_thread.run_sync(made.remove_node, doomed)
            gate.set()
            assert len(outcome) == 1 and isinstance(outcome[0], WorkerLost), outcome
            assert outcome[0].node == doomed_id
            with anyio.fail_after(60):
                died, started = await stream.receive(), await stream.receive()
            assert isinstance(died, ev.WorkerDied) and died.node == doomed_id
            assert isinstance(started, ev.WorkerStarted)
            assert started.node in (cluster[HEAD], cluster[SECOND])
            assert await pool.call("add", 20, 22) == 42
    finally:
        gate.set()


async def test_a_cluster_without_room_fails_clearly(cluster: dict[str, str]) -> None:
    from hlasync.ray import RaySupervisor

    with pytest.raises(ValueError, match="actors"):
        RaySupervisor(actors=0)
    with pytest.raises(ValueError, match="resources"):
        RaySupervisor(resources={"kvm": -1})
    sup = RaySupervisor(actors=1, resources={"kvm": 1, "no_such_label": 1}, start_timeout=2)
    with pytest.raises(SupervisorError, match="cannot start worker 0 on the Ray cluster"):
        async with sup:
            pass


async def test_calls_on_ray_nodes_are_spans_with_host_functions_nested(
    cluster: dict[str, str], simpleguest: Path
) -> None:
    """The caller's span is the parent of a Ray call's ``hlasync.call`` span; a
    host function run on the driver nests under it, and so does the trace
    context seen by a host function given by reference, which runs on the node."""
    otel = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from hlasync import observability
    from hlasync.ray import RaySupervisor

    spans = InMemorySpanExporter()
    provider = otel.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("tests")
    observability.configure(tracer_provider=provider)

    def here(x: int) -> int:
        with tracer.start_as_current_span("here"):
            return x + 1

    try:
        async with RaySupervisor(actors=1, workers=1, resources={"kvm": 1, SECOND: 1}) as sup:
            pool = await sup.create_pool(
                simpleguest,
                size=1,
                host_functions={"here": here, "there": "tests.hostfns:current_trace"},
            )
            with tracer.start_as_current_span("request") as request:
                assert await pool.call("call_host", "here", 1) == 2
                there = await pool.call("call_host_str", "there", "x")
    finally:
        observability.configure(tracer_provider=None)
    calls = [s for s in spans.get_finished_spans() if s.name == "hlasync.call"]
    (nested,) = [s for s in spans.get_finished_spans() if s.name == "here"]
    assert len(calls) == 2
    request_id = request.get_span_context().span_id
    assert all(s.parent is not None and s.parent.span_id == request_id for s in calls)
    assert calls[0].context is not None and calls[1].context is not None
    assert nested.parent is not None and nested.parent.span_id == calls[0].context.span_id
    assert there == f"{calls[1].context.trace_id:032x}/{calls[1].context.span_id:016x}"
    assert calls[1].attributes is not None
    assert str(calls[1].attributes["hlasync.sandbox.id"]) in pool.sandbox_ids
