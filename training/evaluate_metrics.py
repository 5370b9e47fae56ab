"""Generation metrics of `lorafleet eval`, chosen by task, on (prediction, reference) text pairs.

    task = detect_task(references)                  # numeric | classification | text
    metrics = task_metrics(task, predictions, references)

numeric         every reference is a number ("$123.45", "1,200", "0.5"): the first number in each answer is
                compared with it. mae and rmsle are over the answers that hold a number; within_20pct counts
                an answer without one as a miss; unparseable says how many there were (never dropped silently).
classification  few distinct first lines ("Category: billing"): accuracy and macro_f1 on the first line,
                exact_match on the whole answer, plus bleu/rouge for any text after it.
text            exact_match, bleu (sacrebleu, 0-100), rouge1/rouge2/rougeL (F1, 0-1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

TASKS = ("numeric", "classification", "text")
MAX_CLASSES = 50
WITHIN_SHARE = 0.2
# Whole-text numbers (references): an optional currency sign, thousands separators, decimals, a unit word.
STRICT_NUMBER = re.compile(
    r"^\s*(?P<sign>[-+]?)\s*[$€£]?\s*(?P<number>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)\s*"
    r"(?:usd|eur|gbp|dollars?)?\s*\.?\s*$",
    re.IGNORECASE,
)
# The first number anywhere in an answer ("about $1,234.50" -> 1234.5).
ANY_NUMBER = re.compile(r"(?<![\w.])(?P<sign>-?)[$€£]?(?P<number>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
LOWER_IS_BETTER = frozenset({"loss", "perplexity", "mae", "rmsle", "unparseable", "unparseable_rate"})


def parse_reference_number(text: str) -> float | None:
    """The value of a text that is a number and nothing else (a currency sign and a unit word allowed)."""
    match = STRICT_NUMBER.match(text)
    if not match:
        return None
    value = float(match["number"].replace(",", ""))
    return -value if match["sign"] == "-" else value


def parse_answer_number(text: str) -> float | None:
    """The first number in a generated answer, or None when it has none."""
    match = ANY_NUMBER.search(text)
    if not match:
        return None
    value = float(match["number"].replace(",", ""))
    return -value if match["sign"] == "-" else value


def first_line(text: str) -> str:
    """The label of a classification-like answer: its first non-empty line, normalized."""
    line = next((line for line in text.strip().splitlines() if line.strip()), "")
    return normalize(line).rstrip(".")


def normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def detect_task(references: Sequence[str]) -> str:
    """numeric if every reference is a number; classification if few distinct first lines repeat; else text."""
    if references and all(parse_reference_number(reference) is not None for reference in references):
        return "numeric"
    distinct = len({first_line(reference) for reference in references})
    if len(references) >= 4 and distinct <= min(MAX_CLASSES, len(references) // 2):
        return "classification"
    return "text"


def task_metrics(task: str, predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | int | None]:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if task == "numeric":
        return numeric_metrics(predictions, references)
    if task == "classification":
        return classification_metrics(predictions, references) | text_metrics(predictions, references)
    if task == "text":
        return text_metrics(predictions, references)
    raise ValueError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")


def numeric_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | int | None]:
    truths = [parse_reference_number(reference) for reference in references]
    if any(truth is None for truth in truths):
        bad = next(reference for reference, truth in zip(references, truths, strict=True) if truth is None)
        raise ValueError(f"the numeric task needs numeric references; {bad!r} is not a number (use --task text)")
    guesses = [parse_answer_number(prediction) for prediction in predictions]
    pairs = [(guess, truth) for guess, truth in zip(guesses, truths, strict=True) if guess is not None]
    n = len(references)
    errors = [abs(guess - truth) for guess, truth in pairs]
    log_errors = [(math.log1p(max(guess, 0.0)) - math.log1p(max(truth, 0.0))) ** 2 for guess, truth in pairs]
    within = sum(1 for guess, truth in pairs if abs(guess - truth) <= WITHIN_SHARE * abs(truth))
    return {
        "mae": sum(errors) / len(errors) if errors else None,
        "rmsle": math.sqrt(sum(log_errors) / len(log_errors)) if log_errors else None,
        "within_20pct": within / n if n else None,
        "unparseable": n - len(pairs),
        "unparseable_rate": (n - len(pairs)) / n if n else None,
        "exact_match": exact_match(predictions, references),
    }


def classification_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | None]:
    guesses = [first_line(prediction) for prediction in predictions]
    truths = [first_line(reference) for reference in references]
    n = len(truths)
    f1_scores = []
    for label in sorted(set(truths)):
        true_positive = sum(1 for g, t in zip(guesses, truths, strict=True) if g == label and t == label)
        predicted, actual = guesses.count(label), truths.count(label)
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / actual if actual else 0.0
        f1_scores.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {
        "accuracy": sum(1 for g, t in zip(guesses, truths, strict=True) if g == t) / n if n else None,
        "macro_f1": sum(f1_scores) / len(f1_scores) if f1_scores else None,
    }


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | None]:
    if not references:
        return {"exact_match": None, "bleu": None, "rouge1": None, "rouge2": None, "rougeL": None}
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    n = len(references)
    return {
        "exact_match": exact_match(predictions, references),
        "bleu": sacrebleu.corpus_bleu(list(predictions), [list(references)]).score,
        **{key: sum(score[key].fmeasure for score in scores) / n for key in ("rouge1", "rouge2", "rougeL")},
    }


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float | None:
    if not references:
        return None
    hits = sum(1 for p, r in zip(predictions, references, strict=True) if normalize(p) == normalize(r))
    return hits / len(references)


def is_improvement(metric: str, base: float, tuned: float) -> bool | None:
    """Whether `tuned` is better than `base` for this metric (None when equal)."""
    if tuned == base:
        return None
    return (tuned < base) if metric in LOWER_IS_BETTER else (tuned > base)
