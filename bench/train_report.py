"""The table and ratios `bench/train_throughput.py` prints: every arm at every precision, MFU in that precision."""

from __future__ import annotations

import argparse

from model_flops import MATMUL_SIZE  # bench/model_flops.py, beside this file

GOALS = {"lorafleet": 1.3, "lorafleet+pack": 1.5}  # arm / trl at the same precision
AUTO_GOAL, AUTO_LOSS_GOAL = 1.6, 0.01  # lorafleet auto / fp32 tok/s (on a CPU with native bf16); final loss


def middle(runs: list[dict]) -> dict:
    """The median round by tokens/s."""
    return sorted(runs, key=lambda run: run["tokens_per_s"])[len(runs) // 2]


def report(
    args: argparse.Namespace,
    results: dict[tuple[str, str], list[dict]],
    *,
    peaks: dict[str, float],
    flops_per_token: float,
) -> None:
    chosen = {key: middle(runs) for key, runs in results.items()}
    describe_data(args, chosen)
    header = (
        f"{'arm':<22}{'precision':>10}{'useful tok/s':>13}{'median step':>13}{'MFU':>7}{'s/step':>8}"
        f"{'tok/step':>10}{'timed s':>9}{'wall s':>8}{'loss':>8}"
    )
    print(header)
    print("-" * len(header))
    for (arm, precision), run in chosen.items():
        mfu = run["tokens_per_s"] * flops_per_token / peaks[precision]
        print(
            f"{arm:<22}{precision:>10}{run['tokens_per_s']:>13,.0f}{run['step_tokens_per_s']:>13,.0f}{mfu:>7.1%}"
            f"{run['seconds'] / run['steps']:>8.3f}{run['tokens'] / run['steps']:>10,.0f}"
            f"{run['seconds']:>9.1f}{run['wall_s']:>8.1f}{run['final_loss']:>8.3f}"
        )
    rates = ", ".join(f"{precision} {peak / 1e9:.1f}" for precision, peak in peaks.items())
    print(
        f"\nMFU = useful tok/s x {flops_per_token / 1e6:,.0f} MFLOP per token (what the loss and the LoRA gradients"
        f"\n  need, from the model's shapes) / the machine's {MATMUL_SIZE}^3 matmul rate in the arm's precision, "
        f"{args.threads} thread(s),\n  measured in this run (GFLOP/s: {rates})"
    )
    print(
        "\nuseful tokens = non-padding input tokens: the prompt and response tokens of real examples (the loss is on"
        "\n  the responses); padding is not counted. useful tok/s = useful tokens / timed s; median step = the"
        "\n  median of the steps' own rates (less moved by other processes' bursts on a shared machine)."
        f"\ntimed s = from the log event of step {args.warmup} to that of step {args.steps}: data loading, forward,"
        "\n  backward, optimizer and per-step logging; NOT process or Ray start-up, model loading, tokenization, the"
        f"\n  {args.warmup} warm-up steps or the final checkpoint save (wall s, the whole process, includes them).\n"
    )
    print_ratios(chosen)


def describe_data(args: argparse.Namespace, chosen: dict[tuple[str, str], dict]) -> None:
    lorafleet = [run for (arm, _), run in chosen.items() if arm != "trl"]
    data = lorafleet[0]["data"] if lorafleet else None
    described = f" ({data['examples']} examples, {data['tokens']:,} tokens)" if data else ""
    print(
        f"model {args.model}, data {args.data}{described}, micro batch {args.micro_batch}, max_seq_len "
        f"{args.max_seq_len}, {args.threads} torch thread(s) per arm, {args.steps} steps of which the first "
        f"{args.warmup} are not timed, {args.repeats} round(s)"
    )
    for precision in args.precision:
        trl, unpacked = chosen.get(("trl", precision)), chosen.get(("lorafleet", precision))
        if trl and unpacked:
            same = unpacked["step_tokens"] == trl["step_tokens"]
            print(
                f"{precision}: unpacked batches {trl['padding_share']:.1%} padding (TRL's collator); lorafleet and "
                f"TRL saw the same tokens in every timed step: {'yes' if same else 'NO'}"
            )
        packed = chosen.get(("lorafleet+pack", precision))
        if packed:
            print(
                f"{precision}: packed {packed['data']['sequences']} sequences from {packed['data']['examples']} "
                f"examples, {packed['data']['packing_efficiency']:.1%} of their max_seq_len slots hold tokens"
            )
    print()


def print_ratios(chosen: dict[tuple[str, str], dict]) -> None:
    for (arm, precision), run in chosen.items():
        trl = chosen.get(("trl", precision))
        if arm == "trl" or trl is None:
            continue
        ratio = run["tokens_per_s"] / trl["tokens_per_s"]
        step_ratio = run["step_tokens_per_s"] / trl["step_tokens_per_s"]
        what = "useful tokens/s" if arm.endswith("+pack") else "tokens/s"
        goal = GOALS.get(arm)
        verdict = "" if goal is None else f"; goal >= {goal:.1f}x: {'met' if ratio >= goal else 'MISSED'}"
        print(f"{arm} / trl at {precision}, {what}: {ratio:.2f}x (median step: {step_ratio:.2f}x){verdict}")
    for (arm, precision), run in chosen.items():
        fp32 = chosen.get((arm, "fp32"))
        if precision == "fp32" or fp32 is None or arm == "trl":
            continue
        ratio = run["tokens_per_s"] / fp32["tokens_per_s"]
        loss_gap = abs(run["final_loss"] - fp32["final_loss"]) / fp32["final_loss"]
        verdict = ""
        if precision == "auto":
            met = ratio >= AUTO_GOAL and loss_gap <= AUTO_LOSS_GOAL
            verdict = f"; goal >= {AUTO_GOAL}x and loss within {AUTO_LOSS_GOAL:.0%}: {'met' if met else 'MISSED'}"
        print(f"{arm} {precision} / fp32: {ratio:.2f}x tokens/s, final loss {loss_gap:.2%} apart{verdict}")
