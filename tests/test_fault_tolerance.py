"""Fault tolerance on a real embedded Ray: 2 CPU workers, one of them SIGKILLed mid-run.

- max_failures: 1 -> Ray restarts the worker group from the last checkpoint and the run completes; its final
  loss matches an uninterrupted run with the same seed; metrics.jsonl shows the restart (`train_begin`,
  `resumed: true`, at the checkpoint's step).
- SIGTERM to a worker (a pod's eviction, a spot reclaim) -> a checkpoint of the step it is at, and the restarted
  group resumes from that step, not from the last periodic checkpoint.
- max_failures: 0 -> the run fails cleanly (exit code, run.json). `lorafleet train CONFIG --resume RUN_ID`
  then continues it from its last complete checkpoint (a stray, incomplete checkpoint folder is ignored) and
  completes. This pair runs DeepSpeed ZeRO-2, so sharded optimizer state from both workers comes back too.

Every run is the real CLI in a subprocess; the worker to kill is found among that subprocess's descendants only.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import psutil
import pytest

from tests.helpers import CONFIGS
from tests.run_watch import final_loss, read_metrics, registered_checkpoint_steps, run, train_workers

pytestmark = pytest.mark.slow

STEPS, SAVE_EVERY = 40, 4


def train_command(storage: Path, run_id: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-c", "from lorafleet.cli import main; main()",
        "train", str(CONFIGS / "tiny.yaml"), "--run-id", run_id,
        "--set", f"storage.uri={storage}", "--set", f"training.max_steps={STEPS}",
        "--set", f"training.save_steps={SAVE_EVERY}", "--set", "training.seed=7", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fault-storage")


@pytest.fixture(scope="module")
def uninterrupted(storage: Path) -> Path:
    result, _ = run(train_command(storage, "straight"), storage / "runs" / "straight")
    assert result.returncode == 0, result.stdout[-4000:]
    return storage / "runs" / "straight"


@pytest.fixture(scope="module")
def recovered(storage: Path) -> tuple[Path, int]:
    run_dir = storage / "runs" / "killed"
    command = train_command(storage, "killed", "--set", "distributed.max_failures=1")
    result, killed = run(command, run_dir, kill=True)
    assert killed is not None, "the run ended before a worker could be killed: " + result.stdout[-3000:]
    assert result.returncode == 0, result.stdout[-5000:]
    return run_dir, killed


def test_killed_worker_is_replaced_and_the_run_completes(recovered: tuple[Path, int]) -> None:
    run_dir, killed = recovered
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["status"] == "succeeded" and summary["global_step"] == STEPS
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not psutil.pid_exists(killed) or psutil.Process(killed).status() == psutil.STATUS_ZOMBIE


def test_metrics_show_the_restart_from_the_last_checkpoint(recovered: tuple[Path, int]) -> None:
    run_dir, _ = recovered
    records = read_metrics(run_dir)
    begins = [record for record in records if record.get("event") == "train_begin"]
    assert [begin["resumed"] for begin in begins] == [False, True], begins
    resumed_at = begins[1]["step"]
    assert resumed_at > 0 and resumed_at % SAVE_EVERY == 0, begins
    logged_after_restart = [record["step"] for record in records[records.index(begins[1]) :] if "loss" in record]
    assert logged_after_restart == list(range(resumed_at + 1, STEPS + 1))
    assert (run_dir / "report" / "loss.png").is_file()


def test_recovered_run_ends_where_an_uninterrupted_run_ends(recovered: tuple[Path, int], uninterrupted: Path) -> None:
    run_dir, _ = recovered
    straight, resumed = final_loss(uninterrupted, STEPS), final_loss(run_dir, STEPS)
    assert resumed == pytest.approx(straight, rel=0.02), (resumed, straight)


@pytest.fixture(scope="module")
def sigtermed(storage: Path) -> dict:
    """A run whose only periodic checkpoint is its last step; one worker gets SIGTERM past step 5."""
    run_dir = storage / "runs" / "sigterm"
    command = train_command(
        storage, "sigterm", "--set", "distributed.max_failures=1", "--set", f"training.save_steps={STEPS}"
    )
    seen: dict = {"checkpoints": set()}

    def signal_then_watch() -> bool:
        seen["checkpoints"].update(registered_checkpoint_steps(run_dir))
        if "pid" not in seen:
            steps = [record["step"] for record in read_metrics(run_dir) if "loss" in record]
            workers = train_workers(psutil.Process(seen["driver"])) if "driver" in seen else []
            if steps and max(steps) >= 5 and len(workers) == 2:
                seen["pid"], seen["step"] = workers[-1].pid, max(steps)
                os.kill(seen["pid"], signal.SIGTERM)
            return False
        return any(record.get("resumed") for record in read_metrics(run_dir))

    result, _ = run(command, run_dir, watch=signal_then_watch, on_start=lambda pid: seen.update(driver=pid))
    assert "pid" in seen, "the run ended before a worker could be signalled: " + result.stdout[-3000:]
    return {"run_dir": run_dir, "result": result, **seen}


def test_sigterm_checkpoints_the_current_step_and_the_run_resumes_from_it(sigtermed: dict, uninterrupted: Path):
    run_dir, result = sigtermed["run_dir"], sigtermed["result"]
    assert result.returncode == 0, result.stdout[-5000:]
    preempted = [record for record in read_metrics(run_dir) if record.get("event") == "preempted"]
    assert len(preempted) == 1 and preempted[0]["reason"].startswith("SIGTERM to worker rank"), preempted
    step = preempted[0]["step"]
    # The step boundary after the signal: the step logged when it was sent, or the one in flight then.
    assert sigtermed["step"] <= step <= sigtermed["step"] + 2, (sigtermed["step"], step)
    assert step in sigtermed["checkpoints"] and step % STEPS != 0, sigtermed["checkpoints"]
    begins = [record for record in read_metrics(run_dir) if record.get("event") == "train_begin"]
    assert [(begin["resumed"], begin["step"]) for begin in begins] == [(False, 0), (True, step)], begins
    assert f"checkpointing step {step}" in result.stdout
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["status"] == "succeeded" and summary["global_step"] == STEPS
    assert not psutil.pid_exists(sigtermed["pid"]) or psutil.Process(sigtermed["pid"]).status() == "zombie"
    assert final_loss(run_dir, STEPS) == pytest.approx(final_loss(uninterrupted, STEPS), rel=0.02)


@pytest.fixture(scope="module")
def failed_then_resumed(storage: Path) -> dict:
    run_dir = storage / "runs" / "no-retries"
    deepspeed = ("--set", "distributed.strategy=deepspeed", "--set", "distributed.deepspeed.stage=2")
    command = train_command(storage, "no-retries", "--set", "distributed.max_failures=0", *deepspeed)
    failed, killed = run(command, run_dir, kill=True)
    assert killed is not None, failed.stdout[-3000:]
    failed_summary = json.loads((run_dir / "run.json").read_text())
    checkpoints_before = sorted(path.name for path in (run_dir / "checkpoints").glob("checkpoint_*"))
    # A checkpoint folder that a crash left half-written (no trainer state, never reported to Ray).
    stray = run_dir / "checkpoints" / "checkpoint_2099-01-01_00-00-00.000000"
    stray.mkdir()
    (stray / "adapter_config.json").write_text("{}")
    resume = [sys.executable, "-c", "from lorafleet.cli import main; main()", "train", str(CONFIGS / "tiny.yaml"),
              "--set", f"storage.uri={storage}", "--resume", "no-retries"]  # fmt: skip
    resumed, _ = run(resume, run_dir)
    return {
        "run_dir": run_dir, "failed": failed, "failed_summary": failed_summary,
        "checkpoints_before": checkpoints_before, "resumed": resumed,
    }  # fmt: skip


def test_max_failures_0_fails_cleanly(failed_then_resumed: dict) -> None:
    failed = failed_then_resumed["failed"]
    assert failed.returncode not in (0, None), failed.stdout[-3000:]
    assert "failed" in failed.stdout and "Traceback (most recent call last)" not in failed.stdout[-1500:]
    assert failed_then_resumed["failed_summary"]["status"] == "failed"
    assert failed_then_resumed["checkpoints_before"], "no checkpoint was reported before the kill"


def test_resume_continues_the_failed_run_from_its_last_complete_checkpoint(failed_then_resumed: dict) -> None:
    run_dir, resumed = failed_then_resumed["run_dir"], failed_then_resumed["resumed"]
    assert resumed.returncode == 0, resumed.stdout[-5000:]
    assert "(resuming)" in resumed.stdout
    summary = json.loads((run_dir / "run.json").read_text())
    assert summary["status"] == "succeeded" and summary["global_step"] == STEPS
    begins = [record for record in read_metrics(run_dir) if record.get("event") == "train_begin"]
    assert len(begins) == 2 and begins[1]["resumed"] and begins[1]["step"] % SAVE_EVERY == 0, begins
    assert begins[1]["step"] >= SAVE_EVERY
    assert json.loads((run_dir / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run_dir / "adapter" / "latest").exists()  # DeepSpeed's resume pointer stays in the checkpoint
