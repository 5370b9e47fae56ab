"""How eval reads answers: greedy, or k sampled answers per example aggregated into one.

    primary, beside = choose_decodings(settings, task)   # e.g. sampled k=16 (geometric mean), then greedy
    answer = aggregate_answers(["$120", "$95", "no idea"], "geometric_mean")   # -> "106.77"

Greedy decoding picks the most likely next token at each step, so a number's answer starts with its most likely
first digit whatever the rest of the distribution says. Sampling k answers and taking a robust centre of the
numbers (regression by decoding) reads the model's whole distribution; for labels, the most frequent answer
(self-consistency). The geometric mean suits positive quantities spread over orders of magnitude (prices): it
averages relative, not absolute, errors. Samples without a number are left out of the aggregate; an example
whose samples hold none is unparseable, and the metrics count it as such.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass

from lorafleet.config import EvalSection
from lorafleet.errors import ConfigError, Problem
from lorafleet.training.evaluate_metrics import first_line, parse_answer_number

NUMBER_AGGREGATES = ("median", "geometric_mean", "mean")
LABEL_AGGREGATES = ("majority",)
DEFAULT_AGGREGATE = {"numeric": "geometric_mean", "classification": "majority"}


@dataclass(frozen=True)
class Decoding:
    """One way of reading answers; `samples` answers per example (1 for greedy)."""

    mode: str  # greedy | sampled
    max_new_tokens: int
    samples: int = 1
    temperature: float = 0.0
    seed: int = 0
    aggregate: str | None = None

    @property
    def name(self) -> str:
        if self.mode == "greedy":
            return "greedy"
        return f"sampled (k={self.samples}, T={self.temperature:g}, {self.aggregate}, seed {self.seed})"

    def key(self) -> dict:
        """What decides the answers (for caches); the aggregate is applied afterwards, so it is not part of it."""
        return {"mode": self.mode, "max_new_tokens": self.max_new_tokens, "samples": self.samples,
                "temperature": self.temperature, "seed": self.seed}  # fmt: skip


def choose_decodings(settings: EvalSection, task: str | None) -> list[Decoding]:
    """The decodings eval runs: the one its verdict reads first, then greedy beside a sampled one ([] without a
    task: nothing is generated)."""
    if task is None:
        return []
    greedy = Decoding("greedy", settings.max_new_tokens)
    mode = settings.decoding
    if mode == "auto":
        mode = "sampled" if task == "numeric" else "greedy"
    if mode == "greedy":
        return [greedy]
    if task not in DEFAULT_AGGREGATE:
        why = f"sampled decoding needs a numeric or classification task to aggregate; this one is {task}"
        raise ConfigError("eval settings", [Problem("eval.decoding", why)])
    aggregate = DEFAULT_AGGREGATE[task] if settings.aggregate == "auto" else settings.aggregate
    allowed = NUMBER_AGGREGATES if task == "numeric" else LABEL_AGGREGATES
    if aggregate not in allowed:
        problem = Problem("eval.aggregate", f"{aggregate} does not apply to a {task} task; use {' or '.join(allowed)}")
        raise ConfigError("eval settings", [problem])
    sampled = Decoding("sampled", settings.max_new_tokens, settings.samples, settings.temperature, settings.seed,
                       aggregate)  # fmt: skip
    return [sampled, greedy]


def aggregate_answers(samples: list[str], how: str) -> str:
    """One answer from k samples: a number's aggregate as text, or the most frequent label's first sample."""
    if how == "majority":
        labels = [first_line(sample) for sample in samples]
        counts = Counter(labels)
        top = max(counts.values(), default=0)
        winner = next((label for label in labels if counts[label] == top), None)  # ties: the earliest drawn
        return next((sample for sample, label in zip(samples, labels, strict=True) if label == winner), "")
    values = [parse_answer_number(sample) for sample in samples]
    numbers = [value for value in values if value is not None and math.isfinite(value)]
    value = aggregate_numbers(numbers, how)
    return "" if value is None else format_number(value)


def aggregate_numbers(numbers: list[float], how: str) -> float | None:
    """median / mean of the numbers; geometric_mean of the positive ones (the median when none is positive)."""
    if not numbers:
        return None
    if how == "median":
        return statistics.median(numbers)
    if how == "mean":
        return math.fsum(numbers) / len(numbers)
    if how == "geometric_mean":
        positive = [number for number in numbers if number > 0]
        return statistics.geometric_mean(positive) if positive else statistics.median(numbers)
    raise ValueError(f"unknown aggregate {how!r}; use one of {', '.join(NUMBER_AGGREGATES + LABEL_AGGREGATES)}")


def format_number(value: float) -> str:
    """A number as an answer: at most 2 decimals, no exponent (parse_answer_number reads it back)."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text
