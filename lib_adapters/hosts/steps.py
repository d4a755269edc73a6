"""Strengths per sampling step in the WebUI: the host's `on_cfg_denoiser` callback brings scheduled adapters to
their value at the step being sampled, through the host's backend (A1111: only the weights whose strength changed
are recomputed; Forge: see forge.py)."""

from __future__ import annotations

from .settings import log


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


class Stepping:
    """The schedules of the pass being sampled: its step plan, the model it was applied to, the values applied."""

    def __init__(self, plan, backend, model):
        self.plan = plan
        self.backend = backend
        self.model = model
        self.applied = None  # the first call applies (Forge writes its scheduled weights only once sampling runs)

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
            self.backend.step(p, self.plan, values)
        except Exception as e:  # the host would report and go on: say what happened to the adapters
            log(f"error: scheduled strengths could not be set at step {index + 1} of {steps}: {e}; the rest of the "
                f"image is made without adapters")
            return False
        self.applied = values
        return True
