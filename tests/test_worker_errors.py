"""A failed fit is told in one line per worker, whatever Ray wrapped the workers' errors in."""

from __future__ import annotations

import pickle

from ray.exceptions import ActorDiedError, RayTaskError
from ray.train.v2.api.exceptions import WorkerGroupError

from lorafleet.training.worker_errors import failure_summary, one_line

GLOO_TRACEBACK = """Traceback (most recent call last):
  File "/srv/training/worker.py", line 48, in train_loop_per_worker
    result = trainer.train()
  File "/srv/torch/distributed/distributed_c10d.py", line 3252, in all_reduce
    work.wait()
RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:18578: Connection reset by peer. GLHF!
"""


def test_each_failed_worker_gets_one_line_without_its_traceback() -> None:
    gloo = RuntimeError(GLOO_TRACEBACK)
    failure = WorkerGroupError(GLOO_TRACEBACK * 2, {1: ActorDiedError(), 0: gloo})
    summary = failure_summary(pickle.loads(pickle.dumps(failure)))
    lines = summary.splitlines()
    assert len(lines) == 2 and "Traceback" not in summary, summary
    assert lines[0].startswith("worker 0: RuntimeError: [gloo/") and "Connection reset by peer" in lines[0]
    assert lines[1].startswith("worker 1: ActorDiedError: ")


def test_a_task_error_is_told_by_the_exception_it_carries() -> None:
    wrapped = RayTaskError("train_loop", GLOO_TRACEBACK, ValueError("loss is nan at step 7"))
    assert one_line(wrapped) == "ValueError: loss is nan at step 7"
    assert failure_summary("no checkpoint was reported") == "no checkpoint was reported"


def test_a_long_message_is_cut_and_an_empty_one_still_names_its_type() -> None:
    assert len(one_line(RuntimeError("x" * 5000))) <= 400
    assert one_line(KeyError()) == "KeyError"
    assert one_line(RuntimeError("Traceback (most recent call last):\n  File 'a.py'\n    x()")) == "RuntimeError"
