"""KubeRay objects rendered from job configs, validated against the operator's own CRD schemas.

RayJob/RayCluster bodies are checked with jsonschema against `spec.versions[v1].schema.openAPIV3Schema`
of the CRDs in ../shared/crds (made strict: `additionalProperties: false` wherever the schema lists
properties, so a misspelt field fails), plus KubeRay's rules the schema cannot express; their Pod
templates are checked as Pods by kubernetes_validate (Kubernetes 1.30, strict). The k8s/ manifests get
the same checks, and `kubectl kustomize` renders each overlay.
"""

from __future__ import annotations

import copy
import os
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from lorafleet.cluster_options import ClusterOptions
from lorafleet.config import load_job_config
from lorafleet.errors import ConfigError
from lorafleet.kuberay import (
    SUBMISSION_MODES,
    k8s_name,
    render_raycluster,
    render_rayjob,
)
from tests.helpers import CONFIGS, REPO, run_cli

CRDS = Path(__file__).resolve().parents[2] / "shared" / "crds"
K8S_VERSION = "1.30"
TINY = CONFIGS / "tiny.yaml"

LLAMA_8B_QLORA = """
name: llama3-8b-qlora
model:
  name_or_path: meta-llama/Llama-3.1-8B-Instruct
  quantization: 4bit
  gradient_checkpointing: true
adapter: {method: lora, r: 16, alpha: 32}
data: {train: "builtin:price", max_seq_len: 1024}
training: {max_steps: 500, micro_batch_size: 4, precision: bf16}
distributed:
  num_workers: 4
  use_gpu: true
  resources_per_worker: {CPU: 8, GPU: 1}
  strategy: ddp
storage: {uri: s3://lorafleet-bucket/lorafleet}
"""

LLAMA_70B_ZERO3 = """
name: llama3-70b-qlora-zero3
model:
  name_or_path: meta-llama/Llama-3.1-70B-Instruct
  quantization: 4bit
  gradient_checkpointing: true
adapter: {method: lora, r: 16, alpha: 32}
data: {train: "builtin:price", max_seq_len: 2048}
training: {max_steps: 200, micro_batch_size: 1, gradient_accumulation_steps: 8, precision: bf16}
distributed:
  num_workers: 8
  use_gpu: true
  resources_per_worker: {CPU: 12, GPU: 1, memory: 137438953472}
  strategy: deepspeed
  max_failures: 2
"""


# ---- schemas ----------------------------------------------------------------------------------------


@cache
def crd_schema(kind_file: str) -> dict[str, Any]:
    path = CRDS / kind_file
    if not path.is_file():
        pytest.fail(f"KubeRay CRD {path} is missing: the tests need ../shared/crds beside the checkout", pytrace=False)
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 1 MB+ files
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(version["schema"]["openAPIV3Schema"])


@cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(
        crd_schema({"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}[kind])
    )


def strict(schema: Any) -> Any:
    """Forbid unknown keys wherever the schema lists properties and does not preserve unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(schema)
    return schema


def crd_errors(body: dict[str, Any]) -> list[str]:
    validator = crd_validator(body["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)]


def pod_errors(template: dict[str, Any], name: str) -> list[str]:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template.get("metadata", {})}}
    pod["spec"] = template["spec"]
    try:
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{name}: {'.'.join(map(str, exc.absolute_path))}: {exc.message}"]
    return []


def cluster_spec_of(body: dict[str, Any]) -> dict[str, Any]:
    return body["spec"]["rayClusterSpec"] if body["kind"] == "RayJob" else body["spec"]


def all_errors(body: dict[str, Any]) -> list[str]:
    errors = crd_errors(body)
    if body["kind"] == "RayJob":
        mode = body["spec"].get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            errors.append(f"spec.submissionMode: {mode!r} is not one of {SUBMISSION_MODES}")
        if not isinstance(yaml.safe_load(body["spec"]["runtimeEnvYAML"]), dict):
            errors.append("spec.runtimeEnvYAML is not a YAML mapping")
    if body["kind"] == "RayCluster" or "rayClusterSpec" in body["spec"]:
        spec = cluster_spec_of(body)
        errors += pod_errors(spec["headGroupSpec"]["template"], "head")
        for group in spec["workerGroupSpecs"]:
            errors += pod_errors(group["template"], group["groupName"])
    return errors


# ---- the three job configs --------------------------------------------------------------------------


def job_from(tmp_path: Path, text: str | None, overrides: list[str] | None = None):
    if text is None:
        return load_job_config(TINY, overrides or [])
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return load_job_config(path, overrides or [])


CASES = {
    "tiny-cpu": (None, ["storage.uri=/srv/lorafleet"]),
    "llama3-8b-qlora-4gpu": (LLAMA_8B_QLORA, []),
    "llama3-70b-qlora-zero3": (LLAMA_70B_ZERO3, ["storage.uri=/srv/lorafleet"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_rayjob_and_raycluster_pass_the_crd_and_pod_schemas(tmp_path, case):
    text, overrides = CASES[case]
    job = job_from(tmp_path, text, overrides)
    options = ClusterOptions(image="registry.example/lorafleet:0.1.0", active_deadline_seconds=86400, backoff_limit=2)
    for body in (render_rayjob(job, f"{job.name}-20250101-000000", options), render_raycluster(job, options)):
        assert all_errors(body) == [], f"{case} {body['kind']}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_cluster_selector_rayjob_passes_the_crd_schema(tmp_path, case):
    text, overrides = CASES[case]
    job = job_from(tmp_path, text, overrides)
    body = render_rayjob(job, "run-1", ClusterOptions(cluster="lorafleet"))
    assert all_errors(body) == []
    assert body["spec"]["clusterSelector"] == {"ray.io/cluster": "lorafleet"}
    assert "rayClusterSpec" not in body["spec"] and body["spec"]["shutdownAfterJobFinishes"] is False


def test_strict_schema_catches_a_misspelt_field(tmp_path):
    body = render_rayjob(job_from(tmp_path, None, CASES["tiny-cpu"][1]), "run-1", ClusterOptions())
    body["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    body["spec"]["shutdownAfterJobFinish"] = True
    errors = crd_errors(body)
    assert any("rayStartParam" in e for e in errors) and any("shutdownAfterJobFinish" in e for e in errors)
    worker = body["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
    worker["spec"]["containers"][0]["resource"] = {}
    assert pod_errors(worker, "w") and "resource" in pod_errors(worker, "w")[0]


def test_gpu_job_gets_gpus_tolerations_selectors_and_sizes(tmp_path):
    job = job_from(tmp_path, LLAMA_8B_QLORA)
    options = ClusterOptions(gpu_node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"})
    spec = render_rayjob(job, "llama-1", options)["spec"]
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["groupName"] == "gpu-workers"
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    pod = group["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1}
    assert resources["requests"] == {"cpu": "8", "memory": "32Gi"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head runs drivers, not training
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "tolerations" not in head["template"]["spec"]


def test_zero3_worker_memory_follows_ray_memory_resource(tmp_path):
    job = job_from(tmp_path, LLAMA_70B_ZERO3, CASES["llama3-70b-qlora-zero3"][1])
    (group,) = render_raycluster(job, ClusterOptions())["spec"]["workerGroupSpecs"]
    assert group["replicas"] == 8
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "131072Mi"
    override = render_raycluster(job, ClusterOptions(worker_memory="200Gi"))["spec"]["workerGroupSpecs"][0]
    assert override["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "200Gi"


def test_cpu_job_has_no_gpu_scheduling_and_every_pod_mounts_the_claim(tmp_path):
    job = job_from(tmp_path, None, ["storage.uri=/srv/lorafleet"])
    spec = render_rayjob(job, "tiny-1", ClusterOptions(pvc="shared", mount_path="/data/lf"))["spec"]
    cluster = spec["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        pod = template["spec"]
        assert {"name": "storage", "persistentVolumeClaim": {"claimName": "shared"}} in pod["volumes"]
        assert {"name": "storage", "mountPath": "/data/lf"} in pod["containers"][0]["volumeMounts"]
    worker = cluster["workerGroupSpecs"][0]
    assert worker["groupName"] == "cpu-workers" and worker["replicas"] == 2
    assert "tolerations" not in worker["template"]["spec"]
    assert "nvidia.com/gpu" not in worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["HF_HOME"] == "/data/lf/cache/huggingface"


def test_custom_ray_resources_and_toleration_flags(tmp_path):
    from lorafleet.cluster_options import Toleration

    job = job_from(tmp_path, LLAMA_8B_QLORA, ["distributed.resources_per_worker={CPU: 8, GPU: 1, a100: 1}"])
    (group,) = render_raycluster(job, ClusterOptions())["spec"]["workerGroupSpecs"]
    assert group["rayStartParams"] == {"resources": '"{\\"a100\\": 1.0}"'}  # KubeRay passes it to a shell
    assert Toleration.parse("nvidia.com/gpu:NoSchedule").model_dump(exclude_none=True) == {
        "key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"
    }  # fmt: skip
    assert Toleration.parse("pool=gpu:NoExecute").model_dump(exclude_none=True) == {
        "key": "pool", "operator": "Equal", "value": "gpu", "effect": "NoExecute"
    }  # fmt: skip
    rendered = run_cli(
        "render", "raycluster", "configs/tiny.yaml", "--set", "storage.uri=/srv/lf",
        "--set", "distributed.use_gpu=true", "--toleration", "pool=gpu:NoSchedule",
        "--gpu-node-selector", "pool=gpu", "--node-selector", "zone=a",
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    pod = yaml.safe_load(rendered.stdout)["spec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert pod["tolerations"] == [{"key": "pool", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"zone": "a", "pool": "gpu"}


def test_rayjob_fields_names_and_labels(tmp_path):
    job = job_from(tmp_path, None, ["storage.uri=/srv/lorafleet"])
    options = ClusterOptions(ttl_seconds_after_finished=600, active_deadline_seconds=7200, backoff_limit=3)
    body = render_rayjob(job, "tiny-20250101-120000", options)
    spec = body["spec"]
    assert body["apiVersion"] == "ray.io/v1" and body["kind"] == "RayJob"
    assert body["metadata"]["name"] == "tiny-20250101-120000" and body["metadata"]["namespace"] == "lorafleet"
    assert body["metadata"]["labels"]["lorafleet.io/run-id"] == "tiny-20250101-120000"
    assert spec["submissionMode"] == "K8sJobMode" and spec["shutdownAfterJobFinishes"] is True
    assert (spec["ttlSecondsAfterFinished"], spec["activeDeadlineSeconds"], spec["backoffLimit"]) == (600, 7200, 3)
    assert isinstance(spec["runtimeEnvYAML"], str)
    assert (
        "lorafleet train /tmp/lorafleet/tiny-20250101-120000.yaml --run-id tiny-20250101-120000" in spec["entrypoint"]
    )
    # KubeRay: RayJob names are DNS-1035 labels of at most 47 characters
    long_name = k8s_name("9" + "x" * 80 + ".run_1", 47)
    assert len(long_name) <= 47 and long_name[0].isalpha() and long_name == k8s_name("9" + "x" * 80 + ".run_1", 47)


FAKE_RAY_JOB_SUBMIT = """
import shlex, subprocess, sys
entrypoint = sys.argv[sys.argv.index("--") + 1 :]
sys.exit(subprocess.call(shlex.join(entrypoint), shell=True))  # what `ray job submit` + the job manager do
"""


def test_entrypoint_carries_the_resolved_config_through_both_shells(tmp_path):
    """KubeRay's submitter splices the entrypoint into a bash line, `ray job submit` re-joins the words
    with shlex, and Ray runs the result with a shell: the config must come out byte for byte."""
    job = job_from(tmp_path, None, ["storage.uri=/srv/lorafleet", "training.max_steps=7"])
    spec = render_rayjob(job, "tiny-7", ClusterOptions())["spec"]
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "lorafleet").write_text(f'#!/bin/sh\ncp "$2" {tmp_path}/received.yaml\necho "$@" > {tmp_path}/args\n')
    (fake_bin / "lorafleet").chmod(0o755)
    (fake_bin / "ray").write_text(f"#!{sys.executable}\n{FAKE_RAY_JOB_SUBMIT}")
    (fake_bin / "ray").chmod(0o755)
    submitter = f"ray job submit --address http://head:8265 -- {spec['entrypoint']}"
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", submitter], check=True, env=env, cwd=tmp_path)
    received = yaml.safe_load((tmp_path / "received.yaml").read_text())
    assert received["training"]["max_steps"] == 7
    assert received["storage"]["uri"] == "/mnt/lorafleet"  # rewritten onto the claim's mount
    assert received == {**job.model_dump(mode="json"), "storage": {"uri": "/mnt/lorafleet"}}
    assert shlex.split((tmp_path / "args").read_text()) == [
        "train", "/tmp/lorafleet/tiny-7.yaml", "--run-id", "tiny-7", "--address", "auto"
    ]  # fmt: skip


def test_local_paths_are_moved_onto_the_mount_or_rejected(tmp_path):
    storage = tmp_path / "storage"
    (storage / "data").mkdir(parents=True)
    (storage / "data" / "train.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text('{"instruction": "a", "output": "b"}\n')
    inside = job_from(tmp_path, None, [f"storage.uri={storage}", f"data.train={storage}/data/train.jsonl"])
    entrypoint = render_rayjob(inside, "r1", ClusterOptions())["spec"]["entrypoint"]
    assert _config_in(entrypoint)["data"]["train"] == "/mnt/lorafleet/data/train.jsonl"
    bad = job_from(tmp_path, None, [f"storage.uri={storage}", f"data.train={outside}"])
    with pytest.raises(ConfigError, match=r"data.train: .*elsewhere.jsonl is a local path the cluster cannot see"):
        render_rayjob(bad, "r1", ClusterOptions())
    with pytest.raises(ConfigError, match="is a local path: give --pvc NAME or use s3://"):
        render_rayjob(inside, "r1", ClusterOptions(pvc=None))


def _config_in(entrypoint: str) -> dict[str, Any]:
    import base64
    import re

    encoded = re.search(r"printf %s (\S+) \| base64 -d", entrypoint).group(1)
    return yaml.safe_load(base64.b64decode(encoded))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"submission_mode": "InteractiveMode", "backoff_limit": 1}, "InteractiveMode"),
        ({"cluster": "c", "submission_mode": "SidecarMode"}, "SidecarMode"),
        ({"submission_mode": "BatchMode"}, "submission_mode"),
        ({"shutdown_after_job_finishes": False, "ttl_seconds_after_finished": 60}, "shutdown_after_job_finishes"),
        ({"active_deadline_seconds": 0}, "active_deadline_seconds"),
        ({"mount_path": "relative"}, "absolute"),
        ({"worker_memory": "lots"}, "worker_memory"),
        ({"pvc": "Not_A_Name"}, "not a valid Kubernetes name"),
    ],
)
def test_cluster_options_reject_what_kuberay_would_reject(options, message):
    from lorafleet.cluster_options import load_cluster_options

    with pytest.raises(ConfigError, match=message):
        load_cluster_options(options)


# ---- the CLI ----------------------------------------------------------------------------------------


def test_render_rayjob_cli_prints_yaml_and_dry_run_prints_the_same():
    args = ["configs/tiny.yaml", "--set", "storage.uri=/srv/lorafleet", "--run-id", "tiny-cli-1", "--image", "x/lf:1"]
    rendered = run_cli("render", "rayjob", *args, "--namespace", "ml", "--pvc", "shared", "--ttl", "60")
    assert rendered.returncode == 0, rendered.stderr
    body = yaml.safe_load(rendered.stdout)
    assert body["kind"] == "RayJob" and body["metadata"]["namespace"] == "ml"
    assert all_errors(body) == []
    dry = run_cli("submit", *args, "--namespace", "ml", "--pvc", "shared", "--ttl", "60", "--k8s", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout == rendered.stdout


def test_render_raycluster_cli_and_cluster_selector():
    rendered = run_cli("render", "raycluster", "configs/tiny.yaml", "--set", "storage.uri=/srv/lorafleet")
    assert rendered.returncode == 0, rendered.stderr
    body = yaml.safe_load(rendered.stdout)
    assert body["kind"] == "RayCluster" and body["metadata"]["name"] == "tiny" and all_errors(body) == []
    selected = run_cli("render", "rayjob", "configs/tiny.yaml", "--cluster", "lorafleet", "--run-id", "t-1")
    assert selected.returncode == 0, selected.stderr
    assert yaml.safe_load(selected.stdout)["spec"]["clusterSelector"] == {"ray.io/cluster": "lorafleet"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "distributed.num_workers=0"], "distributed.num_workers"),
        (["--set", "distributed.resources_per_worker={CPU: 1, GPU: 1}"], "needs use_gpu: true"),
        (["--set", "storage.uri=/srv/lf", "--no-pvc"], "is a local path: give --pvc NAME"),
        (["--set", "distributed.use_gpu=true", "--set", "distributed.resources_per_worker={GPU: 0.5}"], "whole GPUs"),
        (["--submission-mode", "Batch"], "submission_mode"),
        (["--node-selector", "novalue"], "expected key=value"),
    ],
)
def test_render_rejects_invalid_configs_with_a_clear_message(args, message):
    result = run_cli("render", "rayjob", "configs/tiny.yaml", *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


# ---- k8s/ -------------------------------------------------------------------------------------------


def _manifests(folder: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _validate_manifest(doc: dict[str, Any]) -> list[str]:
    if doc["apiVersion"].startswith("ray.io/"):
        return all_errors(doc)
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{doc['kind']}: {'.'.join(map(str, exc.absolute_path))}: {exc.message}"]
    return []


def test_k8s_base_manifests_are_valid():
    docs = _manifests(REPO / "k8s" / "base")
    kinds = sorted(doc["kind"] for doc in docs)
    assert kinds == sorted(
        ["Namespace", "PersistentVolumeClaim", "RayCluster", "Role", "RoleBinding", "ServiceAccount"]
    )
    for doc in docs:
        assert _validate_manifest(doc) == [], doc["kind"]
    (pvc,) = [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    (role,) = [d for d in docs if d["kind"] == "Role"]
    ray_rule = next(rule for rule in role["rules"] if "ray.io" in rule["apiGroups"])
    assert {"rayjobs", "rayclusters"} <= set(ray_rule["resources"]) and "create" in ray_rule["verbs"]
    assert any("pods/log" in rule["resources"] for rule in role["rules"])
    kustomization = yaml.safe_load((REPO / "k8s" / "base" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in (REPO / "k8s" / "base").glob("*.yaml") if p.name != "kustomization.yaml"
    )


KUBECTL = REPO / ".venv" / "bin" / "kubectl"


@pytest.mark.parametrize("overlay", ["cpu-dev", "gpu"])
def test_kustomize_overlays_render_valid_objects(overlay):
    if not KUBECTL.exists():
        pytest.fail(f"{KUBECTL} is missing: `make setup` extracts kubectl into .venv/bin", pytrace=False)
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(REPO / "k8s" / "overlays" / overlay)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for doc in docs:
        assert doc["metadata"].get("namespace", "lorafleet") == "lorafleet" or doc["kind"] == "Namespace"
        assert _validate_manifest(doc) == [], doc["kind"]
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    if overlay == "gpu":
        assert limits["nvidia.com/gpu"] == 1 and workers["replicas"] == 4
    else:
        assert "nvidia.com/gpu" not in limits and "tolerations" not in workers["template"]["spec"]


GENERATED_MANIFESTS = ["k8s/base/raycluster.yaml", "k8s/overlays/cpu-dev/raycluster-cpu.yaml"]


@pytest.mark.parametrize("manifest", GENERATED_MANIFESTS)
def test_generated_k8s_manifests_are_what_render_prints(manifest: str) -> None:
    """Each names, in its header, the `lorafleet render` command that writes it; running it gives the same objects."""
    path = REPO / manifest
    lines = path.read_text().splitlines()
    command = next(line.removeprefix("#").strip() for line in lines if "lorafleet render" in line)
    argv = shlex.split(command)
    assert argv[:3] == ["lorafleet", "render", "raycluster"], command
    result = run_cli(*argv[1:])
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == yaml.safe_load(path.read_text()), f"regenerate {manifest}: {command}"


def test_ray_pods_run_as_non_root_without_the_submitters_account() -> None:
    docs = _manifests(REPO / "k8s" / "base")
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    groups = [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
    for group in groups:
        spec = group["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == 1000
        assert "serviceAccountName" not in spec and spec["automountServiceAccountToken"] is False
        (container,) = spec["containers"]
        assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    chart = yaml.safe_load((REPO / "helm" / "lorafleet-serving" / "values.yaml").read_text())
    assert chart["podSecurityContext"] == groups[0]["template"]["spec"]["securityContext"]


def test_versions_are_written_in_one_place() -> None:
    """Ray and the lorafleet image: lorafleet.versions, and every file written by hand agrees with it."""
    from lorafleet.versions import DEFAULT_IMAGE, LORAFLEET_VERSION, RAY_VERSION

    assert f"ray=={RAY_VERSION}" in (REPO / "constraints.txt").read_text().splitlines()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert f'version = "{LORAFLEET_VERSION}"' in pyproject
    values = yaml.safe_load((REPO / "helm" / "lorafleet-serving" / "values.yaml").read_text())
    assert f"{values['lorafleetImage']['repository']}:{values['lorafleetImage']['tag']}" == DEFAULT_IMAGE
    assert f"docker build -t {DEFAULT_IMAGE} ." in (REPO / "Dockerfile").read_text()
    cluster = yaml.safe_load((REPO / "k8s" / "base" / "raycluster.yaml").read_text())
    assert cluster["spec"]["rayVersion"] == RAY_VERSION
    images = {
        c["image"]
        for g in [cluster["spec"]["headGroupSpec"], *cluster["spec"]["workerGroupSpecs"]]
        for c in g["template"]["spec"]["containers"]
    }
    assert images == {DEFAULT_IMAGE}
