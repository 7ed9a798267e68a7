"""Sandboxes across a Ray cluster: a pool spread over two nodes, a hung guest
dumped on its node and its core brought home.

Run it from a checkout (needs /dev/kvm and Ray: ``python -m pip install -e '.[ray]'``)::

    python examples/ray_cluster.py               # starts a two-node local cluster
    RAY_ADDRESS=HEAD:6379 python examples/ray_cluster.py   # an existing cluster

On an existing cluster, the nodes that may host sandboxes offer the ``kvm``
resource (``ray start ... --resources '{"kvm": 2}'``); one whose head requires
Ray's token needs ``RAY_AUTH_MODE=token`` and the token here too (e.g.
``RAY_AUTH_TOKEN_PATH``); see docs/cluster.md.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import ray

from hlasync import CoreDump, GuestTimeout, SandboxConfig, guests
from hlasync import events as ev
from hlasync.ray import RaySupervisor
from hlasync.supervisor import Pool


async def main(node_dumps: Path) -> None:
    guest = guests.path("simpleguest")
    async with RaySupervisor(actors=2, workers=1) as sup:
        print("workers on nodes:", {i: node[:12] for i, node in sup.nodes().items() if node})
        async with sup.subscribe(ev.CallCompleted) as stream:
            pool = await sup.create_pool(guest, size=4)
            results: list[int] = []
            async with anyio.create_task_group() as group:
                for i in range(100):
                    group.start_soon(_call, pool, i, results)
            print("100 calls:", sorted(results) == [i + 1 for i in range(100)])
            per_node: Counter[str] = Counter()
            while sum(per_node.values()) < 100:
                event = await stream.receive()
                per_node[(event.node or "here")[:12]] += 1
            print("calls completed per node:", dict(per_node))

        # The nodes write into node_dumps (on this machine, here); the fetched
        # copy goes to $HYPERLIGHT_CORE_DUMP_DIR, else the temp directory. Both stay.
        sandbox = await sup.create_sandbox(guest, SandboxConfig(crashdump_dir=node_dumps))
        try:
            await sandbox.call("spin", timeout=0.2)
        except GuestTimeout as exc:
            print(f"hung guest stopped on node {exc.node and exc.node[:12]}: {exc}")
            local = await sup.fetch_crashdump(exc)
            with CoreDump.open(local) as dump:
                print("fetched core:", local.name, "- stopped in", dump.backtrace()[0].symbol)
            print(f"open it with: gdb {guest} {local}")


async def _call(pool: Pool, i: int, results: list[int]) -> None:
    value = await pool.call("add", i, 1)
    assert isinstance(value, int)
    results.append(value)


def run() -> None:
    node_dumps = Path(tempfile.mkdtemp(prefix="hlasync-ray-example-"))
    cluster: Any = None
    temp = ""
    if not os.environ.get("RAY_ADDRESS"):
        Cluster: Any = importlib.import_module("ray.cluster_utils").Cluster  # noqa: N806

        temp = tempfile.mkdtemp(prefix="hlray-", dir="/tmp")  # Ray's socket paths stay short
        os.environ["RAY_TMPDIR"] = temp
        os.makedirs(os.path.join(temp, "ray"))
        node = {"num_cpus": 2, "object_store_memory": 80 << 20, "temp_dir": f"{temp}/ray"}
        cluster = Cluster(
            initialize_head=True,
            head_node_args={**node, "resources": {"kvm": 1}, "include_dashboard": False},
        )
        cluster.add_node(**node, resources={"kvm": 1})
        ray.init(address=cluster.address, log_to_driver=False)
    else:
        ray.init(log_to_driver=False)
    try:
        anyio.run(main, node_dumps)
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    run()
