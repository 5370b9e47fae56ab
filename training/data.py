"""The data pipeline: rows → validated records → rendered text → token ids with loss labels → datasets.

    data = build_datasets(job.data, tokenizer, seed=job.training.seed)   # the training worker
    lorafleet data check train.jsonl --format alpaca                     # check_file, from the CLI

Labels are -100 on prompt tokens (everything outside the assistant responses) unless `train_on_prompt`.
Span boundaries come from tokenizing the text up to each boundary and checking that it is a prefix of the
whole tokenization; where a token straddles a boundary, from the tokenizer's character offsets instead.
Examples are truncated to `max_seq_len`; those left without a single label token are dropped. Both are
counted in the stats. With `packing`, whole examples are bin-packed into sequences (see data_packing.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from lorafleet.config import DATA_FILE_SUFFIXES, DataSection
from lorafleet.errors import Problem
from lorafleet.training.data_formats import Rendered, Renderer, RenderError, Sample, parse_rows, raise_for_problems
from lorafleet.training.data_packing import IGNORE_INDEX, Collator, pack, packing_efficiency
from lorafleet.training.data_sources import DataSourceError, Row, load_rows, read_file

__all__ = [
    "Collator",
    "DataSummary",
    "Row",
    "TokenizedData",
    "build_datasets",
    "check_file",
    "load_rows",
    "load_samples",
]

Example = dict[str, list[int]]  # input_ids, labels (and position_ids once packed)


@dataclass(frozen=True)
class SplitStats:
    rows: int  # validated rows in this split
    examples: int  # rows left after dropping
    truncated: int  # examples cut to max_seq_len
    dropped: int  # examples without a label token (after truncation)
    tokens: int
    label_tokens: int  # tokens the loss is computed on
    sequences: int  # what the trainer iterates: examples, or packed sequences
    packing_efficiency: float | None  # tokens / (sequences * max_seq_len) when packed

    def __str__(self) -> str:
        share = self.label_tokens / self.tokens if self.tokens else 0.0
        text = (
            f"{self.rows} rows -> {self.examples} examples ({self.truncated} truncated, {self.dropped} dropped), "
            f"{self.tokens:,} tokens ({share:.1%} in labels)"
        )
        if self.packing_efficiency is not None:
            text += f", packed into {self.sequences} sequences ({self.packing_efficiency:.1%} full)"
        return text


@dataclass(frozen=True)
class DataStats:
    train: SplitStats
    eval: SplitStats | None
    data_hash: str = ""  # sha256 of the records trained and evaluated on (recorded in run.json and manifests)

    def __str__(self) -> str:
        return f"train: {self.train}" + (f"; eval: {self.eval}" if self.eval else "; no eval split")


class ExampleDataset(Dataset):
    """A list of tokenized examples (dicts of int lists), as the HF Trainer and `Collator` expect."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Example:
        return self.examples[index]


@dataclass(frozen=True)
class TokenizedData:
    train: ExampleDataset
    eval: ExampleDataset | None
    stats: DataStats

    def stats_dict(self) -> dict[str, Any]:
        return asdict(self.stats)


def build_datasets(data_cfg: DataSection, tokenizer: Any, seed: int) -> TokenizedData:
    """Train and eval datasets: the eval file if given, else a seeded `val_split` holdout of train (0: none).

    `max_rows` limits the train file and the eval file alike.
    """
    train = load_samples(data_cfg.train, data_cfg.format, max_rows=data_cfg.max_rows)
    if data_cfg.eval is not None:
        held_out = load_samples(data_cfg.eval, data_cfg.format, max_rows=data_cfg.max_rows)
    else:
        train, held_out = split_holdout(train, data_cfg.val_split, seed, source=data_cfg.train)
    renderer = Renderer(tokenizer)
    train_examples, train_stats = _prepare(train, renderer, data_cfg, source=data_cfg.train)
    if not train_examples:
        raise DataSourceError(
            f"{data_cfg.train}: no trainable examples ({train_stats}); raise data.max_seq_len or check the data"
        )
    eval_examples, eval_stats = (
        _prepare(held_out, renderer, data_cfg, source=data_cfg.eval or data_cfg.train) if held_out else ([], None)
    )
    return TokenizedData(
        train=ExampleDataset(train_examples),
        eval=ExampleDataset(eval_examples) if eval_examples else None,
        stats=DataStats(train_stats, eval_stats, data_hash=records_hash([*train, *held_out])),
    )


def check_rows_here(data_cfg: DataSection) -> None:
    """Validate the rows of every local data file this machine can read, before workers start.

    The same `DataError` (file:line, field) as `lorafleet data check`; references only the workers can read
    (hub datasets, paths that exist on the cluster only) and builtins (generated valid) are left to them, and so
    is tokenization.
    """
    for reference in (data_cfg.train, data_cfg.eval):
        if reference is None:
            continue
        local = Path(reference).expanduser()
        if reference.endswith(DATA_FILE_SUFFIXES) and local.is_file():
            load_samples(reference, data_cfg.format, max_rows=data_cfg.max_rows)


def records_hash(samples: list[Sample]) -> str:
    """Content hash of the records, independent of where they were read from (a file, the hub, a builtin)."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps(asdict(sample.record), sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()


def load_samples(reference: str, fmt: str, *, max_rows: int | None = None) -> list[Sample]:
    """Validated records of a data reference; a `DataError` naming every bad row otherwise."""
    return parse_rows(load_rows(reference, max_rows=max_rows), fmt, source=reference)


def split_holdout(samples: list[Sample], share: float, seed: int, *, source: str) -> tuple[list[Sample], list[Sample]]:
    """(train, eval): a seeded random `share` of the rows is held out; both keep the file's order."""
    if share == 0:
        return samples, []
    held = max(1, round(len(samples) * share))
    if held >= len(samples):
        raise DataSourceError(
            f"{source}: {len(samples)} row(s) are too few to hold out data.val_split={share}; "
            "add rows, set data.eval, or set data.val_split: 0"
        )
    chosen = set(random.Random(seed).sample(range(len(samples)), held))
    train = [sample for index, sample in enumerate(samples) if index not in chosen]
    return train, [sample for index, sample in enumerate(samples) if index in chosen]


def _prepare(
    samples: list[Sample], renderer: Renderer, data_cfg: DataSection, *, source: str
) -> tuple[list[Example], SplitStats]:
    examples: list[Example] = []
    truncated = 0
    for input_ids, labels in encode_all(samples, renderer, train_on_prompt=data_cfg.train_on_prompt, source=source):
        if len(input_ids) > data_cfg.max_seq_len:
            truncated += 1
            input_ids, labels = input_ids[: data_cfg.max_seq_len], labels[: data_cfg.max_seq_len]
        if label_count(labels):
            examples.append({"input_ids": input_ids, "labels": labels})
    tokens = sum(len(example["input_ids"]) for example in examples)
    sequences = pack(examples, data_cfg.max_seq_len) if data_cfg.packing else examples
    stats = SplitStats(
        rows=len(samples),
        examples=len(examples),
        truncated=truncated,
        dropped=len(samples) - len(examples),
        tokens=tokens,
        label_tokens=sum(label_count(example["labels"]) for example in examples),
        sequences=len(sequences),
        packing_efficiency=packing_efficiency(sequences, data_cfg.max_seq_len) if data_cfg.packing else None,
    )
    return sequences, stats


def label_count(labels: Sequence[int]) -> int:
    """Tokens the loss is computed on: a label at position 0 is never a target (nothing predicts it)."""
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX)


def encode_all(
    samples: list[Sample], renderer: Renderer, *, train_on_prompt: bool, source: str
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of every sample, untruncated; a `DataError` naming rows the template rejects."""
    encoded, problems = [], []
    for sample in samples:
        try:
            encoded.append(encode(renderer(sample.record), renderer.tokenizer, train_on_prompt=train_on_prompt))
        except RenderError as exc:
            problems.append(Problem(sample.location, str(exc)))
    raise_for_problems(source, problems)
    return encoded


def encode(rendered: Rendered, tokenizer: Any, *, train_on_prompt: bool) -> tuple[list[int], list[int]]:
    """Token ids of `rendered.text` and labels: the ids inside `rendered.spans`, -100 elsewhere."""
    encoding = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
    input_ids: list[int] = encoding["input_ids"]
    if train_on_prompt:
        return input_ids, list(input_ids)
    offsets = encoding.get("offset_mapping")
    labels = [IGNORE_INDEX] * len(input_ids)
    for start, end in rendered.spans:
        first = token_boundary(tokenizer, rendered.text, start, input_ids, offsets)
        last = token_boundary(tokenizer, rendered.text, end, input_ids, offsets)
        labels[first:last] = input_ids[first:last]
    return input_ids, labels


def token_boundary(
    tokenizer: Any, text: str, position: int, input_ids: list[int], offsets: list[tuple[int, int]] | None
) -> int:
    """The index of the first token of `input_ids` (the tokenization of `text`) at character `position`.

    Tokenizing text[:position] gives it when that is a prefix of the whole tokenization. When it is not (a
    merge spans the boundary), the first token ending after `position` starts the span; without offsets
    (slow tokenizers), the longest common prefix does.
    """
    if position >= len(text):
        return len(input_ids)
    prefix = tokenizer(text[:position], add_special_tokens=False)["input_ids"]
    if input_ids[: len(prefix)] == prefix:
        return len(prefix)
    if offsets is not None:
        return next((index for index, (_, end) in enumerate(offsets) if end > position), len(input_ids))
    common = (index for index, (a, b) in enumerate(zip(input_ids, prefix, strict=False)) if a != b)
    return next(common, min(len(input_ids), len(prefix)))


@dataclass(frozen=True)
class DataSummary:
    """What `lorafleet data check` prints: rows, token lengths, truncation and the label-token share."""

    source: str
    fmt: str
    model: str
    chat_template: bool
    rows: int
    lengths: list[int]  # tokens per example, sorted, untruncated
    max_seq_len: int
    label_tokens: int

    @property
    def truncated(self) -> int:
        return sum(1 for length in self.lengths if length > self.max_seq_len)

    def percentile(self, q: float) -> int:
        """Nearest-rank percentile of the token lengths (q in 0..100)."""
        if not self.lengths:
            return 0
        return self.lengths[min(len(self.lengths) - 1, max(0, math.ceil(q / 100 * len(self.lengths)) - 1))]

    def render(self) -> str:
        tokens = sum(self.lengths)
        prompt_style = "chat template" if self.chat_template else "plain prompt"
        share = self.label_tokens / tokens if tokens else 0.0
        truncated_share = self.truncated / self.rows if self.rows else 0.0
        return "\n".join(
            [
                f"{self.source}: {self.rows} rows, format {self.fmt}, all valid",
                f"tokenizer: {self.model} ({prompt_style})",
                f"tokens per example: p50 {self.percentile(50)}  p90 {self.percentile(90)}  "
                f"p99 {self.percentile(99)}  max {self.lengths[-1] if self.lengths else 0}",
                f"truncated at max_seq_len {self.max_seq_len}: {self.truncated} ({truncated_share:.1%})",
                f"label tokens: {self.label_tokens:,} of {tokens:,} ({share:.1%})",
            ]
        )


def check_file(path: Path, fmt: str, *, model_reference: str, max_seq_len: int) -> DataSummary:
    """Validate every row of a local file (a `DataError` naming each bad one) and measure it in tokens."""
    from lorafleet.model_loading import load_base_tokenizer

    samples = parse_rows(read_file(path), fmt, source=str(path))
    tokenizer = load_base_tokenizer(model_reference)
    renderer = Renderer(tokenizer)
    encoded = encode_all(samples, renderer, train_on_prompt=False, source=str(path))
    return DataSummary(
        source=str(path),
        fmt=fmt,
        model=model_reference,
        chat_template=renderer.uses_chat_template,
        rows=len(samples),
        lengths=sorted(len(input_ids) for input_ids, _ in encoded),
        max_seq_len=max_seq_len,
        label_tokens=sum(label_count(labels) for _, labels in encoded),
    )
