"""distributed.strategy: ddp, deepspeed (ZeRO 2/3, CPU offload, or a user's JSON), fsdp.

- DeepSpeed runs for real on CPU: one 2-worker Ray run with ZeRO-3 and optimizer + parameter offload (ZeRO-2
  runs in test_fault_tolerance.py, through a kill and a resume). Generated configs are also checked against
  DeepSpeed itself: the Trainer fills in the `auto` values and `deepspeed.runtime.config.DeepSpeedConfig`
  parses the result.
- FSDP needs GPUs (Accelerate enables it only on GPU-like devices): on CPU the config is refused before workers
  start, and the generated Accelerate settings are checked by constructing Accelerate's
  `FullyShardedDataParallelPlugin` from them.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from tests.helpers import CONFIGS, run_cli
from tests.test_methods import CPU, tiny_job


def ds_job(tmp_path: Path, **settings):
    return tiny_job(tmp_path, distributed={"strategy": "deepspeed", "deepspeed": settings})


def finalized(job, tmp_path: Path, config: dict) -> dict:
    """The DeepSpeed config as the HF Trainer hands it to DeepSpeed: every `auto` filled in from the job."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from lorafleet.training.worker import training_arguments

    args = training_arguments(job, str(tmp_path / "out"), has_eval=False, deepspeed=config)
    try:
        hf_config = args.hf_deepspeed_config
        hf_config.trainer_config_finalize(args, SimpleNamespace(config=SimpleNamespace(hidden_size=64)), 100)
        return hf_config.config
    finally:
        unset_hf_deepspeed_config()  # ZeRO-3 arguments register a process-wide hook on from_pretrained


GENERATED = [
    ({"stage": 2}, {}),
    ({"stage": 2, "offload_optimizer": True}, {"offload_optimizer": "cpu"}),
    ({"stage": 3}, {}),
    (
        {"stage": 3, "offload_optimizer": True, "offload_params": True},
        {"offload_optimizer": "cpu", "offload_param": "cpu"},
    ),
]


@pytest.mark.parametrize(("settings", "offloads"), GENERATED, ids=["zero2", "zero2-offload", "zero3", "zero3-offload"])
def test_generated_deepspeed_config_is_what_deepspeed_accepts(tmp_path: Path, settings: dict, offloads: dict) -> None:
    from deepspeed.runtime.config import DeepSpeedConfig

    from lorafleet.training.strategies import deepspeed_config

    job = ds_job(tmp_path, **settings)
    config = deepspeed_config(job)
    assert "auto" in json.dumps(config)  # the Trainer fills these from the job, so the two cannot disagree
    filled = finalized(job, tmp_path, config)
    assert "auto" not in json.dumps(filled)
    assert filled["train_micro_batch_size_per_gpu"] == job.training.micro_batch_size
    assert filled["gradient_clipping"] == job.training.max_grad_norm
    parsed = DeepSpeedConfig(filled)
    assert parsed.zero_optimization_stage == settings["stage"]
    for key, device in offloads.items():
        assert getattr(parsed.zero_config, key).device == device
    if settings.get("offload_optimizer"):
        assert filled["optimizer"]["type"] == "AdamW" and filled["optimizer"]["params"]["lr"] == 3e-3


def test_deepspeed_rejects_what_it_does_not_know(tmp_path: Path) -> None:
    """The check above has teeth: DeepSpeed's schema refuses a bad stage and an unknown ZeRO key."""
    from deepspeed.runtime.config import DeepSpeedConfig

    base = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1}
    with pytest.raises(Exception, match="stage"):
        DeepSpeedConfig(base | {"zero_optimization": {"stage": 7}})
    with pytest.raises(Exception, match="offload_everything"):
        DeepSpeedConfig(base | {"zero_optimization": {"stage": 2, "offload_everything": True}})


def test_a_user_deepspeed_file_is_used_as_is(tmp_path: Path) -> None:
    from lorafleet.training.strategies import deepspeed_config, quantized_storage_dtype, zero_stage

    user = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto", "steps_per_print": 5}
    (tmp_path / "ds.json").write_text(json.dumps(user))
    job = ds_job(tmp_path, config_file=str(tmp_path / "ds.json"))
    assert deepspeed_config(job) == user
    assert zero_stage(job) == 3
    qlora = tiny_job(
        tmp_path,
        model={"quantization": "4bit", "bnb_4bit_compute_dtype": "bfloat16"},
        distributed={"strategy": "deepspeed", "deepspeed": {"config_file": str(tmp_path / "ds.json")}},
    )
    assert quantized_storage_dtype(qlora) == torch.bfloat16  # ZeRO-3 shards 4-bit weights packed as bf16
    assert quantized_storage_dtype(tiny_job(tmp_path, model={"quantization": "4bit"})) is None


# distributed section, text expected in the validation error
BAD = [
    ({"strategy": "deepspeed", "deepspeed": {"stage": 2, "offload_params": True}}, "offload_params needs stage: 3"),
    ({"strategy": "deepspeed", "deepspeed": {"stage": 1}}, "Input should be 2 or 3"),
    ({"strategy": "deepspeed", "deepspeed": {"config_file": "/nope/ds.json"}}, "DeepSpeed config file not found"),
    ({"strategy": "ddp", "deepspeed": {"stage": 3}}, "distributed.deepspeed needs strategy: deepspeed"),
    ({"strategy": "ddp", "fsdp": {"sharding": "full_shard"}}, "distributed.fsdp needs strategy: fsdp"),
    ({"strategy": "fsdp"}, "strategy: fsdp needs use_gpu: true"),
]


@pytest.mark.parametrize(("distributed", "expected"), BAD, ids=[case[1][:30] for case in BAD])
def test_strategy_settings_are_validated(tmp_path: Path, distributed: dict, expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        tiny_job(tmp_path, distributed=distributed)


def test_deepspeed_config_file_conflicts_and_bad_json_are_refused(tmp_path: Path) -> None:
    (tmp_path / "ds.json").write_text("{not json")
    with pytest.raises(ValidationError, match="not valid JSON"):
        ds_job(tmp_path, config_file=str(tmp_path / "ds.json"))
    (tmp_path / "ds.json").write_text("{}")
    with pytest.raises(ValidationError, match="config_file and stage/offload"):
        ds_job(tmp_path, config_file=str(tmp_path / "ds.json"), stage=3)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed-zero3"])
def test_8bit_cannot_be_sharded(tmp_path: Path, strategy: str) -> None:
    distributed = (
        {"strategy": "fsdp", "use_gpu": True}
        if strategy == "fsdp"
        else {"strategy": "deepspeed", "deepspeed": {"stage": 3}}
    )
    with pytest.raises(ValidationError, match="8bit and strategy"):
        tiny_job(tmp_path, model={"quantization": "8bit"}, distributed=distributed)


def test_fsdp_on_cpu_is_refused_before_workers_start(tmp_path: Path) -> None:
    result = run_cli("train", str(CONFIGS / "tiny.yaml"), "--set", "distributed.strategy=fsdp", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "strategy: fsdp needs use_gpu: true" in result.stderr and "deepspeed" in result.stderr


def test_fsdp_job_that_lands_on_a_cpu_worker_is_refused(tmp_path: Path) -> None:
    from lorafleet.training.strategies import StrategyUnavailable
    from lorafleet.training.worker import build_hf_trainer

    job = tiny_job(tmp_path, distributed={"strategy": "fsdp", "use_gpu": True})
    with pytest.raises(StrategyUnavailable, match="fsdp needs CUDA workers"):
        build_hf_trainer(job, run_id="fsdp", run_dir=str(tmp_path / "run"), device=CPU)


def test_accelerate_silently_dropping_a_strategy_is_caught() -> None:
    from lorafleet.training.strategies import StrategyUnavailable, require_engine

    plain = SimpleNamespace(is_deepspeed_enabled=False, is_fsdp_enabled=False)
    for strategy in ("deepspeed", "fsdp"):
        with pytest.raises(StrategyUnavailable, match=f"{strategy} was requested but Accelerate did not enable it"):
            require_engine(plain, strategy)
    require_engine(plain, "ddp")


@pytest.mark.parametrize("fsdp", [{"sharding": "full_shard"}, {"sharding": "shard_grad_op", "offload_params": True}])
def test_generated_fsdp_settings_are_what_accelerate_accepts(tmp_path: Path, fsdp: dict) -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    from lorafleet.training.strategies import fsdp_config, strategy_arguments

    job = tiny_job(
        tmp_path,
        model={"gradient_checkpointing": True},
        distributed={"strategy": "fsdp", "use_gpu": True, "fsdp": fsdp},
    )
    assert strategy_arguments(job, None) == {"fsdp": True, "fsdp_config": fsdp_config(job)}
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", **strategy_arguments(job, None))
    plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is (fsdp["sharding"] == "full_shard")
    # FSDP2 expresses parameter offload by the policy's type: CPUOffloadPolicy offloads, the base class does not.
    from torch.distributed.fsdp import CPUOffloadPolicy

    assert isinstance(plugin.cpu_offload, CPUOffloadPolicy) is fsdp.get("offload_params", False)
    assert plugin.activation_checkpointing is True
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)


def test_a_missing_deepspeed_package_fails_before_ray_starts(tmp_path: Path, monkeypatch) -> None:
    from lorafleet.training import strategies
    from lorafleet.training.launcher import preflight

    monkeypatch.setattr(strategies, "deepspeed_installed", lambda: False)
    with pytest.raises(strategies.StrategyUnavailable, match="pip install 'deepspeed"):
        preflight(ds_job(tmp_path, stage=2), embedded=True)


@pytest.fixture(scope="module")
def zero3_offload_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    storage = tmp_path_factory.mktemp("zero3")
    result = run_cli(
        "train", str(CONFIGS / "tiny.yaml"), "--run-id", "zero3",
        "--set", f"storage.uri={storage}", "--set", "training.max_steps=8",
        "--set", "distributed.strategy=deepspeed", "--set", "distributed.deepspeed.stage=3",
        "--set", "distributed.deepspeed.offload_optimizer=true", "--set", "distributed.deepspeed.offload_params=true",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return storage / "runs" / "zero3"


@pytest.mark.slow
def test_zero3_with_cpu_offload_trains_on_two_cpu_workers(zero3_offload_run: Path, tiny_model_dir: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = zero3_offload_run
    config = json.loads((run_dir / "deepspeed.json").read_text())["zero_optimization"]
    assert config["stage"] == 3 and config["offload_param"]["device"] == "cpu"
    losses = [json.loads(line).get("loss") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [loss for loss in losses if loss is not None]
    assert len(losses) == 8 and losses[-1] < losses[0], losses
    # checkpoint_* folders only: Ray also keeps checkpoint_manager_snapshot.json there
    checkpoint = next(path for path in sorted((run_dir / "checkpoints").glob("checkpoint_*")) if path.is_dir())
    shards = sorted(path.name for path in checkpoint.rglob("*optim_states.pt"))
    assert len(shards) == 2, shards  # both workers' optimizer partitions reached storage

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    inputs = torch.tensor([[10, 20, 30, 40]])
    with torch.no_grad():
        base_logits = base(inputs).logits
        tuned_logits = PeftModel.from_pretrained(base, str(run_dir / "adapter"))(inputs).logits
    assert not torch.allclose(base_logits, tuned_logits), "the exported ZeRO-3 adapter is empty"
