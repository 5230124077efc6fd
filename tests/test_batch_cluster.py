"""The batch job on a real two-node Ray cluster on this machine (two raylets on loopback, one CPU each): joined
with --address, and both nodes decode and infer, by the job's own record."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tests.conftest import jpeg
from tests.test_batch import assert_no_ray_left, job, rows


def test_the_job_spreads_over_a_two_node_cluster(tiny_onnx: Path, tmp_path: Path) -> None:
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": tmp}
    images = tmp_path / "images"
    images.mkdir()
    for i in range(48):
        (images / f"{i:02d}.jpg").write_bytes(jpeg((48, 40), (5 * i, 255 - 5 * i, 90)))
    out = tmp_path / "out"
    saved = dict(os.environ)
    os.environ.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": tmp})  # the nodes' processes inherit them
    # Ray binds this machine's own address, never loopback (ray._private.services.resolve_ip_for_localhost
    # replaces it): the cluster's traffic stays on this machine all the same.
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1, "include_dashboard": False})
    address = cluster.address
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        nodes = {cluster.head_node.node_id, worker.node_id}
        # Two model actors of half a CPU each (Ray spreads an actor pool across nodes), decoding tasks beside them.
        done = job([str(images), "-o", str(out), "-m", str(tiny_onnx), "--address", address, "--workers", "2",
                    "--cpus-per-worker", "0.5", "--decode-cpus", "0.5", "--threads-per-worker", "1",
                    "--batch-size", "4"], env)  # fmt: skip
        assert done.returncode == 0, done.stderr
    finally:
        cluster.shutdown()
        os.environ.clear()
        os.environ.update(saved)
    assert_no_ray_left(tmp)
    assert len(rows(out)) == 48 and all(r["status"] == "ok" for r in rows(out))
    record = json.loads((out / "_job.json").read_text())
    assert record["address"] == address
    worked = record["nodes"]
    assert set(worked) == nodes, f"the job ran on {sorted(worked)}, the cluster's nodes are {sorted(nodes)}"
    for node, share in worked.items():
        assert share["inferred"] > 0 and share["decoded"] > 0, (node, share)
    assert sum(s["inferred"] for s in worked.values()) == sum(s["decoded"] for s in worked.values()) == 48
