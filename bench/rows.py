"""The benchmark rows: each brings the model to a target state — a list of (adapter file, strength) — its own way.

`goto(state, cached)` returns a {phase: seconds} breakdown; `cached=True` keeps adapters it dropped in memory so
that selecting them again reads no file. Rows whose restore is not exact say so in `inexact`.
"""

from __future__ import annotations

import time

import torch

from .memory import sync
from .models import Components, checkpoint_state_dict

State = tuple[tuple[str, float], ...]


class OursRow:
    """lib_adapters: Adapter.load → naming.build_plan → Patcher.reconcile, over a checkpoint dict or live modules."""

    inexact: tuple[str, ...] = ()

    def __init__(self, components, device: str, store: str):
        from lib_adapters.naming import LayerMap
        from lib_adapters.patching import ModuleStore, Patcher, StateDictStore

        self.device = device
        self.kind = store
        if store == "checkpoint":
            self.sd = checkpoint_state_dict(components)
            components.clear()  # the dict now owns the tensors: set() replaces entries, as a WebUI state dict
            self.store = StateDictStore(self.sd)
            self.layer_map = LayerMap.for_checkpoint(self.sd)
        else:
            self.root = Components(components)
            self.store = ModuleStore(self.root)
            self.layer_map = LayerMap.for_diffusers({k: m.state_dict() for k, m in components.items()})
        self.patcher = Patcher(self.store)
        self.cache: dict = {}
        self.names = ("load", "plan", "merge")

    def cast(self, dtype: torch.dtype) -> None:
        if self.kind == "checkpoint":
            for k, v in self.sd.items():
                if v.is_floating_point():
                    self.sd[k] = v.to(dtype)
        else:
            self.root.to(dtype)
            self.store = type(self.store)(self.root)
        from lib_adapters.patching import Patcher

        self.patcher = Patcher(self.store)

    def plan(self, state: State):
        from lib_adapters.adapter import Adapter
        from lib_adapters.naming import build_plan

        entries = []
        for path, s in state:
            if path not in self.cache:
                self.cache[path] = Adapter.load(path)
            entries.append((self.cache[path], s, s))
        return build_plan(entries, self.layer_map)[0]

    def goto(self, state: State, cached: bool = False) -> dict[str, float]:
        from lib_adapters.adapter import Adapter
        from lib_adapters.naming import build_plan

        t0 = time.perf_counter()
        entries = []
        for path, s in state:
            if path not in self.cache:
                self.cache[path] = Adapter.load(path)
            entries.append((self.cache[path], s, s))
        t1 = time.perf_counter()
        plan, _ = build_plan(entries, self.layer_map)
        t2 = time.perf_counter()
        self.patcher.reconcile(plan)
        sync(self.device)
        t3 = time.perf_counter()
        if not cached:
            keep = {p for p, _ in state}
            for p in [p for p in self.cache if p not in keep]:
                del self.cache[p]
        return {"load": t1 - t0, "plan": t2 - t1, "merge": t3 - t2}

    def forget(self, path: str) -> None:
        self.cache.pop(path, None)


class PeftRow:
    """diffusers + PEFT: load_lora_weights + set_adapters + fuse_lora; unfuse_lora + unload_lora_weights/delete."""

    inexact = ("restore", "switch", "strength", "reselect", "stack")  # unfuse subtracts the delta again

    def __init__(self, components, device: str, hotswap: bool = False):
        import diffusers

        self.components = components
        self.device = device
        self.hotswap = hotswap
        if "text_encoder_2" in components:
            self.pipe = diffusers.StableDiffusionXLPipeline(
                vae=None, text_encoder=components["text_encoder"], text_encoder_2=components["text_encoder_2"],
                tokenizer=None, tokenizer_2=None, unet=components["unet"], scheduler=None)
        else:
            self.pipe = diffusers.StableDiffusionPipeline(
                vae=None, text_encoder=components["text_encoder"], tokenizer=None, unet=components["unet"],
                scheduler=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        self.loaded: dict[str, str] = {}
        self.fused = False
        self.counter = 0
        self.names = ("unfuse", "unload", "load", "fuse")

    def cast(self, dtype):
        for m in self.components.values():
            m.to(dtype)

    def goto(self, state: State, cached: bool = False) -> dict[str, float]:
        pipe = self.pipe
        t0 = time.perf_counter()
        if self.fused:
            pipe.unfuse_lora()
            self.fused = False
        t1 = time.perf_counter()
        want = [p for p, _ in state]
        dropped = [p for p in self.loaded if p not in want]
        swap_from = None
        if self.hotswap and len(dropped) == 1 and len(want) == 1 and want[0] not in self.loaded:
            swap_from = dropped[0]
        elif not cached and dropped:
            if len(dropped) == len(self.loaded):
                pipe.unload_lora_weights()
                self.loaded.clear()
            else:
                pipe.delete_adapters([self.loaded.pop(p) for p in dropped])
        t2 = time.perf_counter()
        for p in want:
            if p in self.loaded:
                continue
            if swap_from is not None:
                name = self.loaded.pop(swap_from)
                self._hotswap(p, name)
            else:
                name = f"a{self.counter}"
                self.counter += 1
                pipe.load_lora_weights(p, adapter_name=name)
            self.loaded[p] = name
        t3 = time.perf_counter()
        if state:
            names = [self.loaded[p] for p, _ in state]
            pipe.set_adapters(names, [s for _, s in state])
            pipe.fuse_lora(adapter_names=names)
            self.fused = True
        sync(self.device)
        t4 = time.perf_counter()
        return {"unfuse": t1 - t0, "unload": t2 - t1, "load": t3 - t2, "fuse": t4 - t3}

    def _hotswap(self, path: str, name: str) -> None:
        """diffusers hotswaps UNet adapters only: swap the UNet's in place, reload the text encoders' adapter."""
        pipe = self.pipe
        sd, alphas = pipe.lora_state_dict(path)
        pipe.load_lora_into_unet(sd, network_alphas=alphas, unet=pipe.unet, adapter_name=name, _pipeline=pipe,
                                 hotswap=True)
        for comp in ("text_encoder", "text_encoder_2"):
            te = self.components.get(comp)
            if te is None or not any(k.startswith(comp + ".") for k in sd):
                continue
            from diffusers.utils.peft_utils import delete_adapter_layers

            delete_adapter_layers(te, name)
            pipe.load_lora_into_text_encoder(sd, network_alphas=alphas, text_encoder=te, prefix=comp,
                                             adapter_name=name, _pipeline=pipe)

    def forget(self, path: str) -> None:
        if path in self.loaded and not self.hotswap:
            if len(self.loaded) == 1:
                self.pipe.unload_lora_weights()
                self.loaded.clear()
            else:
                self.pipe.delete_adapters([self.loaded.pop(path)])


class _TextModel(torch.nn.Module):
    """transformers 5 CLIP lacks the `text_model.` level the files (and LyCORIS's name matching) expect."""

    def __init__(self, te):
        super().__init__()
        self.text_model = te


class LycorisRow:
    """LyCORIS: create_network_from_weights + merge_to(s); no unmerge exists, so removal is merge_to(-s)."""

    inexact = ("restore", "switch", "strength", "reselect")

    def __init__(self, components, device: str):
        import logging

        from lycoris.kohya import LycorisNetworkKohya

        logging.getLogger("LyCORIS").setLevel(logging.ERROR)
        # create_network_from_weights first builds a throw-away network from the class preset: make it empty
        # (the cheapest, fairest choice; its defaults would also collide on time_embedding names).
        LycorisNetworkKohya.apply_preset({
            "enable_conv": True, "unet_target_module": [], "unet_target_name": [],
            "text_encoder_target_module": [], "text_encoder_target_name": [],
            "module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False, "exclude_name": [],
        })
        self.components = components
        self.device = device
        tes = [_TextModel(components[k]) for k in ("text_encoder", "text_encoder_2") if k in components]
        self.te = tes if len(tes) > 1 else tes[0]
        self.nets: dict = {}
        self.applied: dict[str, float] = {}
        self.names = ("load", "merge")

    def cast(self, dtype):
        for m in self.components.values():
            m.to(dtype)

    def _merge(self, net, weight: float) -> None:
        from lycoris.wrapper import LycorisNetwork

        LycorisNetwork.merge_to(net, weight)

    def goto(self, state: State, cached: bool = False) -> dict[str, float]:
        from lycoris.kohya import create_network_from_weights

        load = 0.0
        t0 = time.perf_counter()
        want = dict(state)
        for p, s in list(self.applied.items()):
            if p not in want:
                self._merge(self.nets[p], -s)
                del self.applied[p]
                if not cached:
                    del self.nets[p]
        for p, s in want.items():
            delta = s - self.applied.get(p, 0.0)
            if delta == 0:
                continue
            if p not in self.nets:
                t = time.perf_counter()
                net, _ = create_network_from_weights(1.0, p, None, self.te, self.components["unet"], for_inference=True)
                net.loras = net.text_encoder_loras + net.unet_loras
                net.to(self.device)
                self.nets[p] = net
                load += time.perf_counter() - t
            self._merge(self.nets[p], delta)
            self.applied[p] = s
        sync(self.device)
        total = time.perf_counter() - t0
        return {"load": load, "merge": total - load}

    def forget(self, path: str) -> None:
        if path not in self.applied:
            self.nets.pop(path, None)


class FloorRow:
    """The physical floor: read the adapter file(s) once, and write each touched weight once from a saved copy of
    its original (what an exact switch must at least move: the original in, the weight out; no arithmetic).

    With `gemm`, each LoRA-patched weight is instead written as W + up@down (one addmm from the saved original):
    the floor for low-rank merges once the rank-r product's arithmetic is counted. `buffer=True` times the previous
    definition instead: the copy goes into one reused buffer, so its writes stay in the CPU cache.
    """

    inexact: tuple[str, ...] = ()

    def __init__(self, components, device: str, touched: dict[str, list[str]], gemm: bool = False):
        self.components = components
        self.device = device
        self.touched = touched  # adapter path → the weight names (Components naming) its plan writes
        self.gemm = gemm
        self.names = ("read", "copy")
        self.factors: dict[str, dict] = {}
        self.saved: dict[str, torch.Tensor] = {}
        if gemm:
            self._load_factors()
        self._index()

    def _load_factors(self) -> None:
        """Adapter path → {weight name: (up, down, γ)} for its plain-LoRA layers (untimed preparation)."""
        from lib_adapters.adapter import Adapter
        from lib_adapters.algorithms.lora import LoRAPatch
        from lib_adapters.naming import LayerMap, build_plan

        lm = LayerMap.for_diffusers({k: m.state_dict() for k, m in self.components.items()})
        for path in self.touched:
            plan, _ = build_plan([(Adapter.load(path), 1.0, 1.0)], lm)
            found = {}
            for name, ops in plan.items():
                p = ops[0].patch
                if type(p) is LoRAPatch and p.mid is None and p.extra is None:
                    found[name] = (p.up.reshape(p.up.shape[0], -1).float().to(self.device),
                                   p.down.reshape(p.down.shape[0], -1).float().to(self.device), p.scale)
            self.factors[path] = found

    def _index(self):
        self.tensors = {k: v for k, v in Components(self.components).state_dict(keep_vars=True).items()}
        biggest = max(t.numel() for t in self.tensors.values())
        dtype = next(iter(self.components["unet"].parameters())).dtype
        self.scratch = torch.empty(biggest, dtype=dtype, device=self.device)

    def cast(self, dtype):
        for m in self.components.values():
            m.to(dtype)
        self._index()

    def prepare(self, names) -> None:
        """Save the originals of `names` (untimed, like the backups a patcher keeps)."""
        self.saved = {n: self.tensors[n].detach().clone() for n in names}

    def release(self) -> None:
        self.saved = {}

    def transition(self, read: list[str], weights: set[str], merged: tuple[str, ...] = (),
                   buffer: bool = False) -> dict[str, float]:
        """Read the files `read`; write every weight in `weights` once from its saved original (as W + Σ up@down
        of `merged` with gemm)."""
        t0 = time.perf_counter()
        for path in read:
            with open(path, "rb") as f:
                data = f.read()
            del data
        t1 = time.perf_counter()
        sources = [self.factors.get(p, {}) for p in merged] if self.gemm else []
        with torch.no_grad():
            for name in weights:
                src = self.tensors[name].data if buffer else self.saved[name]
                dst = self.scratch[: src.numel()].view_as(src) if buffer else self.tensors[name].data
                fs = [f[name] for f in sources if name in f]
                if fs and dst.dtype == torch.float32:
                    dst2, src2 = dst.view(dst.shape[0], -1), src.reshape(src.shape[0], -1)
                    torch.addmm(src2, fs[0][0], fs[0][1], alpha=fs[0][2], out=dst2)
                    for up, down, scale in fs[1:]:
                        dst2.addmm_(up, down, alpha=scale)
                elif fs:  # fp16/bf16: the same product in float32 through one reused buffer, cast once
                    tmp = self.work(dst.numel()).view(dst.shape[0], -1)
                    tmp.copy_(src.reshape(tmp.shape))
                    for up, down, scale in fs:
                        tmp.addmm_(up, down, alpha=scale)
                    dst.copy_(tmp.view_as(dst))
                else:
                    dst.copy_(src)
        sync(self.device)
        t2 = time.perf_counter()
        return {"read": t1 - t0, "copy": t2 - t1}

    def work(self, numel: int) -> torch.Tensor:
        if getattr(self, "_work", None) is None or self._work.numel() < numel:
            biggest = max(t.numel() for t in self.tensors.values())
            self._work = torch.empty(biggest, dtype=torch.float32, device=self.device)
        return self._work[:numel]
