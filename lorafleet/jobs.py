"""Run a job config on a remote cluster: through the Ray Jobs API, or as a KubeRay RayJob.

    lorafleet submit configs/tiny.yaml --address http://ray-head:8265 --wait
    lorafleet jobs list --address http://ray-head:8265
    lorafleet submit configs/tiny.yaml --k8s --wait

Ray Jobs API: the resolved config (`--set` applied) is written as `job.yaml` into a fresh working_dir
that Ray uploads with the job, next to copies of any local data files it names (so the cluster needs no
access to this machine); the entrypoint is `lorafleet train job.yaml --run-id ID --address auto`. The
run id is fixed here, at submit time, so a resubmitted job resumes the same run folder. The cluster's
nodes must have lorafleet installed (the default assumption: it is in the cluster image); otherwise
pass `--runtime-env` with e.g. `pip: [...]` or `py_modules`. The runtime env you give is merged with
ours (your working_dir, if local, is copied in beside job.yaml). `storage.uri` must name storage that
every node sees at the same path (an NFS/PVC mount, or s3://).

Kubernetes: `lorafleet.kuberay` renders the RayJob; `KubeRayJobs` creates it with the official client
and follows `status.jobDeploymentStatus` / `status.jobStatus`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lorafleet.config import JobConfig
from lorafleet.errors import LorafleetError
from lorafleet.runs import new_run_id, validate_run_id

TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
TERMINAL_DEPLOYMENT_STATUSES = ("Complete", "Failed", "ValidationFailed")
MAX_SHIPPED_DATA_BYTES = 200 * 2**20
JOB_CONFIG_NAME = "job.yaml"
AUTH_HINT = (
    "\n  the cluster uses token authentication: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)"
    " to its token (lorafleet sends the one it finds there; Ray's own CLI reads it only with RAY_AUTH_MODE=token)"
)


def cluster_token_headers() -> dict[str, str]:
    """The cluster token as a header, from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.

    Ray's clients send it only with RAY_AUTH_MODE=token, even when `ray start --head` wrote ~/.ray/auth_token;
    we send it whenever one is at hand (unless RAY_AUTH_MODE=disabled).
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
    if not token and token_file.is_file():
        token = token_file.read_text(encoding="utf-8", errors="replace").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


class SubmitError(LorafleetError):
    pass


@dataclass(frozen=True)
class Submission:
    job_id: str  # the Ray submission id, or the RayJob name on Kubernetes
    run_id: str
    entrypoint: str


def entrypoint_words(job: JobConfig, config_path: str, run_id: str) -> list[str]:
    """What a cluster runs for `job`: `lorafleet sweep` when the config has a sweep: section (the sweep id is
    `run_id`; a retry with the same id continues the sweep), else `lorafleet train` (a retry resumes the run)."""
    if job.sweep is not None:
        return ["lorafleet", "sweep", config_path, "--sweep-id", run_id, "--address", "auto"]
    return ["lorafleet", "train", config_path, "--run-id", run_id, "--address", "auto"]


def submission_run_id(job: JobConfig, run_id: str | None) -> str:
    """The run (or sweep) id fixed at submit time: the one given, else a fresh one from the job's name."""
    from lorafleet.sweeps import new_sweep_id

    return validate_run_id(run_id or (new_sweep_id(job.name) if job.sweep else new_run_id(job.name)))


def read_runtime_env(value: str | None) -> dict[str, Any]:
    """`--runtime-env`: a YAML/JSON file, or inline JSON/YAML (JSON is YAML)."""
    if not value:
        return {}
    path = Path(value).expanduser()
    text = path.read_text(encoding="utf-8") if path.is_file() else value
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SubmitError(f"--runtime-env {value}: not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise SubmitError(f"--runtime-env {value}: expected a mapping (a file path or inline JSON), got {data!r}")
    return data


# ---- Ray Jobs API -----------------------------------------------------------------------------------


def stage_job(job: JobConfig, dest: Path, user_working_dir: str | None = None) -> Path:
    """Write the working_dir that travels with the job: job.yaml + local data files (+ the user's dir)."""
    if user_working_dir:
        source = Path(user_working_dir).expanduser()
        if not source.is_dir():
            raise SubmitError(f"runtime_env.working_dir {user_working_dir}: not a local folder (remote URIs: not here)")
        shutil.copytree(source, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    data = job.model_dump(mode="json")
    shipped = 0
    for key in ("train", "eval"):
        value = data["data"][key]
        if value and Path(value).is_absolute() and Path(value).is_file():
            target = Path("_lorafleet_data") / key / Path(value).name
            (dest / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(value, dest / target)
            shipped += (dest / target).stat().st_size
            data["data"][key] = f"./{target.as_posix()}"  # resolved against job.yaml's folder on the cluster
    if shipped > MAX_SHIPPED_DATA_BYTES:
        raise SubmitError(
            f"local data files total {shipped / 2**20:.0f} MiB (limit {MAX_SHIPPED_DATA_BYTES // 2**20} MiB): "
            "put them on shared storage or a hub and reference that instead"
        )
    (dest / JOB_CONFIG_NAME).write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return dest / JOB_CONFIG_NAME


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


class RayJobs:
    """A thin wrapper over `ray.job_submission.JobSubmissionClient` that speaks lorafleet's errors."""

    def __init__(self, address: str | None):
        if not address:
            raise SubmitError("no Ray cluster given: pass --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)")
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        self.address = address
        self._errors = (RuntimeError, AuthenticationError)
        # Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS win over the address it is given; here the flag wins.
        hidden = {
            name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if name in os.environ
        }
        try:
            self.client = JobSubmissionClient(address, headers=cluster_token_headers())
        except AuthenticationError as exc:
            raise SubmitError(f"the Ray cluster at {address} refused us: {_first_line(exc)}{AUTH_HINT}") from None
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise SubmitError(f"cannot reach the Ray dashboard at {address}: {exc}") from None
        finally:
            os.environ.update(hidden)

    def submit(self, job: JobConfig, run_id: str, runtime_env: dict[str, Any] | None = None) -> Submission:
        runtime_env = dict(runtime_env or {})
        entrypoint = shlex.join(entrypoint_words(job, JOB_CONFIG_NAME, run_id))
        submission_id = f"lorafleet-{run_id}-{secrets.token_hex(2)}"
        with tempfile.TemporaryDirectory(prefix="lorafleet-submit-") as staging:
            stage_job(job, Path(staging), runtime_env.pop("working_dir", None))
            runtime_env["working_dir"] = staging
            metadata = {
                "lorafleet.run_id": run_id,
                "lorafleet.job": job.name,
                "lorafleet.config_hash": job.config_hash(),
            }
            try:  # the working_dir is uploaded inside submit_job, so the temp folder may go afterwards
                job_id = self.client.submit_job(
                    entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id, metadata=metadata
                )
            except self._errors as exc:
                raise SubmitError(f"the cluster at {self.address} refused the job: {_first_line(exc)}") from None
        return Submission(job_id=job_id, run_id=run_id, entrypoint=entrypoint)

    def _call(self, what: str, fn: Callable, *args):
        try:
            return fn(*args)
        except self._errors as exc:
            raise SubmitError(f"{what}: {_first_line(exc)}") from None

    def list(self) -> list[Any]:
        return sorted(self._call("list jobs", self.client.list_jobs), key=lambda info: info.start_time or 0)

    def info(self, job_id: str):
        return self._call(f"job {job_id}", self.client.get_job_info, job_id)

    def status(self, job_id: str) -> str:
        return str(self._call(f"job {job_id}", self.client.get_job_status, job_id).value)

    def logs(self, job_id: str) -> str:
        return self._call(f"job {job_id}", self.client.get_job_logs, job_id)

    def stop(self, job_id: str) -> bool:
        return bool(self._call(f"job {job_id}", self.client.stop_job, job_id))

    def follow(self, job_id: str, write: Callable[[str], Any] = sys.stdout.write, poll_s: float = 1.0) -> str:
        """Stream the job's logs until it ends; return its final status."""
        try:
            asyncio.run(self._tail(job_id, write))
        except Exception:  # websocket trouble (proxies): fall back to polling the whole log
            self._poll_logs(job_id, write, poll_s)
        while (status := self.status(job_id)) not in TERMINAL_STATUSES:
            time.sleep(poll_s)
        return status

    async def _tail(self, job_id: str, write: Callable[[str], Any]) -> None:
        async for lines in self.client.tail_job_logs(job_id):
            write(lines)
            sys.stdout.flush()

    def _poll_logs(self, job_id: str, write: Callable[[str], Any], poll_s: float) -> None:
        seen = 0
        while True:
            status = self.status(job_id)
            text = self.logs(job_id)
            write(text[seen:])
            seen = len(text)
            if status in TERMINAL_STATUSES:
                return
            time.sleep(poll_s)


# ---- KubeRay RayJob ---------------------------------------------------------------------------------


class KubeRayJobs:
    """Create and follow RayJobs with the official `kubernetes` client (CustomObjectsApi)."""

    def __init__(self, api_client=None, *, context: str | None = None, kubeconfig: str | None = None):
        from kubernetes import client, config

        if api_client is None:
            try:
                api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
            except (config.ConfigException, FileNotFoundError, TypeError) as exc:
                if kubeconfig or context:
                    raise SubmitError(f"kubeconfig {kubeconfig or '~/.kube/config'} ({context=}): {exc}") from None
                try:  # inside a pod: the service account (see k8s/base RBAC)
                    configuration = client.Configuration()
                    config.load_incluster_config(client_configuration=configuration)
                    api_client = client.ApiClient(configuration)
                except config.ConfigException:
                    raise SubmitError(f"no Kubernetes credentials: {exc}") from None
        self.api = client.CustomObjectsApi(api_client)

    def _call(self, what: str, fn: Callable, **kwargs):
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(group="ray.io", version="v1", plural="rayjobs", **kwargs)
        except ApiException as exc:
            hint = {
                404: " (is the KubeRay operator installed, and the namespace right?)",
                403: " (the submitter needs the lorafleet-submitter Role from k8s/base)",
                409: " (it already exists: pick another --run-id, or delete it)",
            }.get(exc.status, "")
            raise SubmitError(f"{what}: HTTP {exc.status} {exc.reason}{hint}") from None
        except OSError as exc:  # urllib3 connection errors
            raise SubmitError(f"{what}: cannot reach the Kubernetes API: {exc}") from None

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        return self._call(
            f"create RayJob {namespace}/{name}",
            self.api.create_namespaced_custom_object,
            namespace=namespace,
            body=body,
            _headers={"Content-Type": "application/json"},  # the client sends none by itself
        )

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return self._call(
            f"RayJob {namespace}/{name}", self.api.get_namespaced_custom_object, namespace=namespace, name=name
        )

    def follow(
        self,
        namespace: str,
        name: str,
        *,
        write: Callable[[str], Any] = print,
        poll_s: float = 5.0,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Print each change of (jobDeploymentStatus, jobStatus) until the RayJob is terminal; return status."""
        started, last = time.monotonic(), None
        while True:
            status = self.get(namespace, name).get("status") or {}
            now = (status.get("jobDeploymentStatus") or "New", status.get("jobStatus") or "-")
            if now != last:
                message = f" {status['message']}" if status.get("message") else ""
                write(f"rayjob {name}: deployment {now[0]}, job {now[1]}{message}")
                last = now
            if now[0] in TERMINAL_DEPLOYMENT_STATUSES:
                return status
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise SubmitError(f"RayJob {namespace}/{name} still {now[0]} after {timeout_s:.0f}s")
            time.sleep(poll_s)


def rayjob_succeeded(status: dict[str, Any]) -> bool:
    return status.get("jobDeploymentStatus") == "Complete" and status.get("jobStatus") == "SUCCEEDED"
