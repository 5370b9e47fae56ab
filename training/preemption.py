"""Spot capacity: a worker told to go checkpoints the step it is at, and its group restarts from that step.

Kubernetes sends SIGTERM to a pod's processes before it evicts the pod (a spot reclaim, a node drain) and
SIGKILL `terminationGracePeriodSeconds` later; a cloud's preemption notice reaches Ray as a node drain. Either
way the work since the last periodic checkpoint would be lost. Here:

    SIGTERM to a Ray Train worker process  ->  a flag, set by a handler on the actor's main thread
    every step end, on every rank          ->  the flags of all ranks are summed (one tiny all-reduce), and
                                               Ray Train's own preemption notice (a drain) is read
    any rank told to go                    ->  every rank saves at this step (the usual HF save, reported to
                                               Ray Train as a checkpoint), then raises `WorkerPreempted`

Ray Train then restarts the worker group (`distributed.max_failures`) from that checkpoint, or, with no
retries left, the run fails and `lorafleet train --resume` continues from it. A worker that cannot reach a
step boundary within `distributed.sigterm_grace_s` exits as Ray would have exited at once.
"""

from __future__ import annotations

import os
import signal
import threading
import time

from transformers import TrainerCallback

from lorafleet.errors import LorafleetError

EXIT_CODE = 128 + signal.SIGTERM


class WorkerPreempted(LorafleetError):
    """A worker of the group was told to go (SIGTERM or a node drain); its checkpoint of this step is saved."""


class SigtermFlag:
    """This process's SIGTERM, as a flag: the first one sets it and starts the grace timer; a second one, or the
    grace running out, exits the process."""

    def __init__(self) -> None:
        self._set = threading.Event()
        self._timer: threading.Timer | None = None

    def install(self, grace_s: float):
        """On the process's main thread (only it may install handlers); returns the handler it replaced."""

        def handler(signum: int, frame: object) -> None:
            if self._set.is_set():
                os._exit(EXIT_CODE)
            self._set.set()
            self._timer = threading.Timer(grace_s, os._exit, args=(EXIT_CODE,))
            self._timer.daemon = True
            self._timer.start()

        return signal.signal(signal.SIGTERM, handler)

    def is_set(self) -> bool:
        return self._set.is_set()

    def clear(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._set.clear()


SIGTERM = SigtermFlag()


def on_sigterm(grace_s: float) -> None:
    """What the actor task runs: a module function, so the task installs on this module's SIGTERM (a bound method
    would travel pickled, and install on a copy)."""
    SIGTERM.install(grace_s)


def install_sigterm_handler(grace_s: float) -> bool:
    """From the training thread: install `on_sigterm` on this Ray actor's main thread, through a task to the actor
    itself (a sync actor runs its tasks there). False where the actor offers no way to do it."""
    import ray

    actor = ray.get_runtime_context().current_actor
    execute = getattr(actor, "execute", None)  # Ray Train's worker actor: runs a function on its main thread
    if execute is None:
        return False
    ray.get(execute.remote(on_sigterm, grace_s))
    return True


class PreemptionCheckpoint(TrainerCallback):
    """At every step end, on every rank: if any rank was told to go, save this step and stop training."""

    def __init__(self, run_id: str, metrics=None, *, drain_notice=None):
        self.run_id = run_id
        self.metrics = metrics  # MetricsLog: rank 0 records the event
        self.drain_notice = drain_notice  # ray.train.get_preemption_info on Ray Train workers
        self.reason: str | None = None
        self.step: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.reason is not None:
            return
        reason = self._agreed_reason()
        if reason is None:
            return
        self.reason, self.step = reason, state.global_step
        control.should_save = True
        control.should_training_stop = True
        if state.is_world_process_zero:
            if self.metrics is not None:
                self.metrics.append({"event": "preempted", "step": state.global_step, "reason": reason,
                                     "time": time.time()})  # fmt: skip
            print(f"[{self.run_id}] {reason}: checkpointing step {state.global_step}, then the workers restart "
                  f"from it", flush=True)  # fmt: skip

    def _agreed_reason(self) -> str | None:
        told = told_ranks()
        if told:
            return f"SIGTERM to worker rank {', '.join(map(str, told))}"
        notice = self.drain_notice() if self.drain_notice is not None else None
        if notice is not None:
            return f"node preemption notice (ranks {', '.join(map(str, notice.preempted_ranks))})"
        return None

    def error(self) -> WorkerPreempted:
        return WorkerPreempted(
            f"{self.reason}: the checkpoint of step {self.step} is saved; the run continues from it when the "
            "workers restart (distributed.max_failures) or with `lorafleet train --resume`"
        )


def told_ranks() -> list[int]:
    """The ranks whose process got SIGTERM, as every rank agrees (one all-reduce of a flag per rank)."""
    import torch
    import torch.distributed as dist

    mine = 1.0 if SIGTERM.is_set() else 0.0
    if not (dist.is_available() and dist.is_initialized()):
        return [0] if mine else []
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flags = torch.zeros(dist.get_world_size(), device=device)
    flags[dist.get_rank()] = mine
    dist.all_reduce(flags)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag > 0]
