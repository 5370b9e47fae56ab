"""Honest baselines beside base and fine-tuned, on the same examples: what a fine-tune must beat to be worth it.

    numeric         median        the training answers' median value, for every example
                    tfidf_ridge   TF-IDF (words, 1-2 grams) of the input -> ridge regression on log(1 + value)
    classification  majority      the training answers' most common first line
                    tfidf_logreg  TF-IDF of the input -> logistic regression on the first line
    text            most_common   the training answers' most common answer

Each is fitted on the run's training rows (exactly those training saw: the split it used), predicts a string per
example, and is scored by the same task metrics as the models. `eval.baselines: []` turns them off.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, get_args

from lorafleet.config import BaselineName
from lorafleet.training.data_formats import Alpaca, Chat, Completion, Sample
from lorafleet.training.evaluate_metrics import first_line, parse_reference_number

HEADLINE_METRIC = {"numeric": "mae", "classification": "accuracy", "text": "rougeL"}
BASELINES_BY_TASK = {
    "numeric": ("median", "tfidf_ridge"),
    "classification": ("majority", "tfidf_logreg"),
    "text": ("most_common",),
}
ALL_BASELINES = tuple(name for names in BASELINES_BY_TASK.values() for name in names)
assert set(ALL_BASELINES) == set(get_args(BaselineName)), "the config's baseline names and these must agree"


@dataclass(frozen=True)
class Baseline:
    name: str
    how: str  # one line for eval.md: what it predicts and how it was fitted
    predictions: list[str]


def baseline_input(sample: Sample) -> str:
    """The text a classical model sees: everything the user wrote (not the chat template)."""
    record = sample.record
    if isinstance(record, Alpaca):
        return f"{record.instruction}\n{record.input}"
    if isinstance(record, Chat):
        return "\n".join(m.content for m in record.messages[:-1] if m.role in ("system", "user"))
    if isinstance(record, Completion):
        return record.prompt
    return ""


def fit_baselines(task: str, wanted: Sequence[str], train: list[tuple[str, str]], inputs: list[str]) -> list[Baseline]:
    """The `wanted` baselines that apply to `task`, fitted on (input, answer) training pairs, predicting `inputs`."""
    names = [name for name in BASELINES_BY_TASK.get(task, ()) if name in wanted]
    if not train or not names:
        return []
    builders = {
        "median": _median,
        "tfidf_ridge": _tfidf_ridge,
        "majority": _majority,
        "tfidf_logreg": _tfidf_logreg,
        "most_common": _most_common,
    }
    found = [builders[name](train, inputs) for name in names]
    return [baseline for baseline in found if baseline is not None]


def _values(train: list[tuple[str, str]]) -> list[tuple[str, float]]:
    pairs = [(text, parse_reference_number(answer)) for text, answer in train]
    return [(text, value) for text, value in pairs if value is not None]


def _median(train: list[tuple[str, str]], inputs: list[str]) -> Baseline | None:
    values = [value for _, value in _values(train)]
    if not values:
        return None
    median = statistics.median(values)
    how = f"the median of {len(values)} training answers ({median:,.2f}) for every example"
    return Baseline("median", how, [f"{median:.2f}"] * len(inputs))


def _tfidf(texts: list[str]):
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1, max_features=100_000)
    return vectorizer, vectorizer.fit_transform(texts)


def _tfidf_ridge(train: list[tuple[str, str]], inputs: list[str]) -> Baseline | None:
    from sklearn.linear_model import Ridge

    pairs = [(text, value) for text, value in _values(train) if value >= 0]
    if len(pairs) < 2:
        return None
    vectorizer, features = _tfidf([text for text, _ in pairs])
    model = Ridge(alpha=1.0).fit(features, [math.log1p(value) for _, value in pairs])
    predicted = [max(math.expm1(float(y)), 0.0) for y in model.predict(vectorizer.transform(inputs))]
    how = f"TF-IDF (1-2 grams) of the input, ridge (alpha 1) on log(1 + value), fitted on {len(pairs)} rows"
    return Baseline("tfidf_ridge", how, [f"{value:.2f}" for value in predicted])


def _labels(train: list[tuple[str, str]]) -> tuple[list[str], dict[str, str]]:
    """Each answer's label (its normalized first line, as the metrics compare them) and how it was written."""
    keys = [first_line(answer) for _, answer in train]
    written: dict[str, str] = {}
    for key, (_, answer) in zip(keys, train, strict=True):
        written.setdefault(key, answer.strip().splitlines()[0].strip() if answer.strip() else "")
    return keys, written


def _majority(train: list[tuple[str, str]], inputs: list[str]) -> Baseline:
    keys, written = _labels(train)
    label, count = Counter(keys).most_common(1)[0]
    how = f"the most common training label ({written[label]!r}, {count} of {len(train)} rows) for every example"
    return Baseline("majority", how, [written[label]] * len(inputs))


def _tfidf_logreg(train: list[tuple[str, str]], inputs: list[str]) -> Baseline | None:
    from sklearn.linear_model import LogisticRegression

    keys, written = _labels(train)
    if len(set(keys)) < 2:
        return None
    vectorizer, features = _tfidf([text for text, _ in train])
    model = LogisticRegression(max_iter=1000).fit(features, keys)
    how = f"TF-IDF (1-2 grams) of the input, logistic regression on the label, fitted on {len(train)} rows"
    return Baseline("tfidf_logreg", how, [written[str(key)] for key in model.predict(vectorizer.transform(inputs))])


def _most_common(train: list[tuple[str, str]], inputs: list[str]) -> Baseline:
    answer, count = Counter(answer for _, answer in train).most_common(1)[0]
    how = f"the most common training answer ({count} of {len(train)} rows) for every example"
    return Baseline("most_common", how, [answer] * len(inputs))


def verdict(task: str, finetuned: dict[str, Any], baselines: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """Whether the fine-tune beats the best baseline on the task's headline metric, and by how much."""
    from lorafleet.training.evaluate_metrics import LOWER_IS_BETTER

    metric = HEADLINE_METRIC.get(task)
    scored = {name: values.get(metric) for name, values in baselines.items()}
    scored = {name: value for name, value in scored.items() if isinstance(value, int | float)}
    tuned = finetuned.get(metric) if metric else None
    if not scored or not isinstance(tuned, int | float):
        return None
    lower = metric in LOWER_IS_BETTER
    best = (min if lower else max)(scored, key=scored.__getitem__)
    value = scored[best]
    beats = tuned < value if lower else tuned > value
    ratios = {name: tuned / score for name, score in scored.items() if score}
    ratio = ratios.get(best)
    return {"metric": metric, "finetuned": tuned, "best_baseline": best, "baseline": value, "beats": beats,
            "ratio": ratio, "ratios": ratios, "lower_is_better": lower}  # fmt: skip


# What each output of a task is judged on: (output, its primary metrics). A classification task whose answers go
# on after the label line ("Category: billing\nSorry...") has a reply as well, judged as text.
OUTPUTS = {
    "numeric": [("number", ("mae",))],
    "classification": [("category", ("accuracy",)), ("reply", ("bleu", "rougeL"))],
    "text": [("text", ("bleu", "rougeL"))],
}


def output_verdicts(
    task: str, finetuned: dict[str, Any], baselines: dict[str, dict[str, Any]], references: Sequence[str]
) -> list[dict[str, Any]]:
    """One verdict per output of the task: on each primary metric, the fine-tune against the best baseline."""
    from lorafleet.training.evaluate_metrics import LOWER_IS_BETTER

    outputs = OUTPUTS.get(task, [])
    if task == "classification" and not any(reference.strip().count("\n") for reference in references):
        outputs = outputs[:1]  # label-only answers: no reply to judge
    found = []
    for output, metrics in outputs:
        judged = []
        for metric in metrics:
            scored = {name: values.get(metric) for name, values in baselines.items()}
            scored = {name: value for name, value in scored.items() if isinstance(value, int | float)}
            tuned = finetuned.get(metric)
            if not scored or not isinstance(tuned, int | float):
                continue
            lower = metric in LOWER_IS_BETTER
            best = (min if lower else max)(scored, key=scored.__getitem__)
            beats = tuned < scored[best] if lower else tuned > scored[best]
            judged.append({"metric": metric, "finetuned": tuned, "best_baseline": best, "baseline": scored[best],
                           "beats": beats})  # fmt: skip
        if judged:
            found.append({"output": output, "beats": all(item["beats"] for item in judged), "metrics": judged})
    return found


def output_verdict_line(found: dict[str, Any]) -> str:
    """e.g. `reply: beats every baseline (bleu 32.1 vs 0; rougeL 0.48 vs 0.16)`."""
    values = "; ".join(
        f"{item['metric']} {item['finetuned']:.4g} vs {item['baseline']:.4g} {item['best_baseline']}"
        for item in found["metrics"]
    )
    outcome = "beats every baseline" if found["beats"] else "does NOT beat the best baseline"
    return f"{found['output']}: {outcome} ({values})"


def verdict_line(found: dict[str, Any] | None) -> str:
    if found is None:
        return "baselines: none scored (eval.baselines, or no task metrics)"
    metric, tuned, best, value = found["metric"], found["finetuned"], found["best_baseline"], found["baseline"]
    ratio = f" ({found['ratio']:.2f}x)" if found["ratio"] is not None else ""
    beats = "beats" if found["beats"] else "does NOT beat"
    line = f"the fine-tune {beats} the best baseline ({best}): {metric} {tuned:.4g} vs {value:.4g}{ratio}"
    others = [f"{ratio:.2f}x {name}" for name, ratio in found.get("ratios", {}).items() if name != best]
    return line + (f"; and {', '.join(others)}" if others else "")
