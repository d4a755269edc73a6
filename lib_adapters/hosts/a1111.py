"""A1111 1.10: adapters are merged into the loaded model's weights in place (host-contract §5, §7.1, §10).

The model's parameters are addressed by their checkpoint names (the hijack's `.wrapped` level removed), so
`LayerMap.for_checkpoint` maps adapter keys onto them; one Patcher per model keeps the originals and recomputes
only weights whose operations changed. Text-encoder changes clear the host's conditioning cache.
With the "FP8 weight" setting (Linear/Conv2d weights stored float8_e4m3fn), those layers take adapters in their
forward instead (`forward.ForwardEngine`): exact in the compute dtype, the fp8 bytes never written (the builtin
merges the delta into fp8). Weights a parent reads directly (MultiheadAttention's `out_proj`) stay merged.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from ..errors import AdapterError
from ..forward import FLOAT8, ForwardEngine
from ..naming import LayerMap
from ..patching import ModuleStore, Patcher, Plan, nonzero

MODEL_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.", "text_encoders.")  # SD3: text_encoders
COND_CACHES = ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc")


def checkpoint_name(name: str) -> str:
    """The live parameter name as it is in a checkpoint file: without the hijack wrappers' `.wrapped`."""
    return name.replace(".wrapped.", ".")


class HostModelStore(ModuleStore):
    """The model's UNet and text-encoder parameters by checkpoint name; `set` copies in place (same storage,
    whatever device lowvram put it on)."""

    def __init__(self, sd_model: torch.nn.Module):
        params = sd_model.state_dict(keep_vars=True)
        sdxl = any(k.startswith("conditioner.") for k in params)
        self.tensors: dict[str, torch.Tensor] = {}
        self.paths: dict[str, str] = {}  # checkpoint name → live parameter path
        seen: set[int] = set()
        for name, t in params.items():
            if not name.startswith(MODEL_PREFIXES) or (sdxl and name.startswith("cond_stage_model.")):
                continue  # SDXL: cond_stage_model is the conditioner under a second name
            if id(t) in seen:
                continue
            seen.add(id(t))
            self.tensors.setdefault(checkpoint_name(name), t)
            self.paths.setdefault(checkpoint_name(name), name)


@dataclass
class ModelState:
    """What we know about one model object: its store, layer map, patcher and applied text-encoder ops."""

    model: weakref.ref
    store: HostModelStore
    layer_map: LayerMap
    patcher: Patcher
    forward: ForwardEngine
    te_signature: dict = field(default_factory=dict)


def clear_cond_cache(p) -> None:
    """Forget cached conds (class-level lists in the host) so the next setup_conds runs the text encoder."""
    for attr in COND_CACHES:
        cache = getattr(p, attr, None)
        if isinstance(cache, list) and len(cache) == 2:
            cache[0] = None
            cache[1] = None


def te_signature(plan: Plan) -> dict:
    return {w: tuple(op.signature for op in ops) for w, ops in plan.items()
            if ops and ops[0].target.component == "te"}


class A1111Backend:
    """In-place patching of `shared.sd_model`, one model at a time."""

    name = "A1111"

    def __init__(self):
        self.state: ModelState | None = None

    @staticmethod
    def model_of(p):
        sd = getattr(p, "sd_model", None)
        if sd is None:
            from modules import shared
            sd = shared.sd_model
        return sd

    def state_for(self, sd, create: bool = True) -> ModelState | None:
        if self.state is not None and self.state.model() is sd:
            return self.state
        self.release()
        if not create:
            return None
        store = HostModelStore(sd)
        layer_map = LayerMap.for_checkpoint({n: tuple(t.shape) for n, t in store.tensors.items()})
        self.state = ModelState(weakref.ref(sd), store, layer_map, Patcher(store), ForwardEngine(sd, store.paths.get))
        return self.state

    def layer_map(self, p) -> LayerMap:
        sd = self.model_of(p)
        if sd is None:
            raise AdapterError(None, "no model is loaded")
        return self.state_for(sd).layer_map

    def device(self, p):
        """Where the UNet computes (A1111's `sd_model.device`, else its first weight's device)."""
        sd = self.model_of(p)
        if sd is None:
            return None
        device = getattr(sd, "device", None)
        if isinstance(device, torch.device):
            return device
        return next((t.device for t in sd.parameters()), None)

    def takes(self, p):
        """Which weights the forward path can take (scheduled layers that change often run there)."""
        sd = self.model_of(p)
        state = self.state_for(sd, create=False) if sd is not None else None
        return state.forward.takes if state is not None else (lambda weight: False)

    def apply(self, p, plan: Plan, forward: Plan | None = None, held=frozenset()) -> dict:
        """Bring the model to exactly `plan` (merged; fp8 layers on the forward path) and `forward` (scheduled
        layers on the forward path); zero-strength operations stay only on the forward path (a number there)."""
        sd = self.model_of(p)
        if sd is None:
            return {}
        state = self.state_for(sd, create=bool(plan or forward))
        if state is None:
            return {}
        fp8 = {w: ops for w, ops in plan.items() if self.forward_weight(state, w)}
        merged = nonzero({w: ops for w, ops in plan.items() if w not in fp8})
        try:
            stats = state.patcher.reconcile(merged)
            forward = {**fp8, **(forward or {})}
            if forward or state.forward.layers:
                state.forward.reconcile(forward)
                stats["forward"] = len(state.forward.layers)
        except BaseException:  # KeyboardInterrupt and out-of-memory too: never a half-applied set
            state.patcher.restore()
            state.forward.restore()
            state.te_signature = {}
            clear_cond_cache(p)
            raise
        left_out = [(s.op.source.partition("|")[0], s.reason) for s in state.forward.skipped]
        if left_out:
            stats["left_out"] = left_out
        te = te_signature(merged)
        if te != state.te_signature:
            clear_cond_cache(p)
            state.te_signature = te
        return stats

    @staticmethod
    def forward_weight(state: ModelState, name: str) -> bool:
        return state.store.tensors[name].dtype in FLOAT8 and state.forward.takes(name)

    def step(self, p, plan: Plan, forward: Plan, held=frozenset()) -> dict:
        """One sampling step's strengths: merged weights whose operations changed are recomputed, forward-path
        strengths are numbers."""
        return self.apply(p, plan, forward)

    def release(self) -> None:
        """Restore the previous model's weights (it may live on in the checkpoint cache) and drop its state."""
        if self.state is None:
            return
        self.state.forward.restore()
        try:
            self.state.forward.restore()
            self.state.patcher.restore()
        except Exception:  # its tensors may be gone (moved to meta by the host): nothing to restore
            pass
        self.state = None

    def forget(self, sd_model) -> None:
        """A model was (re)loaded: its weights are fresh, so the saved originals are stale or belong elsewhere."""
        if self.state is None:
            return
        if self.state.model() is sd_model:
            self.state.forward.restore()  # the same modules: take our forwards off them
            self.state = None  # same object, new weights loaded in place: nothing to restore
        else:
            self.release()
