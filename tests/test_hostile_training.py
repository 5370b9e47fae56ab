"""Training faults: a SIGKILLed `lorafleet train` takes its embedded Ray with it, and a resume removes the
checkpoint folder the killed run never committed. A real embedded Ray cluster on this machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lorafleet.training.launcher import prune_uncommitted_checkpoints
from tests.helpers import CONFIGS, REPO, run_cli


def _checkpoints(tmp_path: Path, committed: list[str], present: list[str], snapshot: str | None = "") -> Path:
    folder = tmp_path / "checkpoints"
    for name in present:
        (folder / name).mkdir(parents=True)
        (folder / name / "adapter_model.safetensors").write_bytes(b"x")
    folder.mkdir(exist_ok=True)
    if snapshot is not None:
        text = snapshot or json.dumps({"checkpoint_results": [{"checkpoint_dir_name": name} for name in committed]})
        (folder / "checkpoint_manager_snapshot.json").write_text(text)
    return folder


PRUNE_CASES = {
    "one uncommitted": (["checkpoint_a"], ["checkpoint_a", "checkpoint_b"], "", ["checkpoint_b"]),
    "all committed": (["checkpoint_a", "checkpoint_b"], ["checkpoint_a", "checkpoint_b"], "", []),
    "killed before the first commit": ([], ["checkpoint_a"], None, ["checkpoint_a"]),
    "unreadable snapshot: nothing deleted": ([], ["checkpoint_a"], "{torn", []),
}


@pytest.mark.parametrize("case", list(PRUNE_CASES))
def test_resume_prunes_only_checkpoints_ray_never_committed(tmp_path: Path, case: str) -> None:
    committed, present, snapshot, removed = PRUNE_CASES[case]
    folder = _checkpoints(tmp_path, committed, present, snapshot)
    assert prune_uncommitted_checkpoints(folder) == removed
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(set(present) - set(removed))


def _descendants(pid: int) -> dict[int, str]:
    try:
        return {child.pid: child.name() for child in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return {}


def _alive(pids) -> list[int]:
    return [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_a_sigkilled_driver_takes_its_ray_with_it_and_the_resume_prunes(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    command = [sys.executable, "-m", "lorafleet", "train", str(CONFIGS / "tiny.yaml"), "--run-id", "killed-1"]
    command += ["--set", f"storage.uri={storage}", "--set", "training.max_steps=60", "--set", "training.save_steps=5"]
    driver = subprocess.Popen(
        command,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: dict[int, str] = {}
    assert driver.stdout is not None
    for line in driver.stdout:  # wait until it is training, remembering every process it started
        seen |= _descendants(driver.pid)
        if "step 12/60" in line:
            break
    seen |= _descendants(driver.pid)
    assert any("DashboardAgent" in name or "raylet" in name for name in seen.values()), seen
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 30
    while _alive(seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _alive(seen) == [], {pid: seen[pid] for pid in _alive(seen)}

    checkpoints = storage / "runs" / "killed-1" / "checkpoints"
    (checkpoints / "checkpoint_2099-01-01_00-00-00.000000").mkdir(parents=True)  # a save the kill cut short
    resumed = run_cli(
        "train", str(CONFIGS / "tiny.yaml"), "--set", f"storage.uri={storage}", "--resume", "killed-1", timeout=900
    )
    assert "removed checkpoint_2099-01-01_00-00-00.000000" in resumed.stdout, resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_run_stops_cleanly_as_stopped_and_resumes(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGTERM (a pod's eviction) and SIGINT (Ctrl-C): one line saying how to resume, exit 128 + signal, run.json
    `stopped`, no traceback or native stack; `--resume` then finishes the run from its last checkpoint."""
    storage = tmp_path / "storage"
    command = [sys.executable, "-m", "lorafleet", "train", str(CONFIGS / "tiny.yaml"), "--run-id", "signalled-1"]
    command += ["--set", f"storage.uri={storage}", "--set", "training.max_steps=40", "--set", "training.save_steps=5"]
    driver = subprocess.Popen(
        command, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert driver.stdout is not None
    for line in driver.stdout:  # wait until a checkpoint was committed and training goes on
        if "step 8/40" in line:
            break
    driver.send_signal(sig)
    try:
        out, err = driver.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        driver.kill()
        pytest.fail(f"{sig.name} did not stop the run within 120 s")
    assert driver.returncode == 128 + sig, (driver.returncode, err[-3000:])
    assert f"stopped by {sig.name}; resume it with `lorafleet train --resume signalled-1`" in err, err[-3000:]
    assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
    record = json.loads((storage / "runs" / "signalled-1" / "run.json").read_text())
    assert record["status"] == "stopped" and sig.name in record["error"]

    resumed = run_cli(
        "train", str(CONFIGS / "tiny.yaml"), "--set", f"storage.uri={storage}", "--resume", "signalled-1", timeout=900
    )
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "(resuming)" in resumed.stdout
    record = json.loads((storage / "runs" / "signalled-1" / "run.json").read_text())
    assert record["status"] == "succeeded" and record["global_step"] >= 40


@pytest.mark.slow
def test_a_diverging_run_fails_with_a_clear_message_and_keeps_no_adapter(tmp_path: Path) -> None:
    """A learning rate of 1e30 turns the loss NaN within a step or two: the run fails (not "succeeded" with NaN
    weights), run.json says why, no adapter/ folder exists for publish to take."""
    storage = tmp_path / "storage"
    result = run_cli(
        "train", str(CONFIGS / "tiny.yaml"),
        "--set", "training.learning_rate=1e30", "--set", "training.max_steps=6",
        "--set", "distributed.num_workers=1", "--set", f"storage.uri={storage}",
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "training diverged" in result.stderr and "Traceback" not in result.stderr, result.stderr
    (run_dir,) = (storage / "runs").iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "training diverged" in record["error"]
    assert not (run_dir / "adapter").exists()


def test_a_run_that_fails_after_its_folder_was_made_says_so_in_run_json(tmp_path: Path, monkeypatch) -> None:
    """A failure outside the workers (here: Ray cannot be reached) still leaves run.json `failed` with the reason,
    never a run folder that only holds a config."""
    from lorafleet.config import load_job_config
    from lorafleet.errors import LorafleetError
    from lorafleet.training import launcher

    def unreachable(*args, **kwargs):
        raise LorafleetError("cannot reach the Ray cluster at 10.0.0.1:6379")

    monkeypatch.setattr(launcher, "connect_ray", unreachable)
    job = load_job_config(CONFIGS / "tiny.yaml", [f"storage.uri={tmp_path / 'storage'}"])
    with pytest.raises(LorafleetError, match="cannot reach"):
        launcher.run_training(job, run_id="unreachable-1", address="10.0.0.1:6379")
    run_dir = tmp_path / "storage" / "runs" / "unreachable-1"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "cannot reach the Ray cluster" in record["error"]
