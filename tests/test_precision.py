"""`precision: auto`: the CPU's bf16 verdict (capability check + timed matmul, cached per machine), forced both ways,
and what training does with it: bf16 autocast over a bf16 frozen base with fp32 trainable parameters and optimizer
state, a loss curve that agrees with fp32, the choice recorded, and ranks that disagree taking the lowest.
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import pytest
import torch

from lorafleet import precision
from tests.test_methods import single_thread, tiny_job, train_in_process  # noqa: F401 (autouse fixture)


@pytest.fixture
def verdict_cache(tmp_path: Path, monkeypatch):
    """A fresh cache folder and no override: the real check runs."""
    monkeypatch.setenv("LORAFLEET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(precision.OVERRIDE_VARIABLE, raising=False)
    precision.cpu_bf16.cache_clear()
    yield tmp_path / "home" / "machine"
    precision.cpu_bf16.cache_clear()


def force_cpu_bf16(monkeypatch, native: bool) -> None:
    monkeypatch.setenv(precision.OVERRIDE_VARIABLE, "1" if native else "0")
    precision.cpu_bf16.cache_clear()


# ---- the verdict ---------------------------------------------------------------------------------------------


def test_an_explicit_precision_always_wins(monkeypatch) -> None:
    for native in (True, False):
        force_cpu_bf16(monkeypatch, native)
        for name in ("fp32", "bf16"):
            assert precision.resolve_precision(name, "cpu").name == name
    with pytest.raises(ValueError, match="use one of auto, fp32, bf16, fp16"):
        precision.resolve_precision("int8")


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_follows_the_cpu_verdict_both_ways(monkeypatch, native: bool, expected: str) -> None:
    force_cpu_bf16(monkeypatch, native)
    chosen = precision.resolve_precision("auto", "cpu")
    assert chosen.name == expected and chosen.dtype == precision.TORCH_DTYPES[expected]
    assert chosen.describe().startswith(f"precision auto -> {expected}: LORAFLEET_CPU_BF16=")


def test_the_real_check_measures_once_and_caches_per_machine(verdict_cache: Path, monkeypatch) -> None:
    verdict = precision.cpu_bf16()
    assert verdict.bf16_gflops and verdict.fp32_gflops, verdict  # oneDNN has bf16 on every CPU CI runs on
    assert verdict.native == (verdict.bf16_gflops >= precision.MIN_SPEEDUP * verdict.fp32_gflops)
    assert f"bf16 matmul {verdict.bf16_gflops:.0f} GFLOP/s" in verdict.reason
    [cached] = verdict_cache.glob("cpu-bf16-*.json")
    assert json.loads(cached.read_text())["native"] == verdict.native

    def no_measuring(*_args):
        raise AssertionError("measured again although the verdict was cached")

    monkeypatch.setattr(precision, "measure_cpu_bf16", no_measuring)
    precision.cpu_bf16.cache_clear()
    assert precision.cpu_bf16() == verdict
    assert precision.resolve_precision("auto").name == ("bf16" if verdict.native else "fp32")


def test_emulated_bf16_is_not_native(verdict_cache: Path, monkeypatch) -> None:
    """oneDNN accepts bf16 on AVX-512 CPUs without the BF16 extension; the timing says it does not pay there."""
    monkeypatch.setattr(precision, "matmul_gflops", lambda dtype, size: 50.0 if dtype == torch.bfloat16 else 60.0)
    verdict = precision.measure_cpu_bf16()
    assert not verdict.native and "emulated" in verdict.reason
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    verdict = precision.measure_cpu_bf16()
    assert not verdict.native and verdict.reason == "oneDNN reports no bf16 support on this CPU"


def test_an_unwritable_cache_costs_only_the_measurement(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "machine").write_text("a file where the folder would go")
    monkeypatch.setenv("LORAFLEET_HOME", str(home))
    monkeypatch.delenv(precision.OVERRIDE_VARIABLE, raising=False)
    monkeypatch.setattr(precision, "matmul_gflops", lambda dtype, size: 200.0 if dtype == torch.bfloat16 else 90.0)
    precision.cpu_bf16.cache_clear()
    try:
        assert precision.cpu_bf16().native
    finally:
        precision.cpu_bf16.cache_clear()


# ---- training ------------------------------------------------------------------------------------------------


def train_losses(tmp_path: Path, monkeypatch, native: bool, name: str) -> tuple[list[float], object]:
    force_cpu_bf16(monkeypatch, native)
    job = tiny_job(tmp_path / name, name=name, training={"max_steps": 30, "precision": "auto"})
    trainer, _ = train_in_process(job, tmp_path / name)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry], trainer


def test_auto_trains_bf16_over_fp32_master_weights_and_matches_fp32(tmp_path: Path, monkeypatch) -> None:
    bf16_losses, trainer = train_losses(tmp_path, monkeypatch, True, "native")
    assert trainer.args.bf16 and not trainer.args.fp16
    frozen = {p.dtype for p in trainer.model.parameters() if not p.requires_grad}
    trainable = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    moments = [state["exp_avg"].dtype for state in trainer.optimizer.state.values()]
    assert moments and set(moments) == {torch.float32}

    fp32_losses, reference = train_losses(tmp_path, monkeypatch, False, "emulated")
    assert not reference.args.bf16
    assert {p.dtype for p in reference.model.parameters()} == {torch.float32}  # exactly as before auto
    assert len(bf16_losses) == len(fp32_losses) == 30
    assert all(math.isfinite(loss) for loss in bf16_losses)
    assert abs(bf16_losses[-1] - fp32_losses[-1]) <= 0.01 * fp32_losses[-1], (bf16_losses, fp32_losses)
    assert max(abs(a - b) for a, b in zip(bf16_losses, fp32_losses, strict=True)) <= 0.02 * fp32_losses[0]

    begin = [json.loads(line) for line in (tmp_path / "native" / "run" / "metrics.jsonl").read_text().splitlines()]
    [record] = [r for r in begin if r.get("event") == "train_begin"]
    assert record["precision"]["requested"] == "auto" and record["precision"]["name"] == "bf16"


def _resolve_in_rank(rank: int, port: int, natives: list[bool], results) -> None:
    import os

    import torch.distributed as dist

    from lorafleet.config import JobConfig
    from lorafleet.training.model import with_resolved_precision

    os.environ[precision.OVERRIDE_VARIABLE] = "1" if natives[rank] else "0"
    precision.cpu_bf16.cache_clear()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(natives))
    job = JobConfig.model_validate(
        {"name": "r", "model": {"name_or_path": "builtin:tiny-llama"}, "data": {"train": "builtin:price"}}
    )
    resolved_job, chosen = with_resolved_precision(job, torch.device("cpu"))
    results.put((rank, resolved_job.training.precision, chosen.reason))
    dist.destroy_process_group()


def test_ranks_that_disagree_all_take_the_lowest() -> None:
    """Two ranks, one CPU with native bf16 and one without: both train fp32, and the bf16 one says why."""
    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    workers = [context.Process(target=_resolve_in_rank, args=(rank, port, [True, False], results)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    answers = dict((rank, (name, reason)) for rank, name, reason in (results.get(), results.get()))
    assert answers[0][0] == answers[1][0] == "fp32"
    assert "another worker's device resolved auto to fp32 (this one: bf16)" in answers[0][1]
