"""Sampled decoding in eval: how k answers become one, and which decodings a task gets."""

from __future__ import annotations

import math

import pytest

from lorafleet.config import EvalSection
from lorafleet.errors import ConfigError
from lorafleet.training.evaluate_metrics import parse_answer_number
from lorafleet.training.evaluate_sampling import aggregate_answers, aggregate_numbers, choose_decodings


@pytest.mark.parametrize(
    ("samples", "how", "expected"),
    [
        (["$100", "$400"], "geometric_mean", 200.0),
        (["$100", "$400", "$1,000"], "median", 400.0),
        (["$100", "about 400 dollars", "I think $1,000"], "mean", 500.0),
        (["$100", "no idea", "", "$400"], "geometric_mean", 200.0),  # samples without a number are left out
        (["-5", "0", "$0"], "geometric_mean", 0.0),  # nothing positive: the median
        (["-3", "$9"], "geometric_mean", 9.0),  # the geometric mean of the positive ones
        (["$" + "9" * 400, "$10"], "median", 10.0),  # a number too large for a float is no number
    ],
)
def test_numbers_aggregate(samples: list[str], how: str, expected: float) -> None:
    answer = aggregate_answers(samples, how)
    assert parse_answer_number(answer) == pytest.approx(expected), answer


@pytest.mark.parametrize("how", ["median", "geometric_mean", "mean"])
def test_no_number_in_any_sample_is_an_empty_answer_that_metrics_count_as_unparseable(how: str) -> None:
    from lorafleet.training.evaluate_metrics import numeric_metrics

    answers = [aggregate_answers(["no idea", "?", ""], how), aggregate_answers(["$10"], how)]
    assert answers[0] == ""
    metrics = numeric_metrics(answers, ["$10", "$10"])
    assert metrics["unparseable"] == 1 and metrics["mae"] == 0.0 and metrics["within_20pct"] == 0.5
    assert aggregate_numbers([], how) is None


def test_aggregated_numbers_read_back_exactly_as_written() -> None:
    for value in (0.004, 1234.5678, 1e12, -7.25, 3.0):
        answer = aggregate_answers([str(value)], "mean")
        assert "e" not in answer and math.isclose(parse_answer_number(answer), round(value, 2), abs_tol=0.005)


def test_majority_takes_the_most_frequent_first_line_and_keeps_a_real_answer() -> None:
    samples = ["Category: billing\nSorry about that", "category: Shipping\nOn its way", "Category: billing.\nHi"]
    assert aggregate_answers(samples, "majority") == samples[0]
    tie = ["a\nfirst", "b\nsecond"]
    assert aggregate_answers(tie, "majority") == "a\nfirst"  # a tie goes to the earliest drawn
    assert aggregate_answers([], "majority") == ""


def test_unknown_aggregate_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown aggregate"):
        aggregate_numbers([1.0], "mode")


def settings(**values) -> EvalSection:
    return EvalSection.model_validate(values)


def test_numeric_tasks_sample_by_default_and_show_greedy_beside() -> None:
    sampled, greedy = choose_decodings(settings(), "numeric")
    assert (sampled.mode, sampled.samples, sampled.aggregate) == ("sampled", 16, "geometric_mean")
    assert sampled.temperature == 1.0
    assert greedy.mode == "greedy" and greedy.samples == 1
    assert [d.mode for d in choose_decodings(settings(), "classification")] == ["greedy"]
    assert choose_decodings(settings(decoding="sampled"), "classification")[0].aggregate == "majority"
    assert [d.mode for d in choose_decodings(settings(decoding="greedy"), "numeric")] == ["greedy"]
    assert choose_decodings(settings(), None) == []


@pytest.mark.parametrize(
    ("values", "task", "field"),
    [
        ({"decoding": "sampled"}, "text", "eval.decoding"),
        ({"aggregate": "majority"}, "numeric", "eval.aggregate"),
        ({"decoding": "sampled", "aggregate": "median"}, "classification", "eval.aggregate"),
    ],
)
def test_a_decoding_that_does_not_fit_the_task_names_the_field(values: dict, task: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        choose_decodings(settings(**values), task)


@pytest.mark.parametrize(("key", "value"), [("samples", 1), ("samples", 500), ("temperature", 0), ("seed", -1)])
def test_sampling_settings_are_bounded(key: str, value: float) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=key):
        settings(**{key: value})
