"""`lorafleet export RUN --format gguf`: a merged GGUF read back by transformers' GGUF loader (a reader we did not
write), and its Ollama Modelfile.

Stated tolerances against the merged model in float32 (base + adapter by plain PEFT), tiny model, logits ~±1:
f16 largest logit gap below F16_MAX_GAP (measured 0.0003), q8_0 below Q8_MAX_GAP (measured ~0.01); greedy
answers equal token for token. The same writer on SmolLM2-135M (measured, not in CI): f16 gap 0.03 on logits
of ±30, and llama.cpp's llama-server answers the chat prompt as transformers does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import run_cli
from tests.test_merge import make_run

F16_MAX_GAP = 0.01
Q8_MAX_GAP = 0.05
PROMPTS = ["Hello there, how are you?", "The price of 12 apples is", "x"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("export-storage"), "lora")


@pytest.fixture(scope="module")
def merged(run_dir):
    """The run's adapter on its base in float32 (plain PEFT), and the base's tokenizer."""
    from peft import PeftModel

    from lorafleet.model_loading import load_base_model_weights, load_base_tokenizer

    base = load_base_model_weights("builtin:tiny-llama", dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval(), load_base_tokenizer("builtin:tiny-llama")


def exported(run_dir: Path, out: Path, outtype: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_cli("export", str(run_dir), "--format", "gguf", "--outtype", outtype, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"exported {run_dir}" in result.stdout and "template: chatml" in result.stdout
    model = AutoModelForCausalLM.from_pretrained(str(out.parent), gguf_file=out.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)


@pytest.mark.parametrize(("outtype", "tolerance"), [("f16", F16_MAX_GAP), ("q8_0", Q8_MAX_GAP)])
def test_gguf_round_trip_through_transformers(run_dir, merged, tmp_path, outtype, tolerance) -> None:
    reference, tokenizer = merged
    model, read_tokenizer = exported(run_dir, tmp_path / "price.gguf", outtype)
    assert read_tokenizer.chat_template == tokenizer.chat_template
    assert read_tokenizer.eos_token == tokenizer.eos_token and read_tokenizer.bos_token == tokenizer.bos_token
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            assert read_tokenizer(prompt)["input_ids"] == ids
            batch = torch.tensor([ids])
            gap = (model(batch).logits - reference(input_ids=batch).logits).abs().max().item()
            assert gap < tolerance, (prompt, gap)
            greedy = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
            ours = model.generate(batch, attention_mask=torch.ones_like(batch), **greedy)
            expected = reference.generate(input_ids=batch, attention_mask=torch.ones_like(batch), **greedy)
            assert ours.tolist() == expected.tolist(), prompt


def test_modelfile_names_the_file_and_the_template(run_dir, tmp_path) -> None:
    out = tmp_path / "models" / "price.gguf"
    result = run_cli("export", str(run_dir), "--format", "gguf", "--out", str(out))
    assert result.returncode == 0, result.stderr
    modelfile = (tmp_path / "models" / "price.Modelfile").read_text()
    assert "FROM ./price.gguf" in modelfile
    assert 'TEMPLATE """' in modelfile and "<|im_start|>{{ .Role }}" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert sorted(p.name for p in out.parent.iterdir()) == ["price.Modelfile", "price.gguf"], "no temporary left"


def test_export_refusals_leave_files_alone(run_dir, tmp_path) -> None:
    existing = tmp_path / "mine.gguf"
    existing.write_text("not ours")
    prefix_run = make_run(tmp_path / "storage", "prefix_tuning")
    cases = [
        ((str(run_dir), "--out", str(existing)), "already exists"),
        ((str(prefix_run), "--out", str(tmp_path / "prefix.gguf")), "prefix_tuning cannot be merged"),
        ((str(run_dir), "--out", str(tmp_path / "a.gguf"), "--outtype", "q4_k"), "--outtype q4_k"),
        ((str(run_dir), "--out", str(tmp_path / "b.gguf"), "--format", "onnx"), "--format onnx"),
    ]
    for args, message in cases:
        result = run_cli("export", *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert existing.read_text() == "not ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.gguf", "storage"]
