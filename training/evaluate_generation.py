"""Where eval's answers come from: an `AnswerSource` gives k answers per prompt for the base or the fine-tune.

`lorafleet eval` answers through the CPU engine in this process (`lorafleet.cli.eval_answers`: continuous
batching, the k samples of a prompt share one prefill, the sampling code that serving uses). `PeftAnswers`,
here, is transformers' `generate` on the loaded models: the path for what the CPU engine does not serve
(IA3, a CUDA device, a quantized base). The base model's answers do not depend on the adapter, so they are
cached by (base model, examples, decoding): a second adapter on the same base, or a second demo, reuses them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from lorafleet.paths import home
from lorafleet.storage import write_bytes_atomic
from lorafleet.training.evaluate_sampling import Decoding

CACHE_VERSION = 1


class AnswerSource(Protocol):
    def answer(self, which: str, prompts: list[list[int]], decoding: Decoding) -> list[list[str]]:
        """`decoding.samples` answers per prompt, in order, for `which` ("base" or "finetuned")."""
        ...


class PeftAnswers:
    """transformers' `generate` on the models eval loaded; `models["finetuned"]` is set once the adapter is on."""

    def __init__(self, models: dict[str, Any], tokenizer: Any, batch_size: int, eos_ids: list[int]):
        self.models, self.tokenizer, self.batch_size, self.eos_ids = models, tokenizer, batch_size, eos_ids

    def answer(self, which: str, prompts: list[list[int]], decoding: Decoding) -> list[list[str]]:
        import torch
        from tqdm import tqdm
        from transformers import GenerationConfig

        model, pad = self.models[which], self.tokenizer.pad_token_id
        sampled = decoding.mode == "sampled"
        config = GenerationConfig(
            max_new_tokens=decoding.max_new_tokens, do_sample=sampled, num_beams=1, pad_token_id=pad,
            eos_token_id=self.eos_ids, num_return_sequences=decoding.samples,
            **({"temperature": decoding.temperature, "top_k": 0, "top_p": 1.0} if sampled else {}),
        )  # fmt: skip
        device = next(model.parameters()).device
        answers: dict[int, list[str]] = {}
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        if sampled:
            torch.manual_seed(decoding.seed)
        bar = tqdm(total=len(prompts), desc=f"generate {which} ({decoding.mode})", unit="ex", file=sys.stderr)
        with torch.no_grad(), bar:
            for chunk in batches(order, self.batch_size):
                rows = [prompts[i] for i in chunk]
                width = max(len(p) for p in rows)
                input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows], device=device)
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=device)
                output = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config)
                texts = [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in output[:, width:]]
                for position, i in enumerate(chunk):
                    answers[i] = texts[position * decoding.samples : (position + 1) * decoding.samples]
                bar.update(len(chunk))
        return [answers[i] for i in range(len(prompts))]


def cached_base_answers(
    identity: dict[str, Any], prompts: list[list[int]], decoding: Decoding, compute: Callable[[], list[list[str]]]
) -> tuple[list[list[str]], bool]:
    """(the base model's answers, whether they came from the cache): keyed by the base model's identity, the
    exact prompt token ids and the decoding; written atomically, checked for shape when read."""
    key = {"version": CACHE_VERSION, "model": identity, "decoding": decoding.key(),
           "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest()}  # fmt: skip
    path = cache_dir() / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]}.json"
    try:
        stored = json.loads(path.read_text())
        if stored.get("key") == key and _shaped(stored.get("answers"), len(prompts), decoding.samples):
            return stored["answers"], True
    except (OSError, ValueError):
        pass
    answers = compute()
    write_bytes_atomic(path, json.dumps({"key": key, "answers": answers}).encode())
    return answers, False


def _shaped(answers: Any, rows: int, samples: int) -> bool:
    if not isinstance(answers, list) or len(answers) != rows:
        return False
    return all(
        isinstance(row, list) and len(row) == samples and all(isinstance(a, str) for a in row) for row in answers
    )


def cache_dir() -> Path:
    return home() / "eval-answers"


def model_identity(folder: Path | str, revision: str | None, dtype: str) -> dict[str, Any]:
    """What names a base model's weights: its folder, and each weights file's size and modification time."""
    path = Path(folder)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    stamps = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    return {"folder": str(folder), "revision": revision, "dtype": dtype, "weights": stamps}


def batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
