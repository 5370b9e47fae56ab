"""What `lorafleet quantize` and `lorafleet export` read: the model, and the calibration rows GPTQ sees.

MODEL is one of:
- `registry:NAME[@VER]`: a merged model published with `publish --merged` (its run, when still in storage,
  is the default calibration source);
- a run (id under <storage>/runs/, or its folder): its adapter merged into its base in float32, in memory;
- a model folder, a `builtin:` model or a hub id: taken as it is.
Calibration (`--calibration FILE|RUN`): a run's own training examples (rendered as in training), or a JSONL
file in one of the data formats (alpaca, chat, completion, text; `--calibration-format`, else detected).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.errors import LorafleetError
from lorafleet.quantization.methods import QuantizationError
from lorafleet.runs import FinishedRun, open_run

REGISTRY_PREFIX = "registry:"
FORMAT_KEYS = (("messages", "chat"), ("instruction", "alpaca"), ("prompt", "completion"), ("text", "text"))


@dataclass
class ModelSource:
    reference: str
    folder: str  # where the tokenizer and config come from (the base, for a run)
    run: FinishedRun | None = None  # the run whose adapter is merged in, or whose merge this is
    merge_run: bool = False
    facts: dict[str, Any] = field(default_factory=dict)  # recorded in lorafleet-quantization.json

    def load(self):
        """The model in float32 on the CPU (a run: its adapter merged into the base)."""
        import torch

        from lorafleet.model_loading import load_base_model_weights

        if self.merge_run:
            from lorafleet.training.merge import merge_checked
            from lorafleet.training.model import load_tokenizer

            probe = load_tokenizer(self.run.job.model)("Hello", return_tensors="pt")["input_ids"]
            merged, _ = merge_checked(self.run, "fp32", probe)
            return merged.eval()
        return load_base_model_weights(self.folder, dtype=torch.float32).eval()


def resolve_source(reference: str, storage: str | None) -> ModelSource:
    from lorafleet.models import is_builtin, resolve_model

    if reference.startswith(REGISTRY_PREFIX):
        source = _registry_source(reference, storage)
    elif is_builtin(reference) or (Path(reference).expanduser() / "config.json").is_file():
        source = ModelSource(reference, resolve_model(reference), facts={"base_model": reference})
    else:
        source = _run_or_hub(reference, storage)
    return source


def _registry_source(reference: str, storage: str | None) -> ModelSource:
    from lorafleet.registry import resolve

    found = resolve(storage, reference.removeprefix(REGISTRY_PREFIX), kind="models")
    run = _run_if_present(found.manifest.run_id, storage)
    facts = {"registry": f"{found.name}@{found.version}", "run_id": found.manifest.run_id}
    return ModelSource(reference, str(found.path), run=run, facts=facts)


def _run_or_hub(reference: str, storage: str | None) -> ModelSource:
    from lorafleet.models import resolve_model
    from lorafleet.training.merge import method_name, refuse_unmergeable

    try:
        run = open_run(reference, storage)
    except LorafleetError:
        if Path(reference).expanduser().exists() or reference.startswith((".", "/", "~")):
            raise
        return ModelSource(reference, resolve_model(reference), facts={"base_model": reference})  # a hub id
    adapter_config = run.adapter_config()
    refuse_unmergeable(run, adapter_config, method_name(adapter_config))  # MergeError: prefix tuning, ...
    folder = resolve_model(run.job.model.name_or_path)
    return ModelSource(reference, folder, run=run, merge_run=True, facts={"run_id": run.run_id})


def _run_if_present(run_id: str | None, storage: str | None) -> FinishedRun | None:
    if not run_id:
        return None
    try:
        return open_run(run_id, storage)
    except LorafleetError:
        return None


@dataclass(frozen=True)
class Calibration:
    source: str
    sequences: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(map(len, self.sequences))

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.sequences, separators=(",", ":")).encode()).hexdigest()

    def facts(self) -> dict[str, Any]:
        return {"source": self.source, "sequences": len(self.sequences), "tokens": self.tokens, "sha256": self.sha256()}


def calibration_data(
    given: str | None, source: ModelSource, tokenizer: Any, *, samples: int, max_len: int, fmt: str | None
) -> Calibration | None:
    """`samples` token sequences from `given` (a file or a run), else from the source's own run; None if neither."""
    if given and Path(given).expanduser().is_file():
        return _from_file(Path(given).expanduser(), tokenizer, samples, max_len, fmt)
    run = open_run(given, None) if given else source.run
    if run is None:
        return None
    from lorafleet.training.data import build_datasets

    data = build_datasets(run.job.data.model_copy(update={"packing": False}), tokenizer, run.job.training.seed)
    sequences = [example["input_ids"][:max_len] for example in list(data.train)[:samples]]
    return Calibration(f"run {run.run_id} (training rows)", sequences)


def _from_file(path: Path, tokenizer: Any, samples: int, max_len: int, fmt: str | None) -> Calibration:
    from lorafleet.training.data import encode_all, load_samples
    from lorafleet.training.data_formats import Renderer

    fmt = fmt or _detect_format(path)
    rows = load_samples(str(path), fmt, max_rows=samples)
    encoded = encode_all(rows, Renderer(tokenizer), train_on_prompt=True, source=str(path))
    return Calibration(f"{path} ({fmt})", [ids[:max_len] for ids, _ in encoded if ids])


def _detect_format(path: Path) -> str:
    with path.open() as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        keys = json.loads(first).keys() if first else ()
    except (json.JSONDecodeError, AttributeError):
        raise QuantizationError(f"{path}:1: not a JSON object; calibration files are JSONL") from None
    for key, fmt in FORMAT_KEYS:
        if key in keys:
            return fmt
    raise QuantizationError(f"{path}:1: cannot tell the data format; pass --calibration-format")
