"""Fake `backend.patcher.base.ModelPatcher` (§6.3): keyword-only add_patches filtered by named_parameters,
identifier (filename, strength_patch, strength_model, online_mode), clone() copies the patch dict shallowly."""

import copy

from backend.patcher.lora import LoraLoader


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, current_device=None, **kwargs):
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.current_device = current_device or offload_device
        self.size = size
        self.lora_patches = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        n = type(self).__new__(type(self))
        ModelPatcher.__init__(n, self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        identifier = (filename, strength_patch, strength_model, online_mode)
        names = {k for k, _ in self.model.named_parameters()}
        accepted, these = set(), {}
        for k in patches:
            key, offset, function = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
            if key in names:
                accepted.add(k)
                these.setdefault(key, []).append([strength_patch, patches[k], strength_model, offset, function])
        self.lora_patches[identifier] = these
        return accepted

    def has_online_lora(self):
        return any(ident[3] for ident in self.lora_patches)

    def refresh_loras(self):
        self.lora_loader.refresh(lora_patches=self.lora_patches, offload_device=self.offload_device)
