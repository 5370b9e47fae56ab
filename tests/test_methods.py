"""Every PEFT method x {fp32, bf16}: 5 steps of the tiny model on CPU lower the loss, and the exported adapter
reloads with plain PEFT and reproduces the trained model's logits. In-process (`build_hf_trainer`), no Ray.

Also: the method knobs are validated, and a target module that does not exist lists the real ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from lorafleet.config import JobConfig
from lorafleet.errors import LorafleetError

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def single_thread():
    """One intra-op thread, as each Ray CPU worker gets: on a busy 2-core machine more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_job(storage: Path, name: str = "tiny", **sections: dict[str, Any]) -> JobConfig:
    """The tiny random Llama on builtin:price, one CPU process; `sections` update the defaults key by key."""
    config: dict[str, Any] = {
        "name": name,
        "model": {"name_or_path": "builtin:tiny-llama"},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": "builtin:price", "max_rows": 48, "max_seq_len": 256, "val_split": 0},
        "training": {
            "max_steps": 5,
            "micro_batch_size": 2,
            "learning_rate": 3e-3,
            "lr_scheduler": "constant",
            "logging": [],
        },
        "distributed": {"num_workers": 1},
        "storage": {"uri": str(storage)},
    }
    for section, values in sections.items():
        config[section] = {**config[section], **values} if section != "adapter" else values
    return JobConfig.model_validate(config)


def train_in_process(job: JobConfig, workdir: Path, *, callbacks: tuple = ()):
    """(trainer, data) from the worker's own `build_hf_trainer`: run folder `workdir/run`, HF output `workdir/out`."""
    from lorafleet.training.worker import build_hf_trainer

    return build_hf_trainer(
        job,
        run_id=job.name,
        run_dir=str(workdir / "run"),
        device=CPU,
        output_dir=str(workdir / "out"),
        callbacks=list(callbacks),
    )


def export_final_adapter(workdir: Path, job: JobConfig) -> Path:
    """The last HF checkpoint, copied out exactly as the launcher copies it out of a Ray checkpoint."""
    from ray.train import Checkpoint

    from lorafleet.training.launcher import copy_adapter_out_of_checkpoint

    checkpoints = sorted((workdir / "out").glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    target = workdir / "adapter"
    copy_adapter_out_of_checkpoint(
        Checkpoint.from_directory(str(checkpoints[-1])), str(target), base_model=job.model.name_or_path
    )
    return target


# method, adapter settings, learning rate (prompt-learning methods and IA3 want a higher one), PEFT type
METHODS = [
    ("lora", {"r": 8, "alpha": 16, "dropout": 0.0}, 3e-3, "LORA"),
    ("dora", {"r": 8, "alpha": 16, "dropout": 0.0}, 3e-3, "LORA"),
    ("ia3", {}, 0.1, "IA3"),
    ("prefix_tuning", {"num_virtual_tokens": 8}, 0.05, "PREFIX_TUNING"),
    ("p_tuning", {"num_virtual_tokens": 8}, 0.01, "P_TUNING"),
    ("prompt_tuning", {"num_virtual_tokens": 8}, 0.1, "PROMPT_TUNING"),
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(("method", "knobs", "learning_rate", "peft_type"), METHODS, ids=[m[0] for m in METHODS])
def test_method_trains_and_its_adapter_reloads_with_plain_peft(
    tmp_path: Path, tiny_model_dir: str, method: str, knobs: dict, learning_rate: float, peft_type: str, precision: str
) -> None:
    from peft import PeftModel
    from torch.utils.data import Subset
    from transformers import AutoModelForCausalLM

    from lorafleet.training.data import Collator

    job = tiny_job(
        tmp_path,
        name=f"m-{method.replace('_', '-')}",
        adapter={"method": method, **knobs},
        training={"learning_rate": learning_rate, "precision": precision},
    )
    trainer, data = train_in_process(job, tmp_path)
    probe = Subset(data.train, range(8))
    before = trainer.evaluate(probe)
    trainer.train()
    after = trainer.evaluate(probe)
    assert after["eval_loss"] < before["eval_loss"], (before, after)
    assert after["eval_perplexity"] == pytest.approx(torch.tensor(after["eval_loss"]).exp().item(), rel=1e-6)

    adapter_dir = export_final_adapter(tmp_path, job)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == peft_type
    assert adapter_config.get("use_dora", False) == (method == "dora")
    assert adapter_config["base_model_name_or_path"] == "builtin:tiny-llama"

    batch = Collator(trainer.processing_class.pad_token_id)([data.train[0], data.train[1]])
    batch = {key: value for key, value in batch.items() if key != "labels"}
    # fp32 master weights, compared without Accelerate's mixed-precision autocast wrapper, on a base in the dtype
    # training held it in (bf16 under bf16 mixed precision: the frozen base; fp32 otherwise)
    trained = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False).eval()
    base_dtype = {p.dtype for p in trained.parameters() if not p.requires_grad}
    assert base_dtype == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert {p.dtype for p in trained.parameters() if p.requires_grad} == {torch.float32}
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=base_dtype.pop())
    reloaded = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        difference = (trained(**batch).logits.float() - reloaded(**batch).logits.float()).abs().max().item()
    assert difference < 1e-4, difference


def test_missing_target_module_lists_the_real_ones(tmp_path: Path, tiny_model_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    from lorafleet.training.adapters import apply_adapter

    job = tiny_job(tmp_path, adapter={"method": "lora", "target_modules": ["q_proj", "qkv_proj"]})
    with pytest.raises(LorafleetError) as error:
        apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), job.adapter)
    message = str(error.value)
    assert "adapter.target_modules: qkv_proj not found" in message
    for real in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert real in message
    assert "lm_head" not in message


def test_target_module_list_and_method_knobs_reach_the_peft_config(tmp_path: Path, tiny_model_dir: str) -> None:
    from transformers import AutoModelForCausalLM

    from lorafleet.training.adapters import PEFT_CONFIG_BUILDERS

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = tiny_job(tmp_path, adapter={"method": "lora", "target_modules": ["q_proj", "v_proj"], "use_rslora": True})
    config = PEFT_CONFIG_BUILDERS["lora"](lora.adapter, base)
    assert set(config.target_modules) == {"q_proj", "v_proj"} and config.use_rslora
    ia3 = tiny_job(tmp_path, adapter={"method": "ia3"})
    config = PEFT_CONFIG_BUILDERS["ia3"](ia3.adapter, base)
    assert set(config.feedforward_modules) == {"down_proj"} <= set(config.target_modules)
    p_tuning = tiny_job(tmp_path, adapter={"method": "p_tuning", "encoder_hidden_size": 32})
    assert PEFT_CONFIG_BUILDERS["p_tuning"](p_tuning.adapter, base).encoder_hidden_size == 32
    prompt = tiny_job(tmp_path, adapter={"method": "prompt_tuning", "prompt_init_text": "Estimate the price:"})
    config = PEFT_CONFIG_BUILDERS["prompt_tuning"](prompt.adapter, base)
    assert config.prompt_tuning_init == "TEXT" and config.tokenizer_name_or_path == tiny_model_dir


# adapter section, text expected in the validation error (as `lorafleet validate` prints it)
BAD_KNOBS = [
    (
        {"method": "prefix_tuning", "use_rslora": True},
        "adapter.use_rslora: use_rslora does not apply to method: "
        "prefix_tuning (it is a knob of lora, dora; prefix_tuning takes num_virtual_tokens)",
    ),
    (
        {"method": "lora", "encoder_hidden_size": 64},
        "encoder_hidden_size does not apply to method: lora (it is a knob of p_tuning;",
    ),
    ({"method": "p_tuning", "prompt_init_text": "hi"}, "prompt_init_text does not apply to method: p_tuning"),
    ({"method": "prompt_tuning", "prompt_init_text": "  "}, "must not be blank"),
    ({"method": "prompt_tuning", "target_modules": ["q_proj"]}, "target_modules does not apply to method: prompt"),
    ({"method": "prompt_tuning", "r": 64}, "adapter.r: r does not apply to method: prompt_tuning"),
    ({"method": "lora", "num_virtual_tokens": 8}, "num_virtual_tokens does not apply to method: lora"),
    ({"method": "lora", "rank": 8}, "adapter.rank: unknown key (check the spelling; method: lora takes r, alpha"),
    ({"method": "lora", "target_modules": []}, "must name at least one module"),
    ({"method": "lora", "r": 0}, "greater than 0"),
    ({"method": "lora", "dropout": 1.0}, "less than 1"),
    ({"method": "prefix_tuning", "num_virtual_tokens": 0}, "greater than 0"),
    ({"method": "adalora"}, "adapter: method must be one of lora, dora, ia3, prefix_tuning, p_tuning, prompt_tuning"),
]


@pytest.mark.parametrize(("adapter", "expected"), BAD_KNOBS, ids=[str(case[0]) for case in BAD_KNOBS])
def test_method_knobs_are_validated(tmp_path: Path, adapter: dict, expected: str) -> None:
    import yaml

    from lorafleet.config import load_job_config
    from lorafleet.errors import ConfigError

    job = tiny_job(tmp_path).model_dump(mode="json") | {"adapter": adapter}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    with pytest.raises(ConfigError) as caught:
        load_job_config(path)
    assert expected in str(caught.value), str(caught.value)
    assert f"{path}:" in str(caught.value)  # the file:line of the adapter section


def test_a_section_without_method_is_lora(tmp_path: Path) -> None:
    job = tiny_job(tmp_path, adapter={"r": 4})
    assert (job.adapter.method, job.adapter.r, job.adapter.alpha) == ("lora", 4, 16)
    assert tiny_job(tmp_path, adapter={"method": "dora"}).adapter.r == 8


def test_top_layers_adapts_only_the_last_layers_and_backward_stops_below_them(
    tmp_path: Path, tiny_model_dir: str
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorafleet.training.adapters import apply_adapter

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    layers = base.config.num_hidden_layers
    assert layers >= 2
    job = tiny_job(tmp_path, adapter={"method": "lora", "r": 4, "top_layers": 1})
    model = apply_adapter(base, job.adapter)
    adapted = {name.split(".layers.")[1].split(".")[0] for name, _ in model.named_parameters() if "lora_A" in name}
    assert adapted == {str(layers - 1)}, adapted
    seen = {}
    decoder_layers = model.get_base_model().model.layers
    decoder_layers[0].register_forward_hook(lambda module, args, output: seen.update(first=output))
    decoder_layers[-1].register_forward_hook(lambda module, args, output: seen.update(last=output))
    model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.sum().backward()
    first, last = (seen[key][0] if isinstance(seen[key], tuple) else seen[key] for key in ("first", "last"))
    assert not first.requires_grad and last.requires_grad  # nothing below the adapted layer is differentiated
    model.save_pretrained(tmp_path / "top")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "top")
    assert reloaded.peft_config["default"].layers_to_transform == [layers - 1]

    too_many = tiny_job(tmp_path, adapter={"method": "lora", "top_layers": layers + 1})
    with pytest.raises(LorafleetError, match=f"adapter.top_layers: {layers + 1} is more than the model's {layers}"):
        apply_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), too_many.adapter)
