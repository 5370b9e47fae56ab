"""`lorafleet eval`: metrics by task, and base vs fine-tuned on a tiny run trained in-process (no Ray)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from lorafleet.config import JobConfig
from lorafleet.runs import RunFolder, RunRecord
from lorafleet.training.evaluate_metrics import (
    detect_task,
    numeric_metrics,
    parse_answer_number,
    parse_reference_number,
    task_metrics,
)
from tests.helpers import run_cli

EVAL_FILES = ("eval.json", "eval.md", "eval_metrics.png", "eval_scatter.png", "eval_generations.jsonl")


def tiny_job(storage: Path, **sections: dict) -> JobConfig:
    config = {
        "name": "tiny-eval",
        "model": {"name_or_path": "builtin:tiny-llama"},
        "adapter": {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": "builtin:price", "format": "alpaca", "max_seq_len": 256, "val_split": 0.1, "max_rows": 240},
        "training": {"max_steps": 40, "micro_batch_size": 8, "learning_rate": 3e-3, "seed": 0},
        "distributed": {"num_workers": 1},
        "storage": {"uri": str(storage)},
        "eval": {"max_examples": 12, "max_new_tokens": 10, "batch_size": 5},
    }
    for name, values in sections.items():
        config[name] = config.get(name, {}) | values
    return JobConfig.model_validate(config)


def train_run_folder(job: JobConfig, run_id: str) -> Path:
    """What the launcher leaves behind (config.yaml, adapter/, run.json), trained in-process with plain PEFT."""
    from transformers import AutoModelForCausalLM

    from lorafleet.models import resolve_model
    from lorafleet.training.adapters import apply_adapter
    from lorafleet.training.data import Collator, build_datasets
    from lorafleet.training.model import load_tokenizer

    run_dir = Path(job.storage.uri) / "runs" / run_id
    torch.manual_seed(job.training.seed)
    tokenizer = load_tokenizer(job.model)
    model = apply_adapter(AutoModelForCausalLM.from_pretrained(resolve_model(job.model.name_or_path)), job.adapter)
    data = build_datasets(job.data, tokenizer, seed=job.training.seed)
    loader = torch.utils.data.DataLoader(
        data.train, batch_size=job.training.micro_batch_size, shuffle=True, collate_fn=Collator(tokenizer.pad_token_id)
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=job.training.learning_rate)
    model.train()
    for _, batch in zip(range(job.training.max_steps), itertools.cycle(loader), strict=False):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(run_dir / "adapter")
    tokenizer.save_pretrained(run_dir / "adapter")
    adapter_config_path = run_dir / "adapter" / "adapter_config.json"
    adapter_config = json.loads(adapter_config_path.read_text())
    adapter_config["base_model_name_or_path"] = job.model.name_or_path
    adapter_config_path.write_text(json.dumps(adapter_config, indent=2))
    folder = RunFolder(str(run_dir))
    folder.write_config(job)
    folder.write_record(RunRecord(run_id=run_id, status="succeeded", global_step=job.training.max_steps))
    return run_dir


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_run_folder(tiny_job(tmp_path_factory.mktemp("storage")), "tiny-eval-run")


@pytest.fixture(scope="module")
def cli_eval(trained_run: Path):
    result = run_cli("eval", str(trained_run), "--max-examples", "12", "--max-new-tokens", "10")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "fine-tuned" in result.stdout and "MAE" in result.stdout, result.stdout
    assert "generate finetuned (sampled)" in result.stderr, "no progress bar"
    # the base's answers: generated, or (the same base, examples and decoding seen before) from the cache
    assert "generate base (sampled)" in result.stderr or "base answers (sampled): from the cache" in result.stderr
    return result


@pytest.fixture(scope="module")
def cli_report(trained_run: Path, cli_eval) -> dict:
    return json.loads((trained_run / "report" / "eval.json").read_text())


# --- metrics -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("$123.45", 123.45),
        ("$1,234.50", 1234.5),
        ("42", 42.0),
        ("-3.5", -3.5),
        (" 7 USD", 7.0),
        ("about $12", None),
        ("$12 or $13", None),
        ("", None),
        ("Category: billing", None),
    ],
)
def test_reference_numbers_must_be_the_whole_text(text: str, value: float | None) -> None:
    assert parse_reference_number(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("$48.10", 48.1),
        ("It costs about $1,299.99.", 1299.99),
        ("Price: 12 dollars", 12.0),
        ("no idea", None),
        ("$", None),
        ("v2x", None),
    ],
)
def test_answers_give_their_first_number(text: str, value: float | None) -> None:
    assert parse_answer_number(text) == value


def test_task_detection() -> None:
    assert detect_task(["$12.00", "$3.50", "$1,200.00"]) == "numeric"
    tickets = [f"Category: {c}\nReply: sorry about order {i}." for i, c in enumerate(["billing", "shipping"] * 4)]
    assert detect_task(tickets) == "classification"
    assert detect_task([f"a sentence about topic {i}" for i in range(8)]) == "text"


def test_unparseable_answers_are_counted_not_dropped() -> None:
    metrics = numeric_metrics(["$100", "no idea", "$130", "$50"], ["$100.00", "$80.00", "$100.00", "$100.00"])
    assert metrics["unparseable"] == 1 and metrics["unparseable_rate"] == 0.25
    assert metrics["mae"] == pytest.approx((0 + 30 + 50) / 3)  # over the answers that hold a number
    assert metrics["within_20pct"] == 0.25  # of all four: the unparseable answer is a miss
    expected = math.sqrt(((math.log1p(130) - math.log1p(100)) ** 2 + (math.log1p(50) - math.log1p(100)) ** 2) / 3)
    assert metrics["rmsle"] == pytest.approx(expected)
    nothing = numeric_metrics(["?", "?"], ["$1", "$2"])
    assert nothing["mae"] is None and nothing["unparseable"] == 2 and nothing["within_20pct"] == 0


def test_classification_and_text_metrics() -> None:
    references = ["Category: billing\nReply: refunded.", "Category: shipping\nReply: traced."] * 2
    predictions = ["Category: billing\nReply: refunded.", "Category: billing\nReply: x", "category: billing.", "?"]
    metrics = task_metrics("classification", predictions, references)
    assert metrics["accuracy"] == 0.5 and metrics["exact_match"] == 0.25
    assert 0 < metrics["macro_f1"] < 1 and 0 < metrics["rougeL"] < 1 and metrics["bleu"] > 0
    perfect = task_metrics("text", references, references)
    assert perfect["exact_match"] == 1 and perfect["bleu"] == pytest.approx(100) and perfect["rougeL"] == 1


# --- a trained tiny run --------------------------------------------------------------------------------


def test_eval_report_has_every_section_and_plot(trained_run: Path, cli_report: dict) -> None:
    report_dir = trained_run / "report"
    for name in EVAL_FILES:
        assert (report_dir / name).is_file() and (report_dir / name).stat().st_size > 0, name
    for name in ("eval_metrics.png", "eval_scatter.png"):
        assert (report_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert cli_report["task"] == "numeric" and cli_report["task_source"] == "detected"
    assert cli_report["n"] == 12 and cli_report["data"]["examples"] == 12 and cli_report["data"]["split"] == "val"
    assert cli_report["settings"]["max_new_tokens"] == 10 and cli_report["settings"]["batch_size"] == 5
    for side in ("base", "finetuned"):
        assert set(cli_report[side]) >= {"loss", "perplexity", "mae", "rmsle", "within_20pct", "unparseable"}
        assert 0 <= cli_report[side]["unparseable"] <= 12
    markdown = (report_dir / "eval.md").read_text()
    assert set(cli_report["baselines"]) == {"median", "tfidf_ridge"}, cli_report["baselines"]
    for name, metrics in cli_report["baselines"].items():
        assert set(metrics) >= {"mae", "rmsle", "within_20pct"} and cli_report["baseline_methods"][name]
    judged = cli_report["verdict"]
    assert judged["metric"] == "mae" and judged["best_baseline"] in cli_report["baselines"]
    assert judged["beats"] == (cli_report["finetuned"]["mae"] < cli_report["baselines"][judged["best_baseline"]]["mae"])
    for piece in (
        "| metric | base sampled | fine-tuned sampled | base greedy | fine-tuned greedy | median | tfidf_ridge |",
        "Baselines, fitted on the run's training rows",
        "MAE",
        "within ±20%",
        "## Examples",
        "eval_scatter.png",
        "eval_metrics.png",
    ):
        assert piece in markdown, piece
    rows = [json.loads(line) for line in (report_dir / "eval_generations.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(row["reference"].startswith("$") for row in rows)
    assert all(set(row["baselines"]) == {"median", "tfidf_ridge"} for row in rows)


def test_numbers_are_read_from_16_samples_beside_greedy_by_the_cpu_engine(trained_run: Path, cli_report: dict) -> None:
    from lorafleet.training.evaluate_sampling import aggregate_answers

    settings = cli_report["settings"]
    assert (
        settings["decoding"] == "sampled (k=16, T=1, geometric_mean, seed 0)"
        and settings["answered_by"] == "CPU engine"
    )
    beside = cli_report["beside"]
    assert beside["decoding"] == "greedy" and set(beside["finetuned"]) >= {"mae", "within_20pct", "unparseable"}
    rows = [json.loads(line) for line in (trained_run / "report" / "eval_generations.jsonl").read_text().splitlines()]
    for row in rows:
        assert len(row["finetuned_samples"]) == 16 and len(row["base_samples"]) == 16
        assert row["finetuned"] == aggregate_answers(row["finetuned_samples"], "geometric_mean")
        assert isinstance(row["finetuned_greedy"], str) and isinstance(row["base_greedy"], str)
    assert len({answer for row in rows for answer in row["finetuned_samples"]}) > 12  # they were sampled


def test_a_fine_tune_that_learned_only_the_answer_format_does_not_beat_the_constant(cli_eval, cli_report) -> None:
    """The tiny random model after a few steps answers with prices (the format) but not the right ones."""
    tuned, constant = cli_report["finetuned"], cli_report["baselines"]["median"]
    assert tuned["unparseable"] < cli_report["n"] / 2, tuned  # it answers with numbers
    greedy = cli_report["beside"]  # greedy, the base answers no number where the fine-tune does (16 samples of
    assert greedy["base"]["unparseable"] > greedy["finetuned"]["unparseable"]  # random text hold a digit anyway)
    assert tuned["mae"] > constant["mae"], (tuned["mae"], constant["mae"])
    judged = cli_report["verdict"]
    assert judged["beats"] is False and judged["baseline"] <= constant["mae"]
    assert judged["ratios"]["median"] == pytest.approx(tuned["mae"] / constant["mae"])
    line = next(line for line in cli_eval.stdout.splitlines() if "best baseline" in line)
    assert line.startswith("the fine-tune does NOT beat the best baseline"), line
    assert f"mae {tuned['mae']:.4g} vs" in line, line
    to_constant = (
        f"({judged['ratio']:.2f}x)"
        if judged["best_baseline"] == "median"
        else f"{judged['ratios']['median']:.2f}x median"
    )
    assert to_constant in line, line


def test_the_promotion_gate_refuses_a_version_that_does_not_beat_the_best_baseline(
    trained_run: Path, cli_report: dict
) -> None:
    storage = str(trained_run.parent.parent)
    cli = ("--storage", storage)
    published = run_cli("publish", str(trained_run), "--name", "tiny-price", *cli)
    assert published.returncode == 0, published.stderr
    from lorafleet.registry import resolve

    manifest = resolve(storage, "tiny-price@v1").manifest
    for name, metrics in cli_report["baselines"].items():
        assert manifest.metrics[f"baselines.{name}.mae"] == metrics["mae"]  # the manifest records them
    gate = run_cli("registry", "policy", "tiny-price", "--set", "beat_baseline.mae=0.1", *cli)
    assert gate.returncode == 0, gate.stderr
    refused = run_cli("promote", "tiny-price", "v1", *cli)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "does not beat the best baseline" in refused.stderr, refused.stderr
    loose = run_cli("registry", "policy", "tiny-price", "--set", "beat_baseline={}", *cli)
    assert loose.returncode == 0, loose.stderr
    assert run_cli("promote", "tiny-price", "v1", *cli).returncode == 0  # the same version, no value gate


def test_base_and_finetuned_differ_on_the_same_examples(trained_run: Path, cli_report: dict) -> None:
    base, tuned = cli_report["base"], cli_report["finetuned"]
    assert tuned["loss"] < base["loss"], (base["loss"], tuned["loss"])  # 40 steps on prices: a clear drop
    assert cli_report["delta"]["loss"] == pytest.approx(tuned["loss"] - base["loss"])
    rows = [json.loads(line) for line in (trained_run / "report" / "eval_generations.jsonl").read_text().splitlines()]
    assert [row["base"] for row in rows] != [row["finetuned"] for row in rows]
    # the same examples: exactly training's seeded holdout, in order
    from lorafleet.training.data import load_samples, split_holdout

    job = RunFolder(str(trained_run)).read_config()
    _, held_out = split_holdout(
        load_samples(job.data.train, "alpaca", max_rows=job.data.max_rows),
        job.data.val_split,
        job.training.seed,
        source=job.data.train,
    )
    assert [row["location"] for row in rows] == [sample.location for sample in held_out[:12]]
    assert [row["reference"] for row in rows] == [sample.record.output for sample in held_out[:12]]


@pytest.mark.parametrize(
    ("patched", "message"),
    [("run_model", "not evaluated on the same examples"), ("response_loss", "not evaluated on the same examples")],
)
def test_both_models_are_checked_to_see_the_same_examples(
    trained_run: Path, monkeypatch: pytest.MonkeyPatch, patched: str, message: str
) -> None:
    """The fine-tuned model's run (or one of its passes) silently skipping an example is an error."""
    import dataclasses

    import lorafleet.training.evaluate as evaluate
    from lorafleet.runs import open_run

    run = open_run(trained_run)
    settings = evaluate.resolve_settings(run.job, max_examples=4, max_new_tokens=2, split="test")
    original = getattr(evaluate, patched)
    calls = []

    def drop_last_example_the_second_time(model, tokenizer_or_examples, data_or_rest, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and patched == "run_model":
            data_or_rest = dataclasses.replace(data_or_rest, examples=data_or_rest.examples[:-1])
        elif len(calls) == 2:
            tokenizer_or_examples = tokenizer_or_examples[:-1]
        return original(model, tokenizer_or_examples, data_or_rest, *args, **kwargs)

    monkeypatch.setattr(evaluate, patched, drop_last_example_the_second_time)
    with pytest.raises(RuntimeError, match=message):
        evaluate.evaluate_run(run, settings)


def test_test_split_and_task_override(trained_run: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "tiny-eval-copy"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("report"))
    result = run_cli(
        "eval",
        str(copy),
        "--split",
        "test",
        "--max-examples",
        "6",
        "--task",
        "text",
        "--max-new-tokens",
        "4",
        "--batch-size",
        "3",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((copy / "report" / "eval.json").read_text())
    assert report["data"]["source"] == "builtin:price/test" and report["n"] == 6
    assert report["task"] == "text" and report["task_source"] == "set" and "bleu" in report["finetuned"]
    assert not (copy / "report" / "eval_scatter.png").exists()  # only numeric tasks get the scatter plot


def test_bad_settings_and_missing_runs_exit_2(trained_run: Path, tmp_path: Path) -> None:
    bad_task = run_cli("eval", str(trained_run), "--task", "regression")
    assert bad_task.returncode == 2 and "eval.task" in bad_task.stderr, bad_task.stderr
    missing = run_cli("eval", "no-such-run", "--storage", str(tmp_path))
    assert missing.returncode == 2 and "no run 'no-such-run'" in missing.stderr, missing.stderr


def test_registry_reads_the_finetuned_metrics(trained_run: Path, cli_report: dict) -> None:
    from lorafleet.registry.manifest import extract_metrics

    metrics = extract_metrics(cli_report)
    if cli_report["finetuned"]["mae"] is not None:
        assert metrics["mae"] == metrics["finetuned.mae"] == cli_report["finetuned"]["mae"]
    assert metrics["loss"] == cli_report["finetuned"]["loss"] and metrics["base.loss"] == cli_report["base"]["loss"]
    assert metrics["within_20pct"] == cli_report["finetuned"]["within_20pct"]
    assert metrics["baselines.median.mae"] == cli_report["baselines"]["median"]["mae"]  # the gate's beat_baseline


def _price_rows(n: int, seed: int) -> list[tuple[str, str]]:
    """Products whose price follows their words (as real listings do): a text model can learn it, a constant not."""
    import random

    rng = random.Random(seed)
    kinds = {"cable": 9.0, "mouse": 25.0, "keyboard": 60.0, "monitor": 240.0, "laptop": 900.0}
    rows = []
    for _ in range(n):
        kind = rng.choice(sorted(kinds))
        price = kinds[kind] * rng.uniform(0.9, 1.1)
        rows.append((f"How much does this cost?\nA {rng.choice(['black', 'white', 'grey'])} {kind}", f"${price:.2f}"))
    return rows


def test_numeric_baselines_are_a_median_and_a_text_regressor_and_the_regressor_wins() -> None:
    from lorafleet.training.evaluate_baselines import fit_baselines, verdict
    from lorafleet.training.evaluate_metrics import task_metrics

    train, held_out = _price_rows(200, seed=1), _price_rows(40, seed=2)
    found = fit_baselines("numeric", ["median", "tfidf_ridge", "majority"], train, [text for text, _ in held_out])
    assert [b.name for b in found] == ["median", "tfidf_ridge"]  # majority is for classification
    references = [answer for _, answer in held_out]
    scores = {b.name: task_metrics("numeric", b.predictions, references) for b in found}
    assert len(set(found[0].predictions)) == 1 and "median of 200 training answers" in found[0].how
    assert scores["tfidf_ridge"]["mae"] < 0.5 * scores["median"]["mae"], scores
    assert scores["tfidf_ridge"]["within_20pct"] > 2 * scores["median"]["within_20pct"], scores
    tuned = {"mae": scores["median"]["mae"] * 0.9}  # better than the constant, worse than the regressor
    judged = verdict("numeric", tuned, scores)
    assert judged is not None and judged["best_baseline"] == "tfidf_ridge" and judged["beats"] is False


def test_classification_and_text_baselines() -> None:
    from lorafleet.training.evaluate_baselines import fit_baselines

    train = [(f"ticket about {word}", f"Category: {label}") for word, label in
             [("refund", "billing"), ("invoice", "billing"), ("crash", "bug"), ("error", "bug"), ("charge", "billing")]
             * 6]  # fmt: skip
    found = fit_baselines("classification", ["majority", "tfidf_logreg"], train, ["a crash again", "my invoice"])
    assert found[0].predictions == ["Category: billing"] * 2 and found[1].predictions == [
        "Category: bug",
        "Category: billing",
    ]
    text = fit_baselines("text", ["most_common"], [("q1", "hello"), ("q2", "hello"), ("q3", "bye")], ["q"])
    assert text[0].predictions == ["hello"] and fit_baselines("text", [], train, ["q"]) == []


def test_the_gate_can_require_beating_the_best_baseline() -> None:
    from lorafleet.registry import PromotionPolicy

    metrics = {"mae": 30.0, "baselines.median.mae": 100.0, "baselines.tfidf_ridge.mae": 32.0}
    assert PromotionPolicy(beat_baseline={"mae": 0.0}).evaluate(metrics) == []
    failures = PromotionPolicy(beat_baseline={"mae": 0.1}).evaluate(metrics)
    assert len(failures) == 1 and "does not beat the best baseline (tfidf_ridge: 32)" in failures[0], failures
    missing = PromotionPolicy(beat_baseline={"accuracy": 0.0}).evaluate(metrics)
    assert "baselines.*.accuracy" in missing[0]


def test_a_task_with_two_outputs_gets_a_verdict_for_each() -> None:
    """The support task: a category line, then a reply. A fine-tune below a classifier on the label but far above
    every baseline on the reply is told so, per output; a label-only task has no reply verdict."""
    from lorafleet.training.evaluate_baselines import output_verdict_line, output_verdicts

    tuned = {"accuracy": 0.94, "bleu": 32.1, "rougeL": 0.48}
    baselines = {"majority": {"accuracy": 0.4, "bleu": 0.0, "rougeL": 0.16},
                 "tfidf_logreg": {"accuracy": 1.0, "bleu": 0.0, "rougeL": 0.16}}  # fmt: skip
    references = ["Category: billing\nSorry for the double charge.", "Category: shipping\nIt ships today."]
    category, reply = output_verdicts("classification", tuned, baselines, references)
    assert (category["output"], category["beats"]) == ("category", False)
    assert category["metrics"][0]["best_baseline"] == "tfidf_logreg"
    assert (reply["output"], reply["beats"]) == ("reply", True)
    assert [item["metric"] for item in reply["metrics"]] == ["bleu", "rougeL"]
    assert output_verdict_line(reply).startswith("reply: beats every baseline (bleu 32.1 vs 0")
    assert output_verdict_line(category).startswith("category: does NOT beat the best baseline (accuracy 0.94 vs 1")
    labels_only = output_verdicts("classification", tuned, baselines, ["billing", "shipping"])
    assert [found["output"] for found in labels_only] == ["category"]
    (number,) = output_verdicts("numeric", {"mae": 90.0}, {"median": {"mae": 120.0}}, ["$1"])
    assert number["beats"] and number["metrics"][0]["metric"] == "mae"


def test_a_second_eval_reads_the_base_answers_from_the_cache_and_samples_the_same(
    trained_run: Path, cli_report: dict, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "tiny-eval-again"
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("report"))
    again = run_cli("eval", str(copy), "--max-examples", "12", "--max-new-tokens", "10")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "base answers (sampled): from the cache" in again.stderr and "generate base" not in again.stderr
    first, second = (
        [json.loads(line) for line in (folder / "report" / "eval_generations.jsonl").read_text().splitlines()]
        for folder in (trained_run, copy)
    )
    for key in ("base_samples", "finetuned_samples", "finetuned", "finetuned_greedy"):
        assert [row[key] for row in first] == [row[key] for row in second], key  # seeded: the same answers
    reseeded = run_cli("eval", str(copy), "--max-examples", "12", "--max-new-tokens", "10", "--seed", "5")
    assert reseeded.returncode == 0, reseeded.stderr[-3000:]
    third = [json.loads(line) for line in (copy / "report" / "eval_generations.jsonl").read_text().splitlines()]
    assert [row["finetuned_samples"] for row in third] != [row["finetuned_samples"] for row in first]
