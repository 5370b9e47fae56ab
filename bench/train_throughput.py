"""Training throughput of `lorafleet train` (1 Ray worker) against a plain TRL `SFTTrainer` script, same run.

    .venv/bin/python bench/train_throughput.py               # tiny model: ~4 min on 2 busy cores, mostly start-up
    .venv/bin/python bench/train_throughput.py --model builtin:smollm2-135m-instruct --data builtin:price-completion \
        --format completion --max-seq-len 160 --micro-batch 8 --top-layers 10 --steps 30   # the demo's settings
    .venv/bin/python bench/train_throughput.py --repeats 3   # on a busy machine: the median of 3 rounds
    .venv/bin/python bench/train_throughput.py --precision fp32,bf16,auto --arms trl,lorafleet   # precisions

Four arms, run one after another (`--repeats` rounds, the median of each arm is reported):
- trl:             `trl.SFTTrainer` in a fresh process: TRL's default collator (pads to the longest example of
                   the batch), no packing; fp32 and no gradient checkpointing (TRL's defaults are bf16 and
                   checkpointing, so both are set off to match lorafleet's defaults). The process runs at the
                   niceness Ray gives its workers (15), so on a shared machine both arms compete for the CPU
                   alike with whatever else runs.
- lorafleet-all-logits: what `lorafleet train JOB.yaml --run-id ID` runs (`training.launcher.run_training`), in
                   a subprocess: embedded Ray, 1 worker with `--threads` CPUs, no packing, and the LM head at
                   every position as TRL computes it (`training.logits: all`).
- lorafleet:       the same with lorafleet's default `training.logits: labelled` (the LM head and the loss only
                   at positions whose next token is a label; the same loss and gradients).
- lorafleet+pack:  the same with `data.packing: true`.
`--arms` picks some of them; every arm runs at every `--precision` (default fp32): `training.precision` of the
job, and for TRL `bf16=True` (autocast over its fp32 model, TRL's own bf16) where the precision is or resolves to
bf16 on this machine. `auto` is resolved by lorafleet's own check (`lorafleet.precision`), printed first.
All arms train the same model and LoRA (r `--rank`, alpha 2 × r, dropout 0, all linear layers), on the same token ids
and loss labels (lorafleet's data pipeline tokenizes `--data`; TRL gets the result as a pre-tokenized
dataset), with the same micro batch, max_seq_len, optimizer, schedule, seed (so, unpacked, the same batches in
the same order), precision and torch threads.

Timing, the same in every arm: both frameworks log every step, and each log event records the wall time and
the trainer's count of non-padding input tokens (`include_num_input_tokens_seen="non_padding"`). lorafleet's are
read from the run's metrics.jsonl, TRL's from a callback doing the same. Throughput is counted between the log
events of step `--warmup` and the last step: data loading, forward, backward, optimizer step and each framework's
own per-step logging are inside; process and Ray start-up, model loading, tokenization, the warm-up steps and the
final checkpoint save are outside.

Model FLOPs utilisation (MFU): useful tok/s x the FLOPs a token needs (bench/model_flops.py) over this machine's
matmul rate in the arm's precision (fp32 or bf16) at the same thread count, measured in the same run first.

Useful tokens: non-padding tokens fed to the model, i.e. the tokens of real training examples (prompt and
response; the loss is on the response). Padding, which packing removes, is not counted. Unpacked, lorafleet and
TRL see the same batches, so their ratio is a pure speed ratio; packed, the ratio also counts the padding that
packing no longer computes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from model_flops import MATMUL_SIZE, matmul_rate, useful_flops_per_token  # bench/model_flops.py, beside this file
from train_report import report  # bench/train_report.py

from lorafleet.config import JobConfig
from lorafleet.precision import resolve_precision
from lorafleet.runs import RunFolder

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("LORAFLEET_HOME", str(REPO / ".cache" / "lorafleet"))

ARMS = ("trl", "lorafleet-all-logits", "lorafleet", "lorafleet+pack")
RAY_WORKER_NICENESS = 15  # Ray starts its workers at this niceness (RAY_worker_niceness); the TRL arm matches it
ARM_SETTINGS = {  # --set overrides of each lorafleet arm
    "lorafleet-all-logits": ("data.packing=false", "training.logits=all"),
    "lorafleet": ("data.packing=false",),
    "lorafleet+pack": ("data.packing=true",),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny-llama")
    parser.add_argument("--data", default="builtin:price", help="a data reference, as data.train takes it")
    parser.add_argument("--format", default="alpaca", help="data.format of --data")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per arm")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the timing")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the three arms (median reported)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (and Ray CPUs of the worker) in every arm"
    )
    parser.add_argument("--rows", type=int, default=1000, help="data.max_rows of --data")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (alpha: 2 x rank), all linear layers")
    parser.add_argument("--top-layers", type=int, help="LoRA in the last N decoder layers only (adapter.top_layers)")
    parser.add_argument("--precision", default="fp32", help="comma-separated: fp32, bf16, auto (every arm at each)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--trl-arm", metavar="JOB_YAML", help=argparse.SUPPRESS)  # internal: run the TRL arm
    args = parser.parse_args()
    if not 1 <= args.warmup < args.steps - 1:
        parser.error("--warmup must be in [1, --steps - 1)")
    args.precision, args.arms = args.precision.split(","), args.arms.split(",")
    if not set(args.precision) <= {"fp32", "bf16", "auto"}:
        parser.error("--precision: a comma-separated list of fp32, bf16 and auto")
    if not set(args.arms) <= set(ARMS):
        parser.error(f"--arms: a comma-separated list of {', '.join(ARMS)}")
    return args


def job_config(args: argparse.Namespace, storage: Path, precision: str = "fp32") -> dict:
    """The lorafleet job both arms train (the TRL arm reads its knobs from it)."""
    return {
        "name": "bench",
        "model": {"name_or_path": args.model},
        "adapter": {
            "method": "lora",
            "r": args.rank,
            "alpha": 2 * args.rank,
            "dropout": 0.0,
            "target_modules": "all-linear",
            "top_layers": args.top_layers,
        },
        "data": {
            "train": args.data if args.data.startswith("builtin:") else str(Path(args.data).resolve()),
            "format": args.format,
            "max_seq_len": args.max_seq_len,
            "val_split": 0,
            "max_rows": args.rows,
        },
        "training": {
            "max_steps": args.steps,
            "micro_batch_size": args.micro_batch,
            "learning_rate": 3e-4,
            "lr_scheduler": "constant",
            "precision": precision,
            "logging_steps": 1,
            "seed": 42,
        },
        "distributed": {"num_workers": 1, "resources_per_worker": {"CPU": args.threads}, "strategy": "ddp"},
        "storage": {"uri": str(storage)},
    }


def window(records: list[dict], warmup: int) -> dict:
    """Throughput between the log events of step `warmup` and the last step (one record per step).

    tokens_per_s: all tokens over all time in the window; step_tokens_per_s: the median of the steps' own
    rates, which a burst of other work on a shared machine moves less.
    """
    timed = sorted((record for record in records if record["step"] >= warmup), key=lambda record: record["step"])
    pairs = list(zip(timed, timed[1:], strict=False))
    step_tokens = [after["num_input_tokens_seen"] - before["num_input_tokens_seen"] for before, after in pairs]
    step_seconds = [after["time"] - before["time"] for before, after in pairs]
    seconds, tokens = sum(step_seconds), sum(step_tokens)
    return {
        "steps": len(pairs),
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "step_tokens_per_s": statistics.median(t / s for t, s in zip(step_tokens, step_seconds, strict=True)),
        "step_tokens": step_tokens,
    }


# --- lorafleet: the real `lorafleet train`, as a user runs it ---------------------------------------------------


# What `lorafleet train JOB --run-id ID --set KEY=VALUE` runs, without the CLI's argument parsing.
LORAFLEET_TRAIN = """
import sys
from lorafleet.config import load_job_config
from lorafleet.training.launcher import run_training
run_training(load_job_config(sys.argv[1], sys.argv[3:]), run_id=sys.argv[2])
"""


def run_lorafleet(job_path: Path, storage: Path, *, settings: tuple[str, ...], run_id: str, warmup: int) -> dict:
    command = [sys.executable, "-c", LORAFLEET_TRAIN, str(job_path), run_id, *settings]
    started = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=dict(os.environ))
    total = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"lorafleet train failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    run_dir = storage / "runs" / run_id
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [record for record in records if "loss" in record]  # one per step (logging_steps: 1)
    data = RunFolder(str(run_dir)).read_record().data.train
    return window(steps, warmup) | {"wall_s": total, "final_loss": steps[-1]["loss"], "data": data}


# --- TRL: a plain SFTTrainer script ---------------------------------------------------------------------------


def run_trl_subprocess(job_path: Path, out: Path, *, warmup: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--trl-arm", str(job_path), "--warmup", str(warmup)]
    started = time.monotonic()
    env = {**os.environ, "BENCH_OUT": str(out)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    total = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(f"TRL arm failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(out.read_text()) | {"wall_s": total}


def counting_padding(collate, padded: dict[str, int]):
    """`collate`, counting into `padded` how much of each batch is padding; the batch itself is unchanged."""

    def collate_and_count(features):
        batch = collate(features)
        padded["slots"] += batch["attention_mask"].numel()
        padded["tokens"] += int(batch["attention_mask"].sum())
        return batch

    return collate_and_count


def sft_config(job) -> object:
    """TRL's SFTConfig at the job's settings (and lorafleet's precision and checkpointing, not TRL's defaults)."""
    from trl import SFTConfig

    training = job.training
    return SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        max_steps=training.max_steps,
        per_device_train_batch_size=training.micro_batch_size,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.lr_scheduler,
        max_length=job.data.max_seq_len,
        bf16=resolve_precision(training.precision).name == "bf16",  # the job's precision (TRL's default: bf16)
        gradient_checkpointing=False,  # TRL's default is on; lorafleet's is off
        logging_steps=training.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=training.seed,
        data_seed=training.seed,
        use_cpu=True,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )


def trl_arm(job_path: Path, threads: int, warmup: int) -> dict:
    """Runs in its own process: SFTTrainer on lorafleet's token ids, timed like lorafleet's ProgressReporter."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    from lorafleet.config import JobConfig
    from lorafleet.models import resolve_model
    from lorafleet.training.adapters import resolve_target_modules, top_layer_indices
    from lorafleet.training.data import build_datasets

    torch.set_num_threads(threads)
    os.nice(int(os.environ.get("RAY_worker_niceness", RAY_WORKER_NICENESS)))  # compete for CPU as a Ray worker does
    job = JobConfig.model_validate(yaml.safe_load(job_path.read_text()))
    model_dir = resolve_model(job.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = build_datasets(job.data, tokenizer, seed=job.training.seed).train.examples
    dataset = Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])

    records: list[dict] = []

    class LogTimes(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                records.append(
                    {
                        "step": state.global_step,
                        "time": time.time(),
                        "num_input_tokens_seen": state.num_input_tokens_seen,
                        "loss": logs["loss"],
                    }
                )

    padded, config = {"slots": 0, "tokens": 0}, sft_config(job)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    adapter = job.adapter
    peft_config = LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=resolve_target_modules(adapter, model),  # all linear layers, as a list PEFT can restrict
        layers_to_transform=top_layer_indices(adapter, model),  # the same layers as lorafleet's arms
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[LogTimes()],
    )
    trainer.data_collator = counting_padding(trainer.data_collator, padded)
    trainer.train()
    padding_share = 1 - padded["tokens"] / padded["slots"]
    return window(records, warmup) | {"final_loss": records[-1]["loss"], "padding_share": padding_share}


# --- the report -------------------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    if args.trl_arm:
        job = yaml.safe_load(Path(args.trl_arm).read_text())
        threads = int(job["distributed"]["resources_per_worker"]["CPU"])
        result = trl_arm(Path(args.trl_arm), threads, args.warmup)
        Path(os.environ["BENCH_OUT"]).write_text(json.dumps(result))
        return

    from lorafleet.demo_data import resolve_builtin_dataset
    from lorafleet.models import resolve_model

    resolve_model(args.model)  # built or converted once, outside every timed region
    if args.data.startswith("builtin:"):
        resolve_builtin_dataset(args.data)
    resolved = {name: resolve_precision(name).name for name in args.precision}
    print(resolve_precision("auto").describe(), file=sys.stderr)
    peaks = {name: matmul_rate(args.threads, name) for name in set(resolved.values())}
    for name, peak in peaks.items():
        print(f"{name} matmul ({MATMUL_SIZE}³, {args.threads} thread(s)): {peak / 1e9:.1f} GFLOP/s", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        storage = Path(scratch) / "storage"
        flops_per_token = useful_flops_per_token(JobConfig.model_validate(job_config(args, storage)))
        results: dict[tuple[str, str], list[dict]] = {(arm, p): [] for p in args.precision for arm in args.arms}
        for round_ in range(args.repeats):
            for arm, precision in results:
                job_path = Path(scratch) / f"job-{precision}.yaml"
                job_path.write_text(yaml.safe_dump(job_config(args, storage, precision), sort_keys=False))
                print(f"round {round_ + 1}/{args.repeats}: {arm} {precision} ...", file=sys.stderr, flush=True)
                results[arm, precision].append(run_arm(arm, job_path, storage, Path(scratch), f"{precision}-{round_}",
                                                       args.warmup))  # fmt: skip
    report(args, results, peaks={p: peaks[resolved[p]] for p in args.precision}, flops_per_token=flops_per_token)


def run_arm(arm: str, job_path: Path, storage: Path, scratch: Path, tag: str, warmup: int) -> dict:
    if arm == "trl":
        result = run_trl_subprocess(job_path, scratch / f"trl-{tag}.json", warmup=warmup)
    else:
        run_id = f"bench-{arm.replace('+', '-')}-{tag}"
        result = run_lorafleet(job_path, storage, settings=ARM_SETTINGS[arm], run_id=run_id, warmup=warmup)
    rate, timed, wall = result["tokens_per_s"], result["seconds"], result["wall_s"]
    print(f"  {rate:,.0f} tok/s over {timed:.1f}s; {wall:.0f}s in all", file=sys.stderr, flush=True)
    return result


if __name__ == "__main__":
    main()
