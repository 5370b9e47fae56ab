"""Spot capacity, the parts below a whole run (tests/test_fault_tolerance.py runs one with a SIGTERMed worker):

- a SIGTERM during training (a real signal to this process) saves the step it arrives at and stops there;
- a second SIGTERM, or the grace running out, ends the process (exit 143), in a child process;
- the KubeRay worker pods' preStop hook: SIGTERM to every Ray Train worker of the container, then wait;
- the rendered worker pods carry the hook and a grace period longer than the workers'.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from transformers import TrainerCallback

from lorafleet.pod_stop import stop_train_workers, train_worker_pids
from tests.test_methods import tiny_job, train_in_process


class SigtermAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.fixture
def sigterm_flag():
    from lorafleet.training.preemption import SIGTERM

    previous = SIGTERM.install(grace_s=600)
    yield SIGTERM
    SIGTERM.clear()
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_saves_the_step_it_arrives_at_and_stops(tmp_path: Path, sigterm_flag) -> None:
    from lorafleet.training.preemption import PreemptionCheckpoint
    from lorafleet.training.reporting import MetricsLog

    job = tiny_job(tmp_path, training={"max_steps": 8, "save_steps": 8, "lr_scheduler": "constant",
                                       "micro_batch_size": 2, "learning_rate": 1e-3, "logging": []})  # fmt: skip
    preemption = PreemptionCheckpoint("tiny", MetricsLog(str(tmp_path / "run")))
    trainer, _ = train_in_process(job, tmp_path, callbacks=(SigtermAt(3), preemption))
    result = trainer.train()
    # The signal lands in the step-3 callbacks; the flag is read at the next step end, which saves and stops.
    assert sigterm_flag.is_set() and preemption.step in (3, 4) and result.global_step == preemption.step
    assert (tmp_path / "out" / f"checkpoint-{preemption.step}" / "trainer_state.json").is_file()
    assert "SIGTERM to worker rank 0" in str(preemption.error()) and f"step {preemption.step}" in str(
        preemption.error()
    )
    records = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"event": "preempted"' in records and f'"step": {preemption.step}' in records


def test_sigterm_without_a_step_boundary_exits_after_the_grace_and_a_second_one_at_once() -> None:
    code = textwrap.dedent(
        """
        import os, signal, sys, time
        from lorafleet.training.preemption import SIGTERM
        SIGTERM.install(grace_s=float(sys.argv[1]))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        print("flag", SIGTERM.is_set(), flush=True)
        if sys.argv[2] == "twice":
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
        print("still here", flush=True)
        """
    )
    for grace, times in (("0.5", "once"), ("60", "twice")):
        result = subprocess.run([sys.executable, "-c", code, grace, times], capture_output=True, text=True, timeout=60)
        assert result.returncode == 143, (grace, times, result.stdout, result.stderr[-2000:])
        assert "flag True" in result.stdout and "still here" not in result.stdout


def test_pod_stop_sigterms_the_train_workers_and_waits_for_them(tmp_path: Path) -> None:
    mark = f"RayTrainWorker-test-{uuid.uuid4().hex}"
    worker_code = textwrap.dedent(
        """
        import signal, sys, time
        from pathlib import Path
        def on_term(signum, frame):
            time.sleep(1.0)  # a checkpoint being written
            Path(sys.argv[1]).write_text("checkpointed")
            sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        Path(sys.argv[1] + ".ready").write_text("")
        time.sleep(60)
        """
    )
    workers = [subprocess.Popen([sys.executable, "-c", worker_code, str(tmp_path / f"w{i}"), mark]) for i in (0, 1)]
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "RayTrainWorker-bystander"])
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"w{i}.ready").exists() for i in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sorted(train_worker_pids(mark.encode())) == sorted(worker.pid for worker in workers)
        signalled = stop_train_workers(wait_s=20, mark=mark.encode())
        assert sorted(signalled) == sorted(worker.pid for worker in workers)
        for i, worker in enumerate(workers):
            assert worker.wait(timeout=5) == 0 and (tmp_path / f"w{i}").read_text() == "checkpointed"
        assert bystander.poll() is None
    finally:
        for process in (*workers, bystander):
            process.kill()
            process.wait()


def test_worker_pods_carry_the_prestop_hook_and_a_longer_grace(tmp_path: Path) -> None:
    import importlib.util

    from lorafleet.cluster_options import ClusterOptions
    from lorafleet.kuberay import POD_STOP_MARGIN_S, render_raycluster

    job = tiny_job(tmp_path, distributed={"num_workers": 2, "sigterm_grace_s": 45.5})
    cluster = render_raycluster(job, ClusterOptions(pvc="storage"))
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    spec = workers["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 46 + POD_STOP_MARGIN_S
    command = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    assert command == ["python", "-m", "lorafleet.pod_stop", "--wait", "46"]
    assert importlib.util.find_spec(command[2]) is not None
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    assert "lifecycle" not in head["containers"][0]  # the head runs no training worker
