"""`lorafleet submit` and `lorafleet jobs`: on a real local Ray cluster (Ray Jobs API), and `--k8s` against
an in-process emulator of the Kubernetes API's RayJob endpoints.

The Ray cluster is started with `ray start --head` in a short temp dir on free ports, and only its own
processes (found by that temp dir and its GCS address) are stopped afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from lorafleet.cluster_options import ClusterOptions
from lorafleet.config import load_job_config
from lorafleet.errors import LorafleetError
from lorafleet.jobs import KubeRayJobs, RayJobs, read_runtime_env, stage_job
from lorafleet.kuberay import render_rayjob
from lorafleet.serving.server import free_port
from tests.helpers import CONFIGS, run_cli
from tests.ray_nodes import RAY_WORKER_PORTS, stop_ray_processes

TINY = CONFIGS / "tiny.yaml"
RAY_DEFAULT_EXTRAS = "aiohttp_cors, colorful, opencensus, opentelemetry-*, py-spy, smart_open, virtualenv"


# ---- pieces that need no cluster --------------------------------------------------------------------


def test_read_runtime_env_from_file_inline_json_and_errors(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("pip: [requests]\nenv_vars: {A: '1'}\n")
    assert read_runtime_env(str(path)) == {"pip": ["requests"], "env_vars": {"A": "1"}}
    assert read_runtime_env('{"env_vars": {"B": "2"}}') == {"env_vars": {"B": "2"}}
    assert read_runtime_env(None) == {}
    with pytest.raises(LorafleetError, match="expected a mapping"):
        read_runtime_env("just-a-word")


def test_stage_job_ships_config_local_data_and_the_users_working_dir(tmp_path):
    data = tmp_path / "mine" / "train.jsonl"
    data.parent.mkdir()
    data.write_text('{"instruction": "price?", "input": "", "output": "12"}\n' * 20)
    job = load_job_config(TINY, [f"data.train={data}", f"storage.uri={tmp_path / 'storage'}"])
    code = tmp_path / "code"
    (code / ".git").mkdir(parents=True)
    (code / "helper.py").write_text("X = 1\n")
    staging = tmp_path / "staging"
    config_path = stage_job(job, staging, str(code))

    assert (staging / "helper.py").is_file() and not (staging / ".git").exists()
    staged = yaml.safe_load(config_path.read_text())
    assert staged["data"]["train"] == "./_lorafleet_data/train/train.jsonl"
    data.unlink()  # the cluster sees only the copy: the staged config must load from its own folder
    again = load_job_config(config_path)
    assert again.data.train == str((staging / "_lorafleet_data" / "train" / "train.jsonl").resolve())
    assert again.model_dump(exclude={"data"}) == job.model_dump(exclude={"data"})


def test_ray_submission_request_carries_entrypoint_runtime_env_and_metadata(tmp_path):
    """RayJobs.submit with a recording stand-in for JobSubmissionClient: what reaches submit_job."""
    seen = {}

    class Recorder:
        def submit_job(self, **kwargs):
            seen.update(kwargs, staged=sorted(p.name for p in Path(kwargs["runtime_env"]["working_dir"]).iterdir()))
            seen["config"] = yaml.safe_load((Path(kwargs["runtime_env"]["working_dir"]) / "job.yaml").read_text())
            return kwargs["submission_id"]

    jobs = RayJobs.__new__(RayJobs)
    jobs.address, jobs.client, jobs._errors = "http://head:8265", Recorder(), (RuntimeError,)
    job = load_job_config(TINY, [f"storage.uri={tmp_path}", "training.max_steps=3"])
    user_env = {"pip": ["lorafleet==0.1.0"], "env_vars": {"HF_TOKEN": "x"}}
    submission = jobs.submit(job, "tiny-r1", user_env)

    assert seen["entrypoint"] == submission.entrypoint == "lorafleet train job.yaml --run-id tiny-r1 --address auto"
    assert submission.job_id.startswith("lorafleet-tiny-r1-") and submission.run_id == "tiny-r1"
    assert seen["runtime_env"]["pip"] == ["lorafleet==0.1.0"] and seen["runtime_env"]["env_vars"] == {"HF_TOKEN": "x"}
    assert seen["staged"] == ["job.yaml"] and seen["config"] == job.model_dump(mode="json")
    assert seen["metadata"] == {
        "lorafleet.run_id": "tiny-r1",
        "lorafleet.job": "tiny",
        "lorafleet.config_hash": job.config_hash(),
    }
    assert user_env == {"pip": ["lorafleet==0.1.0"], "env_vars": {"HF_TOKEN": "x"}}  # the caller's dict is untouched


def test_submit_without_an_address_or_with_dry_run_alone_explains_itself():
    env = {"RAY_API_SERVER_ADDRESS": ""}
    result = run_cli("submit", "configs/tiny.yaml", env=env)
    assert result.returncode == 1 and "pass --address http://HEAD:8265" in result.stderr
    result = run_cli("submit", "configs/tiny.yaml", "--dry-run", env=env)
    assert result.returncode == 1 and "--dry-run needs --k8s" in result.stderr
    result = run_cli("jobs", "list", "--address", f"http://127.0.0.1:{free_port(avoid=RAY_WORKER_PORTS)}")
    assert result.returncode == 1 and "cannot reach the Ray dashboard" in result.stderr
    with pytest.raises(LorafleetError, match="--address"):
        RayJobs(None)


# ---- --k8s against an emulator of the Kubernetes API ------------------------------------------------


class FakeKubeApi:
    """An in-process emulator of the RayJob endpoints of a kube-apiserver (create, get).

    It proves the request shapes the `kubernetes` client sends (path, verb, auth, JSON body) and how we
    read the answers, not cluster behaviour: it has no operator, no admission, no schema of its own.
    Each GET of a created RayJob returns the next status in `statuses` (the last one repeats).
    """

    def __init__(self, statuses: list[dict], create_code: int = 201):
        self.statuses, self.create_code = statuses, create_code
        self.requests: list[dict] = []
        self.objects: dict[str, dict] = {}
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _record(self, body=None) -> None:
                api.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                self._record(body)
                if api.create_code != 201:
                    status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": api.create_code}
                    self._reply(api.create_code, status)
                    return
                created = json.loads(json.dumps(body))
                created["metadata"] |= {
                    "uid": "0000-1111",
                    "resourceVersion": "1",
                    "creationTimestamp": "2025-01-01T00:00:00Z",
                }
                api.objects[self.path + "/" + body["metadata"]["name"]] = created
                self._reply(201, created)

            def do_GET(self):
                self._record()
                if self.path not in api.objects:
                    self._reply(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404})
                    return
                status = api.statuses.pop(0) if len(api.statuses) > 1 else api.statuses[0]
                self._reply(200, api.objects[self.path] | {"status": status})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "emu", "cluster": {"server": self.url}}],
                    "users": [{"name": "emu", "user": {"token": "test-token"}}],
                    "contexts": [{"name": "emu", "context": {"cluster": "emu", "user": "emu"}}],
                    "current-context": "emu",
                }
            )
        )
        return path


SUCCEEDS = [
    {"jobDeploymentStatus": "Initializing"},
    {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
    {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"},
]
FAILS = [
    {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
    {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "message": "Job entrypoint command failed"},
]


@pytest.fixture
def fake_kube():
    apis: list[FakeKubeApi] = []

    def start(statuses=SUCCEEDS, create_code=201) -> FakeKubeApi:
        apis.append(FakeKubeApi(list(statuses), create_code))
        return apis[-1]

    yield start
    for api in apis:
        api.server.shutdown()
        api.server.server_close()


def tiny_rayjob(run_id: str = "tiny-k8s-1") -> dict:
    job = load_job_config(TINY, ["storage.uri=/srv/lorafleet"])
    return render_rayjob(job, run_id, ClusterOptions(namespace="ml"))


def test_rayjob_body_survives_the_clients_serialisation():
    from kubernetes.client import ApiClient

    body = tiny_rayjob()
    assert ApiClient().sanitize_for_serialization(body) == body
    assert json.loads(json.dumps(body)) == body


def test_create_sends_the_rayjob_to_the_custom_objects_endpoint(fake_kube):
    from kubernetes.client import ApiClient, Configuration

    api = fake_kube()
    configuration = Configuration(host=api.url)
    configuration.api_key = {"authorization": "Bearer abc"}
    kube = KubeRayJobs(ApiClient(configuration))
    body = tiny_rayjob()
    created = kube.create(body)
    (request,) = api.requests
    assert (request["method"], request["path"]) == ("POST", "/apis/ray.io/v1/namespaces/ml/rayjobs")
    assert request["headers"]["content-type"] == "application/json"
    assert request["headers"]["authorization"] == "Bearer abc"
    assert request["body"] == body
    assert created["metadata"]["uid"] == "0000-1111"
    final = kube.follow("ml", body["metadata"]["name"], write=lambda line: None, poll_s=0)
    assert final["jobStatus"] == "SUCCEEDED"
    assert api.requests[-1]["path"] == "/apis/ray.io/v1/namespaces/ml/rayjobs/tiny-k8s-1"


@pytest.mark.parametrize(("statuses", "code", "word"), [(SUCCEEDS, 0, "SUCCEEDED"), (FAILS, 1, "FAILED")])
def test_submit_k8s_wait_follows_status_and_exits_by_outcome(fake_kube, tmp_path, statuses, code, word):
    api = fake_kube(statuses)
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    result = run_cli(
        "submit", "configs/tiny.yaml", "--set", "storage.uri=/srv/lorafleet", "--run-id", "tiny-wait-1",
        "--k8s", "--kubeconfig", str(kubeconfig), "--context", "emu", "--wait", "--poll-seconds", "0.05",
    )  # fmt: skip
    assert result.returncode == code, result.stdout + result.stderr
    assert "rayjob lorafleet/tiny-wait-1 created" in result.stdout and "run tiny-wait-1" in result.stdout
    assert f"job {word}" in result.stdout
    post = api.requests[0]
    assert post["path"] == "/apis/ray.io/v1/namespaces/lorafleet/rayjobs"
    assert post["headers"]["authorization"] == "Bearer test-token"
    assert post["body"]["kind"] == "RayJob" and post["body"]["metadata"]["name"] == "tiny-wait-1"


@pytest.mark.parametrize(
    ("code", "hint"), [(404, "KubeRay operator installed"), (409, "already exists"), (403, "Role")]
)
def test_submit_k8s_api_errors_become_clear_messages(fake_kube, tmp_path, code, hint):
    api = fake_kube(create_code=code)
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
    result = run_cli(
        "submit", "configs/tiny.yaml", "--set", "storage.uri=/srv/lorafleet", "--k8s", "--kubeconfig", str(kubeconfig)
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"HTTP {code}" in result.stderr and hint in result.stderr and "Traceback" not in result.stderr


# ---- a real Ray cluster -----------------------------------------------------------------------------

@dataclass(frozen=True)
class RayCluster:
    address: str
    env: dict[str, str]  # what a client needs besides the address: the cluster's auth token


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray head with the dashboard (Jobs API) on free ports, with token authentication on.

    The token is explicit (RAY_AUTH_MODE/RAY_AUTH_TOKEN), so the test does not depend on ~/.ray/auth_token,
    which Ray writes on the first embedded `ray.init()` of a machine and then applies to every new cluster.
    """
    temp_dir = tempfile.mkdtemp(prefix="lfray-", dir="/tmp")  # short: unix socket paths are limited to ~107
    dashboard = free_port(avoid=RAY_WORKER_PORTS)
    bin_dir = Path(sys.executable).parent
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    env = {**os.environ, **auth, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # `lorafleet`
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    command = [
        str(bin_dir / "ray"), "start", "--head", "--port", "0", "--num-cpus", "2", "--disable-usage-stats",
        "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--dashboard-agent-listen-port", str(free_port(avoid=RAY_WORKER_PORTS)),
        "--ray-client-server-port", str(free_port(avoid=RAY_WORKER_PORTS)),
        "--temp-dir", temp_dir,
    ]  # fmt: skip
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        if started.returncode != 0:
            hint = ""
            if "missing packages" in started.stdout + started.stderr:
                hint = f"\nthe dashboard needs ray[default]'s extras ({RAY_DEFAULT_EXTRAS})"
            pytest.fail(f"ray start failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}{hint}", pytrace=False)
        address = f"http://127.0.0.1:{dashboard}"
        request = urllib.request.Request(
            f"{address}/api/version", headers={"Authorization": f"Bearer {auth['RAY_AUTH_TOKEN']}"}
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the Ray dashboard at {address} did not answer", pytrace=False)
                time.sleep(0.5)
        yield RayCluster(address, auth)
    finally:
        stop_ray_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_jobs_cli_without_the_clusters_token_says_how_to_authenticate(ray_cluster):
    result = run_cli(
        "jobs", "list", "--address", ray_cluster.address, env={"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong"}
    )
    assert result.returncode == 1 and "set RAY_AUTH_TOKEN" in result.stderr and "Traceback" not in result.stderr


def test_the_token_in_ray_auth_token_is_used_without_ray_auth_mode(ray_cluster, tmp_path):
    """`ray start --head` writes ~/.ray/auth_token; Ray's own clients ignore it unless RAY_AUTH_MODE=token."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(ray_cluster.env["RAY_AUTH_TOKEN"])
    unset: dict[str, str | None] = {"RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN": None, "RAY_AUTH_TOKEN_PATH": None}
    result = run_cli("jobs", "list", "--address", ray_cluster.address, env={**unset, "HOME": str(home)})
    assert result.returncode == 0, result.stdout + result.stderr
    (home / ".ray" / "auth_token").write_text("not-the-token")
    refused = run_cli("jobs", "list", "--address", ray_cluster.address, env={**unset, "HOME": str(home)})
    assert refused.returncode == 1 and "RAY_AUTH_MODE=token" in refused.stderr and "~/.ray/auth_token" in refused.stderr


def test_stopped_job_is_read_back_through_the_jobs_cli(ray_cluster, tmp_path):
    """Submit (no --wait), stop it at once: status, list, logs --follow (exit 1: not SUCCEEDED), stop again."""
    address = ["--address", ray_cluster.address]
    result = run_cli(
        "submit", "configs/tiny.yaml", *address, "--set", f"storage.uri={tmp_path}", "--run-id", "stopped-1",
        timeout=300, env=ray_cluster.env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = result.stdout.split()[1]
    assert job_id.startswith("lorafleet-stopped-1-") and "run stopped-1" in result.stdout
    assert f"lorafleet jobs logs {job_id} --follow" in result.stdout

    stop = run_cli("jobs", "stop", job_id, *address, env=ray_cluster.env)
    assert stop.returncode == 0 and "stop requested" in stop.stdout, stop.stdout + stop.stderr
    follow = run_cli("jobs", "logs", job_id, "--follow", *address, env=ray_cluster.env, timeout=300)
    assert follow.returncode == 1 and f"job {job_id} STOPPED" in follow.stdout, follow.stdout + follow.stderr
    status = run_cli("jobs", "status", job_id, *address, env=ray_cluster.env)
    assert status.returncode == 0 and f"job {job_id}: STOPPED" in status.stdout and "run: stopped-1" in status.stdout
    assert "entrypoint: lorafleet train job.yaml --run-id stopped-1 --address auto" in status.stdout
    listed = run_cli("jobs", "list", *address, env=ray_cluster.env)
    assert job_id in listed.stdout and "stopped-1" in listed.stdout
    again = run_cli("jobs", "stop", job_id, *address, env=ray_cluster.env)
    assert again.returncode == 0 and "already finished" in again.stdout
    missing = run_cli("jobs", "status", "no-such-job", *address, env=ray_cluster.env)
    assert missing.returncode == 1 and "does not exist" in missing.stderr


@pytest.mark.slow
def test_submit_runs_the_tiny_job_on_the_cluster_and_writes_the_adapter(ray_cluster, tmp_path):
    result = run_cli(
        "submit", "configs/tiny.yaml", "--address", ray_cluster.address, "--set", f"storage.uri={tmp_path}",
        "--set", "training.max_steps=3", "--set", "distributed.num_workers=1", "--run-id", "tiny-remote-1", "--wait",
        timeout=900, env=ray_cluster.env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    job_id = result.stdout.split()[1]
    assert f"job {job_id} SUCCEEDED" in result.stdout
    run_dir = tmp_path / "runs" / "tiny-remote-1"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["training"]["max_steps"] == 3

    status = run_cli("jobs", "status", job_id, "--address", ray_cluster.address, env=ray_cluster.env)
    assert f"job {job_id}: SUCCEEDED" in status.stdout and "run: tiny-remote-1" in status.stdout
    logs = run_cli("jobs", "logs", job_id, "--address", ray_cluster.address, env=ray_cluster.env)
    assert "run tiny-remote-1" in logs.stdout and "adapter" in logs.stdout


@pytest.mark.slow
def test_submit_sweep_runs_the_sweep_on_the_cluster(ray_cluster, tmp_path):
    result = run_cli(
        "submit", "configs/sweep-tiny.yaml", "--sweep", "--address", ray_cluster.address,
        "--set", f"storage.uri={tmp_path}", "--set", "sweep.space={training.learning_rate: {grid: [0.003, 0.001]}}",
        "--run-id", "tiny-sweep-remote", "--wait", timeout=900, env=ray_cluster.env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    assert "sweep tiny-sweep-remote: 2 trials" in result.stdout  # the driver's summary, from the job's logs
    sweep = tmp_path / "sweeps" / "tiny-sweep-remote"
    best = json.loads((sweep / "best.json").read_text())
    assert best["run_id"] in ("tiny-sweep-remote-t0", "tiny-sweep-remote-t1")
    assert (tmp_path / "runs" / best["run_id"] / "adapter" / "adapter_model.safetensors").is_file()
