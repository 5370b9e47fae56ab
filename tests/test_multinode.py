"""A Ray cluster of three nodes on this machine, as Ray's own multi-node tests run one: a head with no CPUs for
workers and two worker nodes, each a separate `ray start` with its own node IP (127.0.0.2, 127.0.0.3: Ray binds a
node to its --node-ip-address) and one CPU. A 2-worker job with `placement_strategy: SPREAD` must put its ranks
on distinct nodes, as the workers themselves report it (metrics.jsonl's train_begin and the console).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import CONFIGS, run_cli
from tests.ray_nodes import stop_ray_processes

pytestmark = pytest.mark.slow

WORKER_NODE_IPS = ("127.0.0.2", "127.0.0.3")


@dataclass(frozen=True)
class Nodes:
    address: str  # the head's GCS address
    env: dict[str, str]  # what every node and client shares: the cluster's auth token
    temp_dir: str

    def add_node(self, ip: str, cpus: int = 1) -> None:
        command = [str(Path(sys.executable).parent / "ray"), "start", "--address", self.address,
                   "--node-ip-address", ip, "--num-cpus", str(cpus), "--disable-usage-stats"]  # fmt: skip
        started = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]


def alive_node_ips(nodes: Nodes) -> list[str]:
    probe = "import ray; ray.init(address='{}', logging_level='ERROR'); " \
            "print(sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')))"  # noqa: E501
    done = subprocess.run([sys.executable, "-c", probe.format(nodes.address)], env=nodes.env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1].replace("'", '"'))


@pytest.fixture(scope="module")
def nodes():
    temp_dir = tempfile.mkdtemp(prefix="lfmn-", dir="/tmp")  # short: unix socket paths are limited to ~107
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    head = [str(bin_dir / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", "0", "--num-cpus",
            "0", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir]  # fmt: skip
    try:
        started = subprocess.run(head, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        cluster = Nodes((Path(temp_dir) / "ray_current_cluster").read_text().strip(), env, temp_dir)
        for ip in WORKER_NODE_IPS:
            cluster.add_node(ip)
        deadline = time.monotonic() + 60
        while alive_node_ips(cluster) != list(WORKER_NODE_IPS):
            assert time.monotonic() < deadline, f"worker nodes did not join: {alive_node_ips(cluster)}"
            time.sleep(1)
        yield cluster
    finally:
        stop_ray_processes(temp_dir)


def test_a_spread_job_runs_its_ranks_on_distinct_nodes(nodes: Nodes, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    result = run_cli(
        "train", str(CONFIGS / "tiny.yaml"), "--address", nodes.address, "--run-id", "spread",
        "--set", f"storage.uri={storage}", "--set", "distributed.num_workers=2",
        "--set", "distributed.placement_strategy=SPREAD", "--set", "training.max_steps=4",
        env=nodes.env, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (storage / "runs" / "spread" / "metrics.jsonl").read_text().splitlines()]
    begin = next(record for record in records if record.get("event") == "train_begin")
    workers = begin["workers"]
    assert [worker["rank"] for worker in workers] == [0, 1]
    assert sorted(worker["node_ip"] for worker in workers) == list(WORKER_NODE_IPS), workers
    assert len({worker["node_id"] for worker in workers}) == 2
    for worker in workers:
        assert f"rank {worker['rank']} on node {worker['node_ip']}" in result.stdout, result.stdout[-2000:]
