"""`lorafleet eval RUN`: base vs fine-tuned on the run's held-out data; the report goes to <run>/report/.

    lorafleet eval price-20250101-120000 --max-examples 100
    lorafleet eval /mnt/shared/runs/price-20250101-120000 --split test --task numeric --batch-size 16

Defaults come from the run's `eval:` config section; options given here win.
"""

from __future__ import annotations

import typer

from lorafleet.cli.merge import RunArg, StorageOption


def evaluate(
    run: str = RunArg,
    storage: str = StorageOption,
    split: str = typer.Option(
        None, "--split", help="val: data.eval, else the run's seeded holdout of train; test: train's test file."
    ),
    max_examples: int = typer.Option(
        None, "--max-examples", min=0, help="Evaluate the first N examples (0: all). Default: eval.max_examples."
    ),
    batch_size: int = typer.Option(None, "--batch-size", min=1, help="Examples per forward/generate call."),
    max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1, help="Generation budget per answer."),
    task: str = typer.Option(None, "--task", help="auto | numeric | classification | text (default: auto-detect)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)."),
    decoding: str = typer.Option(
        None, "--decoding", help="auto | greedy | sampled (k answers per example, aggregated; shown beside greedy)."
    ),
    samples: int = typer.Option(None, "--samples", min=2, help="Sampled decoding: answers per example (k)."),
    temperature: float = typer.Option(None, "--temperature", help="Sampled decoding: temperature."),
    seed: int = typer.Option(None, "--seed", min=0, help="Sampled decoding: seed."),
    aggregate: str = typer.Option(
        None, "--aggregate", help="Sampled decoding: median | geometric_mean | mean (numbers), majority (labels)."
    ),
    compare: str = typer.Option(
        None, "--compare", help="fp32,int8,int4,gptq-w4a16,w8a8: the merged run quantized each way, side by side."
    ),
) -> None:
    """Compare the base model and the fine-tuned adapter: loss, perplexity, task metrics, plots."""
    from lorafleet.cli.eval_answers import EngineAnswersForEval
    from lorafleet.runs import REPORT_DIR, open_run, push_run_part
    from lorafleet.training.evaluate import evaluate_run, resolve_settings
    from lorafleet.training.evaluate_report import summary_lines

    folder = open_run(run, storage)
    settings = resolve_settings(
        folder.job,
        split=split,
        max_examples=max_examples,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        task=task,
        decoding=decoding,
        samples=samples,
        temperature=temperature,
        seed=seed,
        aggregate=aggregate,
    )
    if compare or settings.compare:
        _compare(folder, settings, compare or settings.compare)
        return
    engine_answers = EngineAnswersForEval()
    try:
        outcome = evaluate_run(folder, settings, device=device, engine_answers=engine_answers)
    finally:
        engine_answers.close()
    push_run_part(folder.path, REPORT_DIR)
    typer.echo("\n".join(summary_lines(outcome.report)))
    typer.echo(f"report {folder.report_dir / 'eval.md'}")


def _compare(folder, settings, variants) -> None:
    from lorafleet.cli.quantization_probe import measure_in_child
    from lorafleet.runs import REPORT_DIR, push_run_part
    from lorafleet.training.evaluate_quantization import compare_quantizations, parse_variants, write_comparison

    report = compare_quantizations(folder, settings, parse_variants(variants), measure_in_child)
    files = write_comparison(folder.report_dir, report)
    push_run_part(folder.path, REPORT_DIR)
    for name, row in report["variants"].items():
        typer.echo(
            f"{name:>11}: perplexity {row['perplexity']:.4g} ({row['perplexity_ratio']:.4f}x), decode "
            f"{row['decode_tokens_per_s']:.1f} tok/s ({row['decode_speedup']:.2f}x), weights {row['weights_mb']:.1f} MB"
        )
    typer.echo(f"report {files[1]}")
