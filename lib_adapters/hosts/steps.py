"""Strengths per sampling step in the WebUI: the host's `on_cfg_denoiser` callback brings scheduled adapters to
their value at the step being sampled, through the host's backend.

Two ways, chosen per pass (setting "Strengths that change over the steps are applied by"): `merge` (the scheduled
weights are recomputed from their originals at each step where their strength changes, exactly as a fixed strength
is merged) and `forward` (the scheduled layers run on the forward path from their factors, a change of strength is
a number, nothing is recomputed). `auto` merges on a CPU and when the strengths change at most MERGE_CHANGES times.
Weights without schedules stay merged.
"""

from __future__ import annotations

from ..patching import Plan
from ..schedules import is_scheduled
from .settings import log

MERGE_CHANGES = 2


def step_of(params) -> tuple[int, int]:
    """(step from 0, steps of this pass) of one cfg_denoiser call. The denoiser counts model calls (twice per step
    for second-order samplers: `total_steps` says how many it expects); the host's own step counter runs a step
    late, so it is only the fallback."""
    d = getattr(params, "denoiser", None)
    steps = int(getattr(d, "steps", None) or getattr(params, "total_sampling_steps", 0) or 1)
    calls = getattr(d, "total_steps", None) or steps
    call = getattr(d, "step", None)
    index = getattr(params, "sampling_step", 0) if call is None else call * steps // calls
    return max(0, min(int(index), steps - 1)), steps


def expected_steps(p) -> int:
    """The steps the coming pass should have (the callback's own count decides the values)."""
    steps = int(getattr(p, "steps", 0) or 20)
    if getattr(p, "is_hr_pass", False):
        return int(getattr(p, "hr_second_pass_steps", 0) or steps)
    return steps


def choose(plan, steps: int, device=None, setting: str = "auto") -> str:
    """"fixed" (nothing scheduled), "merge" or "forward" for a pass of `steps` steps on a model computing on
    `device`. `auto`: merge on a CPU (bench.schedule: recomputing the changed layers costs less than their forward
    path there) or when the strengths change at most MERGE_CHANGES times; forward otherwise."""
    if not plan.scheduled:
        return "fixed"
    if setting in ("merge", "forward"):
        return setting
    if device is not None and getattr(device, "type", str(device)) == "cpu":
        return "merge"
    values = [plan.values(i, steps) for i in range(steps)]
    changes = sum(a != b for a, b in zip(values, values[1:]))
    return "merge" if changes <= MERGE_CHANGES else "forward"


def parts(plan, values, mode: str, takes=lambda weight: True) -> tuple[Plan, Plan]:
    """(merged part, forward part) of the plan at `values`. Operations of scheduled entries are kept at strength 0
    (a backend merges only non-zero ones; on a forward path a zero is a number, so nothing is rebuilt when it
    changes). In forward mode the scheduled weights the forward path takes (`takes(weight)`) are the forward part."""
    keep = frozenset(i for i, e in enumerate(plan.entries) if is_scheduled(e.unet))
    full = plan.plan(values, keep)
    if mode != "forward":
        return full, {}
    moved = {w for w in plan.scheduled_weights if w in full and takes(w)}
    return {w: ops for w, ops in full.items() if w not in moved}, {w: full[w] for w in moved}


class Stepping:
    """The schedules of the pass being sampled: its step plan and mode, the model, the values applied."""

    def __init__(self, plan, mode: str, backend, model):
        self.plan = plan
        self.mode = mode
        self.backend = backend
        self.model = model
        self.applied = None  # the first call applies: Forge writes its held weights only once sampling runs

    def step(self, params) -> bool:
        """Apply the values of this call's step; False once they no longer apply (another model, a failure)."""
        p = getattr(getattr(params, "denoiser", None), "p", None)
        if self.backend.model_of(p) is not self.model:
            return False
        index, steps = step_of(params)
        values = self.plan.values(index, steps)
        if values == self.applied:
            return True
        try:
            merged, forward = parts(self.plan, values, self.mode, self.backend.takes(p))
            self.backend.step(p, merged, forward, self.held())
        except Exception as e:  # the host would report and go on: say what happened to the adapters
            log(f"error: scheduled strengths could not be set at step {index + 1} of {steps}: {e}; the rest of the "
                f"image is made without adapters")
            return False
        self.applied = values
        return True

    def held(self) -> frozenset[str]:
        """Scheduled weights kept out of the host's own merge (Forge) in merge mode."""
        return self.plan.scheduled_weights if self.mode == "merge" else frozenset()
