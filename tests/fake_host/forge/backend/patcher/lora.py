"""Fake `backend.patcher.lora`: extra_weight_calculators, merge_lora_to_weight (§6.4: narrow by offset, multiply
the base by strength_model, add strength·alpha·delta, custom types through the registry), LoraLoader (§6.5)."""

import torch

from backend import memory_management, utils

extra_weight_calculators = {}


def _lora_delta(v, weight):
    up, down, alpha, mid = v[0], v[1], v[2], v[3]
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    u = up.to(weight.dtype).flatten(1)
    d = down.to(weight.dtype).flatten(1)
    if mid is not None:
        raise NotImplementedError("lora mid is not in the fake")
    return scale, (u @ d).reshape(weight.shape)


def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    original_dtype = weight.dtype
    weight = weight.clone() if weight.dtype == computation_dtype else weight.to(computation_dtype)
    for strength, v, strength_model, offset, function in patches:
        function = function or (lambda a: a)
        whole = None
        if offset is not None:
            whole, weight = weight, weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        kind, payload = ("diff", v) if len(v) == 1 else (v[0], v[1])
        if kind == "diff":
            if strength != 0.0:
                weight += function((strength * payload[0].to(weight.dtype)).reshape(weight.shape))
        elif kind == "lora":
            scale, delta = _lora_delta(payload, weight)
            weight += function((strength * scale) * delta)
        elif kind in extra_weight_calculators:
            weight = extra_weight_calculators[kind](weight, strength, payload)
        else:
            print(f"patch type not recognized {kind} {key}")
        if whole is not None:
            weight = whole
    return weight.to(original_dtype)


class LoraLoader:
    """One per nn.Module, shared by every clone: restores its backups, then merges all patches, when the list of
    patch identifiers differs from the last one it loaded."""

    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.loaded_hash = str([])
        self.merge_count = 0

    @torch.inference_mode()
    def refresh(self, lora_patches, offload_device=torch.device("cpu"), force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        merged = {}
        for (_, _, _, online_mode), patches in lora_patches.items():
            for key, plist in patches.items():
                merged.setdefault((key, online_mode), []).extend(plist)
        for k, w in self.backup.items():
            utils.set_attr_raw(self.model, k, w if isinstance(w, torch.nn.Parameter) else torch.nn.Parameter(w, requires_grad=False))
        self.backup = {}
        for (key, online_mode), plist in merged.items():
            parent, child, weight = utils.get_attr_with_parent(self.model, key)
            if not isinstance(weight, torch.nn.Parameter):
                raise ValueError(f"Wrong LoRA Key: {key}")
            if online_mode:
                raise NotImplementedError("online LoRA is not in the fake")
            self.backup.setdefault(key, weight.to(device=offload_device))
            new = merge_lora_to_weight(plist, weight, key, computation_dtype=torch.float32)
            utils.set_attr_raw(self.model, key, torch.nn.Parameter(new, requires_grad=False))
            self.merge_count += 1
        self.loaded_hash = hashes
