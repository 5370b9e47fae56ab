"""Tests for lorafleet.demo_data and lorafleet.demo_tasks: determinism, shape, learnability, builtin: names, CLI.

.venv/bin/python -m pytest tests/test_demo_data.py -q
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lorafleet.demo_data import (
    DEMO_TASKS,
    TASKS,
    builtin_dataset_names,
    make_demo_datasets,
    make_splits,
    resolve_builtin_dataset,
)
from lorafleet.demo_tasks import price, support
from lorafleet.errors import LorafleetError

COUNTS = {"price": (3000, 300), "support": (2000, 200)}
PRICE = re.compile(r"^\$\d+\.\d{2}$")


def read_rows(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def splits() -> dict[str, dict[str, list[dict[str, str]]]]:
    return {name: make_splits(task, seed=0) for name, task in TASKS.items()}


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9'-]+", text.lower()))


def word_matrix(rows: list[dict[str, str]], vocab: dict[str, int]) -> np.ndarray:
    """One 0/1 column per known word of the input, plus a constant column."""
    matrix = np.zeros((len(rows), len(vocab) + 1))
    matrix[:, -1] = 1.0
    for i, row in enumerate(rows):
        for word in words(row["input"]) & vocab.keys():
            matrix[i, vocab[word]] = 1.0
    return matrix


def r_squared(actual: np.ndarray, predicted: np.ndarray) -> float:
    return float(1.0 - np.var(actual - predicted) / np.var(actual))


# --- files and determinism ------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(tmp_path: Path) -> None:
    first = make_demo_datasets(tmp_path / "a", seed=7)
    again = make_demo_datasets(tmp_path / "b", seed=7)
    other = make_demo_datasets(tmp_path / "c", seed=8)
    assert list(DEMO_TASKS) == ["price", "support"]
    assert list(first) == ["price", "price-completion", "support"]  # each task, then its views
    for task, files in first.items():
        assert set(files) == {"train", "test"}
        for split, path in files.items():
            assert path == tmp_path / "a" / task / f"{split}.jsonl"
            assert path.read_bytes() == again[task][split].read_bytes()
            assert path.read_bytes() != other[task][split].read_bytes()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".")], "temporary files left behind"


def test_row_counts_schema_and_no_test_input_in_train(splits: dict) -> None:
    for task, (train_rows, test_rows) in COUNTS.items():
        train, test = splits[task]["train"], splits[task]["test"]
        assert (len(train), len(test)) == (train_rows, test_rows)
        for row in train + test:
            assert list(row) == ["instruction", "input", "output"]
            assert all(isinstance(value, str) and value.strip() for value in row.values()), row
        assert not {row["input"] for row in train} & {row["input"] for row in test}


# --- price --------------------------------------------------------------------------------------------------


def test_price_rows_are_short_parseable_prices_and_never_name_the_tier(splits: dict) -> None:
    rows = splits["price"]["train"] + splits["price"]["test"]
    assert {row["instruction"] for row in rows} == {price.INSTRUCTION}
    bad = [row["output"] for row in rows if not PRICE.match(row["output"])]
    assert not bad, bad[:5]
    assert all(1 <= row["input"].count(".") <= 3 for row in rows)  # one to three sentences
    for tier in price.BRAND_TIERS:
        assert not any(tier in words(row["input"]) for row in rows), tier
    values = [float(row["output"][1:]) for row in rows]
    assert min(values) >= price.MIN_PRICE and max(values) / min(values) > 100  # a wide range, not one magnitude


def test_price_rule_is_learnable_from_the_words_but_not_from_any_single_word(splits: dict) -> None:
    train, test = splits["price"]["train"], splits["price"]["test"]
    vocab = {word: i for i, word in enumerate(sorted(set().union(*(words(r["input"]) for r in train))))}
    x_train, x_test = word_matrix(train, vocab), word_matrix(test, vocab)
    y_train = np.log([float(r["output"][1:]) for r in train])
    y_test = np.log([float(r["output"][1:]) for r in test])

    # The rule is multiplicative, so log price is linear in which words appear: least squares on held-out rows
    # should come close to the noise floor.
    weights = np.linalg.solve(x_train.T @ x_train + 1e-2 * np.eye(x_train.shape[1]), x_train.T @ y_train)
    predicted = x_test @ weights
    assert r_squared(y_test, predicted) > 0.9
    assert np.std(y_test - predicted) < 1.5 * price.NOISE_SIGMA

    # ... and no single word (a category, a brand, a size) gives the answer away.
    single = [
        r_squared(y_train, np.poly1d(np.polyfit(x_train[:, j], y_train, 1))(x_train[:, j])) for j in range(len(vocab))
    ]
    assert max(single) < 0.3


# --- support ------------------------------------------------------------------------------------------------


def parse_support(output: str) -> tuple[str, str]:
    match = re.fullmatch(r"Category: (\w+)\nReply: ([^\n]+)", output)
    assert match, output
    return match.group(1), match.group(2)


def test_support_rows_name_a_category_and_one_sentence(splits: dict) -> None:
    rows = splits["support"]["train"] + splits["support"]["test"]
    assert {row["instruction"] for row in rows} == {support.INSTRUCTION}
    parsed = [parse_support(row["output"]) for row in rows]
    counts = Counter(category for category, _ in parsed)
    assert set(counts) == set(support.ISSUES) == {"billing", "shipping", "account", "technical", "refund"}
    assert all(0.15 < n / len(rows) < 0.25 for n in counts.values()), counts
    assert all(reply.endswith(".") and reply.count(". ") == 0 for _, reply in parsed)
    orders = [(re.findall(r"#\d{6}", row["input"]), reply) for row, (_, reply) in zip(rows, parsed, strict=True)]
    assert all(order[0] in reply for order, reply in orders if order and "order" in reply)


def test_support_category_is_learnable_from_the_words(splits: dict) -> None:
    """A nearest-centroid classifier over bag-of-words gets the category of nearly every held-out ticket."""
    train, test = splits["support"]["train"], splits["support"]["test"]
    vocab = {word: i for i, word in enumerate(sorted(set().union(*(words(r["input"]) for r in train))))}
    categories = sorted(support.ISSUES)

    def label(rows: list[dict[str, str]]) -> np.ndarray:
        return np.array([categories.index(parse_support(row["output"])[0]) for row in rows])

    x_train, y_train = word_matrix(train, vocab), label(train)
    centroids = np.stack([x_train[y_train == k].mean(axis=0) for k in range(len(categories))])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    accuracy = float(np.mean((word_matrix(test, vocab) @ centroids.T).argmax(axis=1) == label(test)))
    assert accuracy > 0.9


# --- builtin: references ------------------------------------------------------------------------------------


def test_builtin_reference_generates_once_then_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    path = resolve_builtin_dataset("builtin:price")
    assert path == tmp_path / "home" / "data" / "demo-v1" / "price" / "train.jsonl"
    before = path.stat()
    assert resolve_builtin_dataset("builtin:price") == path
    assert path.stat().st_ino == before.st_ino and path.stat().st_mtime_ns == before.st_mtime_ns
    assert resolve_builtin_dataset("builtin:price/train") == path
    assert resolve_builtin_dataset("builtin:price/test") == path.with_name("test.jsonl")
    support_test = tmp_path / "home" / "data" / "demo-v1" / "support" / "test.jsonl"
    assert resolve_builtin_dataset("builtin:support/test") == support_test
    expected = make_demo_datasets(tmp_path / "seed0", seed=0)
    assert path.read_bytes() == expected["price"]["train"].read_bytes()
    assert len(read_rows(path)) == 3000


def test_concurrent_processes_resolving_a_builtin_dataset_all_get_the_same_whole_file(tmp_path: Path) -> None:
    code = "from lorafleet.demo_data import resolve_builtin_dataset as r; print(r('builtin:support'))"
    env = {"LORAFLEET_HOME": str(tmp_path), "PATH": ""}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env) for _ in range(4)
    ]
    outputs = {proc.communicate(timeout=120)[0].strip() for proc in procs}
    assert [proc.returncode for proc in procs] == [0] * 4
    assert outputs == {str(tmp_path / "data" / "demo-v1" / "support" / "train.jsonl")}
    assert len(read_rows(Path(outputs.pop()))) == 2000
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"


@pytest.mark.parametrize("reference", ["builtin:nope", "builtin:price/valid", "builtin:", "price"])
def test_unknown_builtin_dataset_lists_the_known_names(reference: str) -> None:
    with pytest.raises(LorafleetError, match="unknown builtin dataset") as caught:
        resolve_builtin_dataset(reference)
    for name in builtin_dataset_names():
        assert name in str(caught.value)
    assert builtin_dataset_names() == [
        "builtin:price",
        "builtin:price/test",
        "builtin:support",
        "builtin:support/test",
        "builtin:price-completion",
        "builtin:price-completion/test",
    ]


# --- lorafleet data make-demo ---------------------------------------------------------------------------------


def test_make_demo_cli_prints_the_paths(tmp_path: Path) -> None:
    from lorafleet.cli import app

    result = CliRunner().invoke(app, ["data", "make-demo", "--out", str(tmp_path), "--seed", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    written = ("price", "price-completion", "support")  # each task, then its views
    assert lines == [
        f"{name}/{split}\t{tmp_path / name / f'{split}.jsonl'}" for name in written for split in ("train", "test")
    ]
    assert read_rows(tmp_path / "price" / "test.jsonl") == make_splits(TASKS["price"], seed=1)["test"]


def test_the_completion_view_holds_the_same_rows_in_fewer_tokens(tmp_path: Path) -> None:
    """builtin:price-completion: the price rows, same order and split, as "<description>\\nPrice:" -> " $123.45"."""
    from lorafleet.demo_data import VIEWS

    make_demo_datasets(tmp_path, seed=0)
    assert set(VIEWS) == {"price-completion"}
    for split in ("train", "test"):
        rows, view = (
            read_rows(tmp_path / "price" / f"{split}.jsonl"),
            read_rows(tmp_path / "price-completion" / f"{split}.jsonl"),
        )
        assert view == [{"prompt": f"{row['input']}\nPrice:", "completion": f" {row['output']}"} for row in rows]
    assert resolve_builtin_dataset("builtin:price-completion/test").parent.name == "price-completion"
