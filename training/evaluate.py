"""Base model vs fine-tuned adapter on a run's held-out data: loss, perplexity and task metrics, with a report.

    lorafleet eval price-20250101-120000 --max-examples 100          # a run id under <storage>/runs/
    lorafleet eval /mnt/shared/runs/price-20250101-120000 --split test --task numeric

One linear story:
    run folder → config.yaml → eval examples (the run's data.eval, else the same seeded holdout of data.train
    that training used; `--split test`: the train set's test file) → base model: response loss + answers
    (evaluate_sampling: greedy, or k samples aggregated beside greedy) → the same base with the adapter: the
    same → task metrics side by side → baselines and a verdict per output → report/

Examples are rendered exactly as in training (training.data's Renderer and encode: chat template, EOS, loss
only on response tokens, truncation at data.max_seq_len); generation prompts are the rendered text up to the
last response. Both models see the same examples in the same batches; this is checked, not assumed.
Answers come from an AnswerSource (evaluate_generation): the CLI's CPU engine, else transformers' generate; the
base's are cached by (base, prompts, decoding).

The report (see evaluate_report.py): report/eval.json (every number, base and fine-tuned side by side),
report/eval.md, report/eval_metrics.png, report/eval_scatter.png (numeric tasks), report/eval_generations.jsonl.
Baselines (evaluate_baselines.py: a constant and a classical text model per task, fitted on the run's training
rows) are scored on the same examples; the verdict says whether the fine-tune beats the best of them.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lorafleet.config import EvalSection, JobConfig
from lorafleet.errors import ConfigError, Problem
from lorafleet.models import resolve_model
from lorafleet.runs import FinishedRun
from lorafleet.training.data import label_count
from lorafleet.training.evaluate_baselines import Baseline, fit_baselines, output_verdicts, verdict
from lorafleet.training.evaluate_data import EvalData, EvalExample, examples_digest, load_eval_data, training_pairs
from lorafleet.training.evaluate_generation import (
    AnswerSource,
    PeftAnswers,
    batches,
    cached_base_answers,
    model_identity,
)
from lorafleet.training.evaluate_metrics import detect_task, task_metrics
from lorafleet.training.evaluate_sampling import Decoding, aggregate_answers, choose_decodings


@dataclass(frozen=True)
class ModelPass:
    loss: float
    perplexity: float
    generations: list[str] | None  # the first decoding's answer per example (aggregated when sampled)
    examples_sha256: str  # of the examples this pass actually ran, in order
    seconds: float
    answers: dict[str, list[str]] = field(default_factory=dict)  # decoding name -> one answer per example
    samples: list[list[str]] | None = None  # a sampled decoding's k answers per example


@dataclass(frozen=True)
class EvalOutcome:
    report: dict[str, Any]
    files: list[Path]


def evaluate_run(
    run: FinishedRun,
    settings: EvalSection,
    *,
    device: str | None = None,
    engine_answers: Callable[[EvalPlan], AnswerSource | None] | None = None,
) -> EvalOutcome:
    """Evaluate base and fine-tuned on the same examples; write the report into `<run>/report/`.

    `engine_answers(plan)`: an answer source for this eval (the CLI's CPU engine), or None where it cannot serve
    it; without one, transformers' `generate` answers.
    """
    import torch
    from peft import PeftModel

    from lorafleet.training.evaluate_report import write_report
    from lorafleet.training.model import load_tokenizer

    started = time.monotonic()
    job = run.job
    tokenizer = load_tokenizer(job.model)
    data = load_eval_data(job, settings, tokenizer)
    task, task_source = choose_task(settings.task, data)
    decodings = choose_decodings(settings, task)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    base, precision = load_eval_base(job, target)
    plan = EvalPlan(run, settings, target, str(base.dtype).removeprefix("torch."), data.examples)
    source = PeftAnswers({"base": base}, tokenizer, settings.batch_size, stop_token_ids(tokenizer, base))
    engine = engine_answers(plan) if engine_answers is not None and decodings else None
    print(
        f"eval {run.run_id}: {len(data.examples)} examples of {data.source} ({data.split}), task {task or 'none'} "
        f"({task_source}), device {target}, answers by {'the CPU engine' if engine else 'transformers generate'}, "
        f"{' and '.join(d.name for d in decodings) or 'no generation'}",
        file=sys.stderr,
        flush=True,
    )
    identity = model_identity(resolve_model(job.model.name_or_path), job.model.revision, plan.dtype)
    base_pass = run_model(base, tokenizer, data, settings, decodings, engine or source, "base", identity)
    tuned = PeftModel.from_pretrained(base, str(run.adapter_dir))
    tuned.eval()
    source.models["finetuned"] = tuned
    tuned_pass = run_model(tuned, tokenizer, data, settings, decodings, engine or source, "finetuned", None)
    if not base_pass.examples_sha256 == tuned_pass.examples_sha256 == data.digest():
        raise RuntimeError("base and fine-tuned were not evaluated on the same examples")

    baselines = fit_baselines(task, settings.baselines, training_pairs(job), [e.baseline_input for e in data.examples])
    report = build_report(run, settings, data, (task, task_source), (base_pass, tuned_pass), (target, precision))
    report["settings"]["decoding"] = decodings[0].name if decodings else "none"
    report["settings"]["answered_by"] = "CPU engine" if engine else "transformers generate"
    add_beside(report, decodings, (base_pass, tuned_pass), task, data.references)
    add_baselines(report, task, baselines, data.references)
    report["seconds"]["total"] = round(time.monotonic() - started, 1)
    files = write_report(run.report_dir, report, generation_rows(data, base_pass, tuned_pass, baselines))
    return EvalOutcome(report=report, files=files)


@dataclass(frozen=True)
class EvalPlan:
    """What an answer source needs to know about an eval: the run, its settings, where and in which dtype."""

    run: FinishedRun
    settings: EvalSection
    device: Any
    dtype: str
    examples: list[EvalExample]


def build_report(
    run: FinishedRun,
    settings: EvalSection,
    data: EvalData,
    task_info: tuple[str | None, str],
    passes: tuple[ModelPass, ModelPass],
    where: tuple[Any, str],
) -> dict[str, Any]:
    """eval.json: what was evaluated, how, and base and fine-tuned metrics side by side."""
    (task, task_source), (base_pass, tuned_pass), (target, precision) = task_info, passes, where
    job = run.job
    references = data.references
    base_metrics = pass_metrics(base_pass, task, references)
    tuned_metrics = pass_metrics(tuned_pass, task, references)
    return {
        "schema_version": 1,
        "run_id": run.run_id,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": task or "none",
        "task_source": task_source,
        "n": len(data.examples),
        "data": {
            "split": data.split,
            "source": data.source,
            "format": job.data.format,
            "rows": data.rows,
            "examples": len(data.examples),
            "truncated": data.truncated,
            "dropped": data.dropped,
            "label_tokens": sum(label_count(example.labels) for example in data.examples),
            "sha256": data.digest(),
        },
        "settings": {
            "base_model": job.model.name_or_path,
            "adapter": str(run.adapter_dir),
            "method": job.adapter.method,
            "max_examples": settings.max_examples,
            "max_new_tokens": settings.max_new_tokens,
            "batch_size": settings.batch_size,
            "max_seq_len": job.data.max_seq_len,
            "device": str(target),
            "precision": precision,
        },
        "base": base_metrics,
        "finetuned": tuned_metrics,
        "delta": {
            key: tuned_metrics[key] - value
            for key, value in base_metrics.items()
            if isinstance(value, int | float) and isinstance(tuned_metrics.get(key), int | float)
        },
        "seconds": {"base": base_pass.seconds, "finetuned": tuned_pass.seconds},
    }


def add_baselines(
    report: dict[str, Any], task: str | None, baselines: list[Baseline], references: list[str] | None
) -> None:
    """Each baseline's task metrics on the same examples, how it was fitted, and the verdict against the best."""
    if task is None or references is None or not baselines:
        report["baselines"], report["baseline_methods"], report["verdict"], report["verdicts"] = {}, {}, None, []
        return
    report["baselines"] = {b.name: task_metrics(task, b.predictions, references) for b in baselines}
    report["baseline_methods"] = {b.name: b.how for b in baselines}
    report["verdict"] = verdict(task, report["finetuned"], report["baselines"])
    report["verdicts"] = output_verdicts(task, report["finetuned"], report["baselines"], references)


def resolve_settings(job: JobConfig, **overrides: Any) -> EvalSection:
    """The job's `eval:` section with the command line's values (those not None) on top, validated."""
    from pydantic import ValidationError

    values = job.eval.model_dump() | {key: value for key, value in overrides.items() if value is not None}
    if values.get("max_examples") == 0:
        values["max_examples"] = None  # --max-examples 0: every example
    try:
        return EvalSection.model_validate(values)
    except ValidationError as exc:
        problems = [Problem(f"eval.{'.'.join(map(str, e['loc']))}", e["msg"]) for e in exc.errors()]
        raise ConfigError("eval settings (the run's eval: section and the command line)", problems) from None


def choose_task(requested: str, data: EvalData) -> tuple[str | None, str]:
    references = data.references
    if references is None:
        return None, "text format: no answers to generate"
    if requested != "auto":
        return requested, "set"
    return detect_task(references), "detected"


def load_eval_base(job: JobConfig, device: Any) -> tuple[Any, str]:
    """The base in fp32 whatever the training precision (bf16 only made training faster), as training loaded it
    where `model.dtype` is set or quantized (on CUDA); unquantized fp32 where 4/8-bit cannot run."""
    import torch

    from lorafleet.model_loading import load_base_model_weights
    from lorafleet.training.model import quantization_config, weights_dtype

    model_cfg = job.model
    dtype = weights_dtype(model_cfg)
    precision = str(dtype).removeprefix("torch.")
    kwargs: dict[str, Any] = {}
    if model_cfg.quantization != "none":
        if device.type == "cuda":
            kwargs["quantization_config"] = quantization_config(model_cfg, device)
            kwargs["device_map"] = {"": device.index or 0}
            precision = f"{model_cfg.quantization} ({precision} compute)"
        else:
            dtype, precision = torch.float32, f"float32 (trained {model_cfg.quantization}; no CUDA here)"
    model = load_base_model_weights(
        model_cfg.name_or_path,
        revision=model_cfg.revision,
        dtype=dtype,
        trust_remote_code=model_cfg.trust_remote_code,
        **kwargs,
    )
    if not kwargs:
        model.to(device)
    model.eval()
    return model, precision


def stop_token_ids(tokenizer: Any, model: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, list) else {configured}
    return sorted(i for i in ids if i is not None)


def run_model(
    model: Any,
    tokenizer: Any,
    data: EvalData,
    settings: EvalSection,
    decodings: list[Decoding],
    source: AnswerSource,
    which: str,
    base_identity: dict[str, Any] | None,
) -> ModelPass:
    """Loss on every example, then each decoding's answers (the base's from the cache when it has them)."""
    started = time.monotonic()
    loss, scored = response_loss(model, data.examples, settings.batch_size, tokenizer.pad_token_id, which)
    prompts = [example.prompt_ids for example in data.examples]
    answers: dict[str, list[str]] = {}
    samples = None
    for decoding in decodings:
        if base_identity is not None:
            drawn, cached = cached_base_answers(
                base_identity, prompts, decoding, lambda d=decoding: source.answer(which, prompts, d)
            )
            if cached:
                print(f"base answers ({decoding.mode}): from the cache", file=sys.stderr, flush=True)
        else:
            drawn = source.answer(which, prompts, decoding)
        if decoding.mode == "sampled":
            samples = drawn
            answers[decoding.name] = [aggregate_answers(row, decoding.aggregate) for row in drawn]
        else:
            answers[decoding.name] = [row[0] for row in drawn]
    return ModelPass(
        loss=loss,
        perplexity=math.exp(loss) if loss < 700 else math.inf,
        generations=answers[decodings[0].name] if decodings else None,
        examples_sha256=examples_digest([data.examples[position] for position in scored]),
        seconds=round(time.monotonic() - started, 1),
        answers=answers,
        samples=samples,
    )


def response_loss(
    model: Any, examples: list[EvalExample], batch_size: int, pad_id: int, label: str
) -> tuple[float, list[int]]:
    """Mean cross-entropy over every response token of every example (token-weighted), and the positions of
    the examples it scored (sorted)."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from lorafleet.training.data import Collator

    collate = Collator(pad_id)
    device = next(model.parameters()).device
    total, tokens, scored = 0.0, 0, []
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    with torch.no_grad(), tqdm(total=len(examples), desc=f"loss {label}", unit="ex", file=sys.stderr) as bar:
        for chunk in batches(order, batch_size):
            batch = collate([{"input_ids": examples[i].input_ids, "labels": examples[i].labels} for i in chunk])
            input_ids = batch["input_ids"].to(device)
            logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
            logits = logits[:, -input_ids.shape[1] :]  # prompt tuning returns logits for its virtual tokens too
            targets = batch["labels"].to(device)[:, 1:]
            total += F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).item()
            tokens += int((targets != -100).sum())
            scored += chunk
            bar.update(len(chunk))
    return total / tokens, sorted(scored)


def pass_metrics(result: ModelPass, task: str | None, references: list[str] | None) -> dict[str, Any]:
    metrics: dict[str, Any] = {"loss": result.loss, "perplexity": result.perplexity}
    if task is not None and result.generations is not None and references is not None:
        metrics |= task_metrics(task, result.generations, references)
    return metrics


def generation_rows(
    data: EvalData, base: ModelPass, tuned: ModelPass, baselines: list[Baseline] = ()
) -> list[dict[str, Any]]:
    """One row per example: base and fine-tuned answers (first decoding), greedy ones beside a sampled first
    decoding, the k samples, and each baseline's answer."""
    rows = []
    for i, example in enumerate(data.examples):
        row = {
            "index": example.index,
            "location": example.location,
            "input": example.shown_input,
            "reference": example.reference,
            "base": base.generations[i] if base.generations else None,
            "finetuned": tuned.generations[i] if tuned.generations else None,
        }
        if tuned.samples is not None and "greedy" in tuned.answers:
            row |= {"base_greedy": base.answers["greedy"][i], "finetuned_greedy": tuned.answers["greedy"][i]}
            row |= {"base_samples": base.samples[i], "finetuned_samples": tuned.samples[i]}
        rows.append(row | {"baselines": {baseline.name: baseline.predictions[i] for baseline in baselines}})
    return rows


def add_beside(
    report: dict[str, Any], decodings: list[Decoding], passes: tuple[ModelPass, ModelPass], task, references
) -> None:
    """report["beside"]: the greedy answers' metrics next to a sampled first decoding (None otherwise)."""
    report["beside"] = None
    if len(decodings) < 2 or task is None or references is None:
        return
    name = decodings[1].name
    base, tuned = (task_metrics(task, p.answers[name], references) for p in passes)
    report["beside"] = {"decoding": name, "base": base, "finetuned": tuned}
