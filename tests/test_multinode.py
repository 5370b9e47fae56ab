"""A Ray cluster of three nodes on this machine, as Ray's own multi-node tests run one: a head with no CPUs for
workers and two worker nodes, each a separate `ray start` with its own node IP (127.0.0.2, 127.0.0.3: Ray binds a
node to its --node-ip-address) and one CPU.

- A 2-worker job with `placement_strategy: SPREAD` puts its ranks on distinct nodes, as the workers themselves
  report it (metrics.jsonl's train_begin and the console).
- Node loss: a whole worker node (its raylet and every process of it) is SIGKILLed mid-run; a replacement node
  joins (what an autoscaler or KubeRay does); Ray Train restarts the worker group (`max_failures: 1`) from the
  last checkpoint, and the run ends where an uninterrupted run with the same seed ends.
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
from tests.ray_nodes import processes_naming, stop_ray_processes
from tests.run_watch import final_loss, read_metrics, registered_checkpoint_steps, run

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


def kill_node(ip: str) -> int:
    """SIGKILL every process of the node bound to `ip` (raylet, agents, workers) and their children."""
    import psutil

    victims = processes_naming([ip])
    for process in victims:
        try:
            process.kill()
        except psutil.Error:
            pass
    return len(victims)


def node_run(nodes: Nodes, storage: Path, run_id: str, *extra: str) -> list[str]:
    return [sys.executable, "-c", "from lorafleet.cli import main; main()", "train", str(CONFIGS / "tiny.yaml"),
            "--address", nodes.address, "--run-id", run_id, "--set", f"storage.uri={storage}",
            "--set", "training.max_steps=24", "--set", "training.save_steps=4", "--set", "training.seed=7",
            *extra]  # fmt: skip


def test_a_lost_node_is_replaced_and_the_run_resumes_from_its_last_checkpoint(nodes: Nodes, tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    env_before = dict(os.environ)
    os.environ.update(nodes.env)  # the runs below inherit the cluster's token
    try:
        straight, _ = run(node_run(nodes, storage, "straight"), storage / "runs" / "straight")
        assert straight.returncode == 0, straight.stdout[-3000:]
        run_dir = storage / "runs" / "node-lost"
        watcher = NodeKiller(run_dir, nodes, lost="127.0.0.3", replacement="127.0.0.4")
        lost, _ = run(node_run(nodes, storage, "node-lost", "--set", "distributed.max_failures=1"), run_dir,
                      watch=watcher.step)  # fmt: skip
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    assert watcher.killed, "the run ended before the node could be killed: " + lost.stdout[-3000:]
    assert lost.returncode == 0, lost.stdout[-5000:]
    begins = [record for record in read_metrics(run_dir) if record.get("event") == "train_begin"]
    assert [begin["resumed"] for begin in begins] == [False, True], begins
    assert begins[1]["step"] in watcher.registered and begins[1]["step"] > 0, (begins, watcher.registered)
    assert sorted(worker["node_ip"] for worker in begins[1]["workers"]) == ["127.0.0.2", "127.0.0.4"]
    assert final_loss(run_dir, 24) == pytest.approx(final_loss(storage / "runs" / "straight", 24), rel=0.02)


class NodeKiller:
    """Called while a run is watched: once a checkpoint is registered and training moved past it, kill the node
    `lost`, then start the `replacement` node."""

    def __init__(self, run_dir: Path, nodes: Nodes, *, lost: str, replacement: str):
        self.run_dir, self.nodes, self.lost, self.replacement = run_dir, nodes, lost, replacement
        self.killed = 0
        self.registered: list[int] = []

    def step(self) -> bool:
        """True once done (nothing more to watch)."""
        registered = registered_checkpoint_steps(self.run_dir)
        steps = [record["step"] for record in read_metrics(self.run_dir) if "loss" in record]
        if not (registered and steps and max(steps) > max(registered)):
            return False
        self.registered = registered
        self.killed = kill_node(self.lost)
        self.nodes.add_node(self.replacement)
        return True
