"""``RaySupervisor`` with no cluster named: it starts a one-node Ray instance
on this machine, or joins the cluster that ``ray start --head`` runs here;
and ``num_cpus``, which lets ``kvm: N`` alone decide how many actors a node
takes.

Each test has Ray's files (``RAY_TMPDIR``) and its token (``~/.ray``, under
``HOME``) in a short directory of its own, and leaves no Ray process behind.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from hlasync import SupervisorError
from hlasync.kvm import Kvm
from tests.ray import require_ray

pytestmark = pytest.mark.anyio

#: What the tests change in the environment (Ray's ``ray.init()`` sets
#: ``RAY_AUTH_MODE=token`` in this process when it starts a local instance).
_ENV = (
    "HOME",
    "RAY_TMPDIR",
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # each test starts Ray: the trio runs of test_cluster.py cover trio


def _reset_ray_auth() -> None:
    """Forget the authentication mode and token this process has loaded (Ray
    caches both), as Ray's own tests do between clusters."""
    raylet: Any = importlib.import_module("ray._raylet")
    if not hasattr(raylet, "AuthenticationTokenLoader"):  # a Ray without token authentication
        return
    raylet.Config.initialize("")
    raylet.AuthenticationTokenLoader.instance().reset_cache()


@pytest.fixture
def ray_here(kvm: Kvm) -> Iterator[Path]:
    """A short directory for Ray's files (``RAY_TMPDIR``: its socket paths
    stay under 108 bytes) and a home of its own (``~/.ray/auth_token``), no
    ``RAY_ADDRESS`` nor auth settings; Ray shut down and all of it undone after."""
    ray = require_ray()
    assert not ray.is_initialized()
    saved = {name: os.environ.get(name) for name in _ENV}
    temp = Path(tempfile.mkdtemp(prefix="hlrl-", dir="/tmp"))
    (temp / "home").mkdir()
    for name in _ENV:
        os.environ.pop(name, None)
    os.environ["HOME"] = str(temp / "home")
    os.environ["RAY_TMPDIR"] = str(temp)
    _reset_ray_auth()
    try:
        yield temp
    finally:
        ray.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reset_ray_auth()
        shutil.rmtree(temp, ignore_errors=True)


def test_num_cpus_is_checked() -> None:
    from hlasync.ray import RaySupervisor

    assert RaySupervisor().num_cpus == 0  # the kvm resource alone places the actors
    assert RaySupervisor(num_cpus=0.5).num_cpus == 0.5
    for wrong in (-1, "1", True, None, math.nan, math.inf):
        with pytest.raises(ValueError, match="num_cpus must be a non-negative number"):
            RaySupervisor(num_cpus=wrong)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"actor_options cannot set 'num_cpus'.*num_cpus="):
        RaySupervisor(actor_options={"num_cpus": 1})
    with pytest.raises(ValueError, match=r"actor_options cannot set 'resources'.*resources="):
        RaySupervisor(actor_options={"resources": {"kvm": 1}})
    with pytest.raises(ValueError, match=r"resources cannot name 'CPU'.*num_cpus="):
        RaySupervisor(resources={"kvm": 1, "CPU": 1})


async def test_kvm_n_lets_n_actors_land_on_a_node_with_fewer_cpus(
    ray_here: Path, simpleguest: Path
) -> None:
    """A node of 2 CPUs offering ``kvm: 4`` takes 4 actors (Ray's default for an
    actor, one CPU to be placed, would fit only 2); ``num_cpus=1`` asks for
    the CPUs again, and the third actor finds none."""
    ray = require_ray()
    from hlasync.ray import RaySupervisor

    ray.init(
        num_cpus=2,
        resources={"kvm": 4},
        include_dashboard=False,
        object_store_memory=80 << 20,
        log_to_driver=False,
        configure_logging=False,
    )
    async with RaySupervisor(actors=4, workers=1, start_timeout=20) as sup:
        nodes = sup.nodes()
        assert len(nodes) == 4 and len(set(nodes.values())) == 1, nodes
        pool = await sup.create_pool(simpleguest, size=4)
        assert [await pool.call("add", i, 1) for i in range(8)] == [i + 1 for i in range(8)]
    sup = RaySupervisor(actors=3, workers=1, num_cpus=1, start_timeout=3)
    with pytest.raises(SupervisorError, match=r"cannot start worker .*num_cpus 1"):
        async with sup:
            pass


async def test_with_no_cluster_it_starts_one_offering_kvm_for_each_actor(
    ray_here: Path, simpleguest: Path
) -> None:
    """The command of the issue: 4 actors, no ``ray.init()``, no cluster, on a
    machine of 2 CPUs (where it failed to place the third actor)."""
    ray = require_ray()
    from hlasync.ray import RaySupervisor

    async with RaySupervisor(actors=4, workers=2, start_timeout=20) as sup:
        assert ray.cluster_resources()["kvm"] == 4
        assert len(set(sup.nodes().values())) == 1 and len(sup.nodes()) == 4
        pool = await sup.create_pool(simpleguest, size=4)
        assert await pool.call("add", 2, 3) == 5
    assert (ray_here / "home" / ".ray" / "auth_token").is_file()  # ray.init()'s default


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_processes(mark: str) -> set[psutil.Process]:
    """The processes of the Ray instance whose files are under ``mark`` (each
    names its session directory), and their children (the workers)."""
    found: set[psutil.Process] = set()
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(mark in part for part in process.info["cmdline"] or ()):
                found.add(process)
                found.update(process.children(recursive=True))
        except psutil.Error:
            continue
    return found - {psutil.Process()}


def _stop(mark: str) -> None:
    """Stop that instance by its processes' ids (``ray stop`` would stop every
    Ray instance of this machine)."""
    processes = _ray_processes(mark)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(list(processes), timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=10)


@pytest.mark.parametrize("auth", ["no token", "token"])
async def test_it_joins_the_cluster_ray_start_runs_on_this_machine(
    ray_here: Path, simpleguest: Path, auth: str
) -> None:
    """``ray start --head --resources '{"kvm": 4}'`` here, then
    ``RaySupervisor()`` with no address: it joins that head (its ``kvm: 4``,
    its node) instead of failing to start a second instance. With a token in
    ``~/.ray/auth_token`` the head requires it, and the driver, finding the
    local cluster itself, sends it."""
    ray = require_ray()
    from hlasync.ray import RaySupervisor

    ray_bin = Path(sys.executable).with_name("ray")
    command = [str(ray_bin) if ray_bin.exists() else "ray", "start", "--head"]
    gcs_port = _free_port()
    command += [
        f"--port={gcs_port}",
        f"--dashboard-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        "--include-dashboard=false",
        "--num-cpus=2",
        "--object-store-memory=83886080",
        "--resources",
        '{"kvm": 4}',
        "--disable-usage-stats",
    ]
    env = dict(os.environ)
    if auth == "token":
        subprocess.run(
            [command[0], "get-auth-token", "--generate"],
            env=env,
            capture_output=True,
            check=True,
            timeout=120,
        )
    try:
        started = subprocess.run(
            command, env=env, capture_output=True, text=True, check=False, timeout=180
        )
        assert started.returncode == 0, started.stdout + started.stderr
        enabled = "Token authentication is enabled" in started.stderr + started.stdout
        assert enabled == (auth == "token"), started.stderr
        head = (ray_here / "ray" / "ray_current_cluster").read_text().strip()
        assert head.endswith(f":{gcs_port}")

        async with RaySupervisor(actors=2, workers=1, start_timeout=20) as sup:
            assert ray.get_runtime_context().gcs_address == head
            assert ray.cluster_resources()["kvm"] == 4  # the head's, not a new instance's
            (node,) = (n["NodeID"] for n in ray.nodes() if n["Alive"])
            assert set(sup.nodes().values()) == {node}
            pool = await sup.create_pool(simpleguest, size=2)
            assert await pool.call("add", 20, 22) == 42
        assert os.environ.get("RAY_AUTH_MODE") == ("token" if auth == "token" else None)
    finally:
        ray.shutdown()
        _stop(str(ray_here))
    assert not _ray_processes(str(ray_here)), "the head left processes behind"
