"""The examples an evaluation runs on: the split (the run's holdout, its eval file, or the test set), rendered
exactly as in training, with the reference answer and the generation prompt of each."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.config import EvalSection, JobConfig
from lorafleet.training.data import encode_all, label_count, load_samples, split_holdout
from lorafleet.training.data_formats import Alpaca, Chat, Completion, Renderer, Sample, Text
from lorafleet.training.data_sources import DataSourceError
from lorafleet.training.evaluate_baselines import baseline_input

DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class EvalExample:
    index: int  # position in the split
    location: str  # file:line of its row
    shown_input: str  # what the report shows as the input (the user's text, not the whole template)
    input_ids: list[int]  # prompt + response, truncated to max_seq_len (the loss pass)
    labels: list[int]  # -100 outside the responses
    prompt_ids: list[int]  # the rendered text up to the last response (the generation pass)
    reference: str | None  # the last response; None for the text format (no prompt/answer split)
    baseline_input: str = ""  # what the classical baselines read (evaluate_baselines.baseline_input)


@dataclass(frozen=True)
class EvalData:
    split: str
    source: str
    rows: int  # rows in the split before max_examples
    examples: list[EvalExample]
    truncated: int
    dropped: int  # examples left without a response token after truncation

    @property
    def references(self) -> list[str] | None:
        if any(example.reference is None for example in self.examples):
            return None
        return [example.reference for example in self.examples]

    def digest(self) -> str:
        return examples_digest(self.examples)


def load_eval_data(job: JobConfig, settings: EvalSection, tokenizer: Any) -> EvalData:
    source, samples = split_samples(job, settings.split)
    selected = samples[: settings.max_examples] if settings.max_examples else samples
    renderer = Renderer(tokenizer)
    encoded = encode_all(selected, renderer, train_on_prompt=False, source=source)
    max_len = job.data.max_seq_len
    examples, truncated, dropped = [], 0, 0
    for index, (sample, (input_ids, labels)) in enumerate(zip(selected, encoded, strict=True)):
        if len(input_ids) > max_len:
            truncated += 1
            input_ids, labels = input_ids[:max_len], labels[:max_len]
        if not label_count(labels):
            dropped += 1
            continue
        rendered = renderer(sample.record)
        reference = reference_of(sample)
        prompt_ids: list[int] = []
        if reference is not None:
            prompt_ids = tokenizer(rendered.text[: rendered.spans[-1][0]], add_special_tokens=False)["input_ids"]
            prompt_ids = prompt_ids[-max_len:]  # keep the end: it holds the question and the generation prompt
        examples.append(
            EvalExample(
                index, sample.location, shown_input(sample), input_ids, labels, prompt_ids, reference,
                baseline_input(sample),
            )
        )  # fmt: skip
    if not examples:
        raise DataSourceError(f"{source}: no example left to evaluate ({dropped} without a response token)")
    return EvalData(settings.split, source, len(samples), examples, truncated, dropped)


def split_samples(job: JobConfig, split: str) -> tuple[str, list[Sample]]:
    """(description, samples) of the split: `val` is exactly what training held out; `test` the test file."""
    data = job.data
    if split == "test":
        reference = test_reference(data.train)
        return reference, load_samples(reference, data.format)
    if data.eval is not None:
        return data.eval, load_samples(data.eval, data.format, max_rows=data.max_rows)
    train = load_samples(data.train, data.format, max_rows=data.max_rows)
    _, held_out = split_holdout(train, data.val_split, job.training.seed, source=data.train)
    if not held_out:
        raise DataSourceError(
            f"{data.train}: the run held nothing out (data.val_split 0, no data.eval); use --split test"
        )
    return f"{data.train} (val_split {data.val_split} holdout, seed {job.training.seed})", held_out


def training_pairs(job: JobConfig) -> list[tuple[str, str]]:
    """(input, answer) of every row training used: the train file less the holdout, as training split it."""
    data = job.data
    train = load_samples(data.train, data.format, max_rows=data.max_rows)
    if data.eval is None:
        train, _ = split_holdout(train, data.val_split, job.training.seed, source=data.train)
    pairs = [(baseline_input(sample), reference_of(sample)) for sample in train]
    return [(text, answer) for text, answer in pairs if answer is not None]


def test_reference(train: str) -> str:
    """The test set beside a train set: `builtin:<task>/test`, or `test.<ext>` next to a local train file."""
    if train.startswith("builtin:"):
        return f"builtin:{train.removeprefix('builtin:').partition('/')[0]}/test"
    path = Path(train)
    if path.suffix in DATA_SUFFIXES and path.is_file():
        candidates = [path.with_name(path.name.replace("train", "test")), path.with_name(f"test{path.suffix}")]
        found = next((c for c in candidates if c != path and c.is_file()), None)
        if found is not None:
            return str(found)
    raise DataSourceError(
        f"--split test: no test set found beside data.train {train} (looked for builtin:<task>/test, or a "
        "test file next to a local train file); use --split val"
    )


def reference_of(sample: Sample) -> str | None:
    record = sample.record
    if isinstance(record, Alpaca):
        return record.output
    if isinstance(record, Chat):
        return next(m.content for m in reversed(record.messages) if m.role == "assistant")
    if isinstance(record, Completion):
        return record.completion
    return None


def shown_input(sample: Sample) -> str:
    record = sample.record
    if isinstance(record, Alpaca):
        return record.input if record.input.strip() else record.instruction
    if isinstance(record, Chat):
        last_answer = max(i for i, m in enumerate(record.messages) if m.role == "assistant")
        users = [m.content for m in record.messages[:last_answer] if m.role == "user"]
        return users[-1] if users else ""
    if isinstance(record, Completion):
        return record.prompt
    return record.text if isinstance(record, Text) else ""


def examples_digest(examples: list[EvalExample]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.index, example.input_ids, example.labels, example.prompt_ids]).encode())
    return digest.hexdigest()
