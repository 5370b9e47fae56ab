"""One bad adapter fails only its own requests: after a failed step, run it again one adapter at a time.

Only a failed step pays for this. A failure that is no adapter's fault (a bug, out of memory) fails every group,
each with its own error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from lorafleet.serving.kv_cache import RunningBatch
from lorafleet.serving.scheduler import Sequence

log = logging.getLogger("lorafleet.serving")


def isolate(
    seqs: list[Sequence],
    exc: Exception,
    run: Callable[[list[Sequence]], RunningBatch | None],
    fail: Callable[[list[Sequence], Exception], None],
) -> RunningBatch | None:
    """`run(group)` the step again per adapter group of `seqs`; groups that fail alone are `fail`ed with their error.

    Returns the surviving rows as one batch (None: none survived).
    """
    groups: dict[str | None, list[Sequence]] = {}
    for seq in seqs:
        groups.setdefault(seq.adapter.internal if seq.adapter is not None else None, []).append(seq)
    if len(groups) == 1:
        fail(seqs, exc)
        return None
    merged: RunningBatch | None = None
    for group in groups.values():
        try:
            batch = run(group)
        except Exception as group_exc:
            log.warning("the %d requests for %s failed alone: %s", len(group), group[0].request.model, group_exc)
            fail(group, group_exc)
            continue
        if batch is None:
            continue
        if merged is None:
            merged = batch
        else:
            merged.extend(batch)
    return merged


def rows_of(batch: RunningBatch, seqs: list[Sequence]) -> list[int]:
    """The rows of `batch` that hold `seqs`."""
    wanted = {id(seq) for seq in seqs}
    return [row for row, seq in enumerate(batch.rows) if id(seq) in wanted]
