"""Fake `backend.memory_management`: a loaded-model list whose identity is the patcher (so a loaded patcher is not
reloaded), refresh_loras on load, cast_to_device."""

import torch

current_loaded_models: list = []
signal_empty_cache = False
load_count = 0


def cast_to_device(tensor, device, dtype, copy=False):
    return tensor.to(device=device, dtype=dtype, copy=copy)


def text_encoder_device():
    return torch.device("cpu")


def text_encoder_offload_device():
    return torch.device("cpu")


def soft_empty_cache(force=False):
    pass


def module_size(module):
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def load_models_gpu(patchers):
    global load_count
    for patcher in patchers:
        if any(m is patcher for m in current_loaded_models):
            continue
        current_loaded_models[:] = [m for m in current_loaded_models if m.model is not patcher.model]
        patcher.refresh_loras()
        load_count += 1
        current_loaded_models.append(patcher)


def load_model_gpu(patcher):
    load_models_gpu([patcher])
