"""The shipped cluster examples say what their names promise, pass the checks a cluster submission runs before
any worker starts, and render into RayJobs that KubeRay accepts. (Every config in configs/ also goes through
`lorafleet validate` in test_config.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from lorafleet.config import load_job_config
from tests.helpers import CONFIGS, run_cli

# file: model, quantization, method, strategy, ZeRO stage, offload (optimizer, params), GPU workers
EXAMPLES = {
    "llama3-8b-qlora-4gpu.yaml": ("meta-llama/Llama-3.1-8B-Instruct", "4bit", "lora", "deepspeed", 2, (0, 0), 4),
    "llama3-70b-qlora-zero3.yaml": ("meta-llama/Llama-3.1-70B-Instruct", "4bit", "lora", "deepspeed", 3, (1, 1), 8),
    "qwen2.5-7b-dora.yaml": ("Qwen/Qwen2.5-7B-Instruct", "none", "dora", "ddp", None, None, 4),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_cluster_example_is_what_its_name_says(name: str) -> None:
    model, quantization, method, strategy, stage, offload, workers = EXAMPLES[name]
    job = load_job_config(CONFIGS / name)
    assert (job.model.name_or_path, job.model.quantization, job.adapter.method) == (model, quantization, method)
    assert job.distributed.strategy == strategy and job.distributed.use_gpu
    assert job.distributed.num_workers == workers and job.distributed.resources_per_worker["GPU"] == 1
    assert job.training.precision == "bf16" and job.distributed.max_failures > 0
    if quantization == "4bit":
        assert job.model.bnb_4bit_quant_type == "nf4" and job.model.bnb_4bit_compute_dtype == "bfloat16"
    if stage is not None:
        settings = job.distributed.deepspeed
        assert (settings.stage, (settings.offload_optimizer, settings.offload_params)) == (stage, offload)
    header = (CONFIGS / name).read_text().splitlines()[:3]
    assert any(f"lorafleet submit configs/{name}" in line for line in header), "the header gives the command"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_cluster_example_passes_the_checks_before_workers_start(name: str) -> None:
    from lorafleet.training.launcher import preflight
    from lorafleet.training.strategies import deepspeed_config, quantized_storage_dtype

    job = load_job_config(CONFIGS / name)
    preflight(job, embedded=False)  # what `--address`/submit checks on this machine: packages, strategy on CUDA
    if job.distributed.strategy == "deepspeed":
        config = deepspeed_config(job)
        expected = torch.bfloat16 if job.distributed.deepspeed.stage == 3 else None  # ZeRO-3 shards 4-bit as bf16
        assert quantized_storage_dtype(job, config) == expected


@pytest.mark.parametrize("name", sorted(name for name, example in EXAMPLES.items() if example[3] == "deepspeed"))
def test_cluster_example_deepspeed_config_is_what_deepspeed_accepts(tmp_path: Path, name: str) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig  # a dependency of lorafleet: never skipped

    from lorafleet.training.strategies import deepspeed_config
    from tests.test_strategies import finalized

    job = load_job_config(CONFIGS / name)
    # TrainingArguments refuse a GPU job on this CPU machine: its auto values are filled in by a CPU twin.
    cpu_twin = job.model_copy(update={"distributed": job.distributed.model_copy(update={"use_gpu": False})})
    parsed = DeepSpeedConfig(finalized(cpu_twin, tmp_path, deepspeed_config(job)))
    assert parsed.zero_optimization_stage == job.distributed.deepspeed.stage
    assert parsed.train_micro_batch_size_per_gpu == job.training.micro_batch_size


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_cluster_example_renders_a_rayjob_kuberay_accepts(name: str) -> None:
    from lorafleet.cluster_options import ClusterOptions
    from lorafleet.kuberay import render_rayjob
    from tests.test_kuberay import all_errors

    job = load_job_config(CONFIGS / name)
    body = render_rayjob(job, f"{job.name}-20250101-000000", ClusterOptions(image="registry.example/lorafleet:0.1.0"))
    assert all_errors(body) == []
    workers = body["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == job.distributed.num_workers


@pytest.mark.parametrize("storage", [None, "s3://lorafleet-runs/fleet"])
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_submit_k8s_dry_run_of_each_example_is_schema_valid_and_storage_honest(name: str, storage: str | None):
    """As shipped, storage is a ReadWriteMany PVC mounted at `storage.uri` in every pod; with s3:// the URI goes to
    the workers as it is. Either way the worker pods checkpoint on eviction (preStop hook, grace period)."""
    from tests.test_kuberay import all_errors

    job = load_job_config(CONFIGS / name)
    extra = ["--set", f"storage.uri={storage}"] if storage else []
    result = run_cli("submit", str(CONFIGS / name), "--k8s", "--dry-run", *extra)
    assert result.returncode == 0, result.stderr
    body = yaml.safe_load(result.stdout)
    assert body["kind"] == "RayJob" and all_errors(body) == []
    cluster = body["spec"]["rayClusterSpec"]
    workers = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert workers["terminationGracePeriodSeconds"] > job.distributed.sigterm_grace_s
    hook = workers["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:3] == ["python", "-m", "lorafleet.pod_stop"]
    assert body["metadata"]["annotations"]["lorafleet.io/storage"] == (storage or job.storage.uri)
    for group in (cluster["headGroupSpec"], cluster["workerGroupSpecs"][0]):
        pod = group["template"]["spec"]
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        mounts = {mount["name"]: mount["mountPath"] for mount in pod["containers"][0]["volumeMounts"]}
        if storage is None:  # the run folder every pod writes is on the shared claim
            assert claims and mounts["storage"] == job.storage.uri
    assert "lorafleet train" in body["spec"]["entrypoint"]
