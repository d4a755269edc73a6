"""Forge: unquantized weights go through Forge's own ModelPatcher, quantized ones through the forward path
(host-contract §6, §7.2; modern-models §4).

Unquantized (fp32/fp16/bf16, GGUF F16/F32) weights: each batch, clones of the original UNet and CLIP patchers get
one `add_patches` call each, whose values are a custom patch type registered in
`backend.patcher.lora.extra_weight_calculators`: our core math (`patching.compute`) runs inside Forge's LoraLoader on
its float32 working copy, so every algorithm is exact and Forge keeps its own backup/restore and offload. The clones
are left in `forge_objects_after_applying_lora`, as the builtin does.

Quantized weights (fp8 e4m3fn/e5m2, fp8 with `scale_weight`, GGUF Q*/K/BF16, bnb NF4/FP4) of Linear/Conv2d layers:
never baked (Forge would dequantize → merge → re-quantize, squeezing the delta to 4–8 bits, mis-scale fp8-scaled
weights and fail on K-quants): `forward.ForwardEngine` runs the adapters in those layers' forward from their
factors, in both "Diffusion in Low Bits" modes. "(fp16 LoRA)" (`dynamic_args['online_lora']`) keeps the factors
and their math in the model's computation dtype, as Forge's online LoRA does; otherwise they stay float32, as
Forge's baked merge computes. A layer of unknown storage is reported and left out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..algorithms.base import DeltaPatch
from ..errors import AdapterError
from ..forward import ForwardEngine, storage_of
from ..naming import DIT_FAMILIES, LayerMap
from ..patching import Patcher, Plan, compute, compute_bias, nonzero, rows_view
from .a1111 import clear_cond_cache, te_signature

WEIGHT_TYPE = "lib_adapters"
BIAS_TYPE = "lib_adapters_bias"


class UnetStore:
    """Forge's live UNet parameters by checkpoint name (`model.diffusion_model.…`), looked up at every access
    (Forge's LoraLoader replaces the Parameter objects it patches); `set` copies in place."""

    in_place = True

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def _param(self, name: str) -> torch.Tensor:
        node = self.model
        for part in name[len("model."):].split("."):
            node = getattr(node, part)
        return node

    def get(self, name):
        return self._param(name).data

    def set(self, name, value):
        with torch.no_grad():
            self._param(name).data.copy_(value)

    def has(self, name):
        try:
            return isinstance(self._param(name), torch.Tensor)
        except AttributeError:
            return False


class Ops:
    """A patch value's payload: the ordered operations on one parameter (opaque to Forge)."""

    __slots__ = ("ops",)

    def __init__(self, ops):
        self.ops = tuple(ops)


def weight_after(weight: torch.Tensor, strength: float, payload: Ops) -> torch.Tensor:
    """Forge weight calculator: the merged weight from Forge's float32 working copy (strength_patch is 1)."""
    new, _ = compute(list(payload.ops), weight, None)
    if strength != 1.0:
        new = weight + strength * (new - weight)
    return new.to(weight.dtype)


def bias_after(bias: torch.Tensor, strength: float, payload: Ops) -> torch.Tensor:
    """The same bias arithmetic as `patching.compute` (additive patches only change biases)."""
    b = compute_bias(list(payload.ops), bias)
    if strength != 1.0:
        base = bias.to(b.dtype)
        b = base + strength * (b - base)
    return b.to(bias.dtype)


def bnb_dequantize(weight):
    """A bnb 4-bit weight as floats, through Forge's own function (it needs CUDA)."""
    from backend.operations_bnb import functional_dequantize_4bit
    return functional_dequantize_4bit(weight)


def register_calculators() -> None:
    from backend.patcher import lora

    lora.extra_weight_calculators[WEIGHT_TYPE] = weight_after
    lora.extra_weight_calculators[BIAS_TYPE] = bias_after


def text_encoder_name(name: str, sdxl: bool, dit: bool = False) -> str | None:
    """Forge's JointTextEncoder name → checkpoint-style name LayerMap.for_checkpoint knows (HF layout); a DiT
    engine's encoders (Flux `clip_l`, `t5xxl`) as its single files hold them (`text_encoders.<name>`)."""
    head, _, rest = name.partition(".")
    if not rest.startswith("transformer."):
        return None
    if dit:
        return "text_encoders." + name
    if head == "clip_g":
        return "conditioner.embedders.1." + rest if sdxl else "cond_stage_model." + rest
    if head in ("clip_l", "clip_h"):
        return ("conditioner.embedders.0." if sdxl else "cond_stage_model.") + rest
    return None


@dataclass
class EngineState:
    """Per Forge engine: the layer map over its original UNet/CLIP and what we last handed to it."""

    engine: object
    layer_map: LayerMap
    to_forge: dict[str, tuple[str, str]]  # checkpoint name → ("unet" | "clip", Forge parameter name)
    shapes: dict[str, tuple]
    last: dict = field(default_factory=dict)  # component → (identifier, base patcher, clone)
    te_signature: dict = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # checkpoint name → storage kind ("float", "fp8", …)
    forward: dict[str, ForwardEngine] = field(default_factory=dict)  # component → engine on its original model
    own: Patcher | None = None  # scheduled UNet weights: ours, in place, never in Forge's patches


def parameters(model) -> dict[str, tuple[tuple, str]]:
    """Parameter name → (real shape, storage kind), from the modules (GGUF `real_shape`, bnb `quant_state.shape`):
    `state_dict()` shows GGUF/bnb packed shapes and bnb quant-state entries."""
    out = {}
    for mname, module in model.named_modules():
        for pname, p in module._parameters.items():
            if p is not None:
                storage = storage_of(module, pname)
                out[f"{mname}.{pname}" if mname else pname] = (storage.shape, storage.kind)
    return out


def build_state(engine) -> EngineState:
    base = engine.forge_objects_original
    sdxl = bool(getattr(engine, "is_sdxl", False))
    to_forge, shapes, kinds = {}, {}, {}
    for name, (shape, kind) in parameters(base.unet.model).items():
        if name.startswith("diffusion_model."):
            to_forge["model." + name] = ("unet", name)
            shapes["model." + name], kinds["model." + name] = shape, kind
    dit = any(family.checkpoint_root(shapes) is not None for family in DIT_FAMILIES)
    if base.clip is not None:
        for name, (shape, kind) in parameters(base.clip.cond_stage_model).items():
            canon = text_encoder_name(name, sdxl, dit)
            if canon is not None:
                to_forge[canon] = ("clip", name)
                shapes[canon], kinds[canon] = shape, kind
    layer_map = LayerMap.for_checkpoint(shapes)
    for flag, family in (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd1")):
        if getattr(engine, flag, False):
            layer_map.family = family  # Forge's SD2 encoder is HF-layout, which the key test would call sd1
            break
    return EngineState(engine, layer_map, to_forge, shapes, kinds=kinds)


def online_lora() -> bool:
    """Forge's "(fp16 LoRA)" choice in "Diffusion in Low Bits"."""
    try:
        from backend.args import dynamic_args
    except ImportError:
        return False
    return bool(dynamic_args.get("online_lora", False))


def identifier(component: str, patches: dict) -> str:
    """The patch-set name Forge's LoraLoader compares: changes whenever any operation changes."""
    h = hashlib.sha1()
    for key in sorted(patches):
        kind, payload = patches[key]
        h.update(repr((key, kind, [op.signature for op in payload.ops])).encode())
    return f"lib_adapters/{component}/{h.hexdigest()[:16]}"


class ForgeBackend:
    """Adapters as Forge patches on clones of the original UNet/CLIP patchers."""

    name = "Forge"

    def __init__(self):
        self.state: EngineState | None = None

    @staticmethod
    def engine_of(p):
        sd = getattr(p, "sd_model", None)
        if sd is None:
            from modules import shared
            sd = shared.sd_model
        return sd if getattr(sd, "forge_objects", None) is not None else None

    def state_for(self, engine) -> EngineState:
        if self.state is None or self.state.engine is not engine:
            self.release()
            self.state = build_state(engine)  # a new engine starts from its own original patchers
        return self.state

    def layer_map(self, p) -> LayerMap:
        engine = self.engine_of(p)
        if engine is None:
            raise AdapterError(None, "no model is loaded yet")
        return self.state_for(engine).layer_map

    def patches(self, state: EngineState, plan: Plan) -> dict[str, dict]:
        out: dict[str, dict] = {"unet": {}, "clip": {}}
        for weight, ops in plan.items():
            component, name = state.to_forge[weight]
            out[component][name] = (WEIGHT_TYPE, Ops(ops))
            bias = next((op.target.bias for op in ops if op.target.bias), None)
            if bias and bias in state.to_forge and any(isinstance(op.patch, DeltaPatch) for op in ops):
                probe = torch.zeros(state.shapes[bias])
                if any(isinstance(op.patch, DeltaPatch) and op.patch.delta_bias(rows_view(probe, op.target))
                       is not None for op in ops):
                    out[component][state.to_forge[bias][1]] = (BIAS_TYPE, Ops(ops))
        return out

    def forward_engine(self, state: EngineState, component: str) -> ForwardEngine:
        """The forward-path engine on the original model of `component`; factors in float32, or in the model's
        computation dtype under "(fp16 LoRA)"."""
        base = state.engine.forge_objects_original
        root = base.unet.model if component == "unet" else base.clip.cond_stage_model
        dtype = getattr(base.unet.model, "computation_dtype", None) if online_lora() else torch.float32
        engine = state.forward.get(component)
        if engine is None or engine.root is not root:
            if engine is not None:
                engine.restore()
            names = {canon: forge_name for canon, (comp, forge_name) in state.to_forge.items() if comp == component}
            engine = ForwardEngine(root, names.get, host_dequantize=bnb_dequantize)
            state.forward[component] = engine
        if dtype is not None and engine.factor_dtype != dtype:
            engine.restore()  # a changed mode: rebuild the forms in the new dtype
            engine.factor_dtype = dtype
        return engine

    def split(self, state: EngineState, plan: Plan) -> tuple[Plan, dict[str, Plan], list[tuple[str, str]]]:
        """(weights Forge merges, {component: weights the forward path takes}, [(adapter path, reason)] left out)."""
        merged: Plan = {}
        forward: dict[str, Plan] = {"unet": {}, "clip": {}}
        skipped: list[tuple[str, str]] = []
        for weight, ops in plan.items():
            kind = state.kinds.get(weight, "float")
            if kind == "float":
                merged[weight] = ops
                continue
            component = state.to_forge[weight][0]
            engine = self.forward_engine(state, component)
            if engine.takes(weight):
                forward[component][weight] = ops
            elif kind.startswith("unknown"):
                module = engine._module(weight)
                what = type(module[0]).__name__ if module else "?"
                skipped += [(op.source.partition("|")[0], f"layer type {what} ({kind}) cannot take adapters")
                            for op in ops]
            else:
                merged[weight] = ops  # a quantized non-Linear/Conv weight (fp8 norm): Forge's own cast, as the builtin
        return merged, forward, skipped

    def model_of(self, p):
        return self.engine_of(p)

    def device(self, p):
        """Where Forge computes the UNet (its patcher's load device)."""
        engine = self.engine_of(p)
        return getattr(engine.forge_objects_original.unet, "load_device", None) if engine is not None else None

    def takes(self, p):
        """Which weights the UNet's forward path can take (scheduled layers that change often run there)."""
        engine = self.engine_of(p)
        if engine is None:
            return lambda weight: False
        state = self.state_for(engine)
        fe = self.forward_engine(state, "unet")
        return lambda weight: state.to_forge.get(weight, ("",))[0] == "unet" and fe.takes(weight)

    def apply(self, p, plan: Plan, forward: Plan | None = None, held=frozenset()) -> dict:
        """`plan` through Forge's patchers (quantized weights on the forward path), `forward` (scheduled UNet
        weights) on the forward path; `held` float weights stay out of Forge's patchers: `step` writes them in place
        once sampling runs (after Forge's own merge), and they are put back here at the next call."""
        engine = self.engine_of(p)
        if engine is None:
            return {}
        state = self.state_for(engine)
        try:
            return self._apply(p, engine, state, plan, forward, held)
        except BaseException:  # KeyboardInterrupt and out-of-memory too: the engine's own patchers, nothing else
            for fe in state.forward.values():
                fe.restore()
            state.last.clear()
            base = engine.forge_objects_original
            engine.forge_objects.unet, engine.forge_objects.clip = base.unet, base.clip
            engine.forge_objects_after_applying_lora = engine.forge_objects.shallow_copy()
            state.te_signature = {}
            clear_cond_cache(p)
            raise

    def _apply(self, p, engine, state: EngineState, plan: Plan, forward: Plan | None, held) -> dict:
        if state.own is not None:
            state.own.restore()  # before Forge merges (and backs up) anything of the next generation
        plan = {w: ops for w, ops in plan.items() if w not in self.own_weights(state, held)}
        register_calculators()
        plan, forward_plans, skipped = self.split(state, plan)
        plan = nonzero(plan)  # Forge merges; zero-strength scheduled terms stay only on the forward path
        base = engine.forge_objects_original
        stats = {"unet": 0, "clip": 0, "rebuilt": 0, "skipped": 0, "forward": 0}
        chosen, last_now = {}, {}
        for component, patches in self.patches(state, plan).items():
            original = getattr(base, component)
            stats[component] = len(patches)
            if not patches or original is None:
                chosen[component] = original
                continue
            ident = identifier(component, patches)
            last = state.last.get(component)
            if last and last[0] == ident and last[1] is original:
                chosen[component] = last[2]  # same patcher object: Forge will not re-merge anything
                last_now[component] = last
                continue
            clone = original.clone()
            accepted = clone.add_patches(filename=ident, patches=patches, strength_patch=1.0, strength_model=1.0,
                                         online_mode=False)
            stats["skipped"] += len(patches) - len(accepted)
            stats["rebuilt"] += 1
            last_now[component] = (ident, original, clone)
            chosen[component] = clone
        forward_plans["unet"].update(forward or {})
        for component, forward_plan in forward_plans.items():
            if forward_plan or component in state.forward:
                fe = self.forward_engine(state, component)
                fe.reconcile(forward_plan)
                stats["forward"] += len(fe.adapted())
                skipped += [(s.op.source.partition("|")[0], s.reason) for s in fe.skipped]
        engine.forge_objects.unet = chosen["unet"]
        engine.forge_objects.clip = chosen["clip"]
        engine.forge_objects_after_applying_lora = engine.forge_objects.shallow_copy()
        state.last = last_now  # only now: a failure above leaves no record of patchers that were never handed over
        te = te_signature({**plan, **forward_plans["clip"]})
        if te != state.te_signature:
            clear_cond_cache(p)
            state.te_signature = te
        if skipped:
            stats["left_out"] = skipped
        return stats

    @staticmethod
    def own_weights(state: EngineState, held) -> set[str]:
        """The held weights we write in place ourselves: plain float storage (quantized ones take the forward path)."""
        return {w for w in held if state.kinds.get(w, "float") == "float"}

    def step(self, p, plan: Plan, forward: Plan, held=frozenset()) -> dict:
        """One sampling step's strengths: held float weights recomputed from their originals in place, the UNet's
        forward path (quantized weights, scheduled ones in forward mode) set to this step's numbers."""
        engine = self.engine_of(p)
        state = self.state_for(engine)
        own = self.own_weights(state, held)
        stats = {}
        if own:
            if state.own is None:
                state.own = Patcher(UnetStore(engine.forge_objects_original.unet.model))
            stats = state.own.reconcile(nonzero({w: ops for w, ops in plan.items() if w in own}))
        unet = {w: ops for w, ops in plan.items() if w not in own and state.kinds.get(w, "float") != "float"
                and state.to_forge.get(w, ("",))[0] == "unet"}
        unet.update(forward)
        if unet or "unet" in state.forward:
            stats["forward"] = self.forward_engine(state, "unet").reconcile(unet)
        return stats

    def forget(self, sd_model) -> None:
        if self.state is not None and self.state.engine is sd_model:
            self.release()

    def release(self) -> None:
        """Put back the scheduled weights we wrote and every forward path (the engine may live on in the checkpoint
        cache)."""
        if self.state is not None:
            for fe in self.state.forward.values():
                fe.restore()
            if self.state.own is not None:
                try:
                    self.state.own.restore()
                except Exception:  # its tensors may be gone with the model
                    pass
        self.state = None
