"""The base of every typed config section (job, adapter, serving): unknown keys are errors, and so are NaN and
infinities (YAML's `.nan`/`.inf`): no setting means "not a number", and an infinite one only ever hangs or
diverges later, far from the line that set it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
