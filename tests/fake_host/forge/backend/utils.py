"""Fake `backend.utils`: attribute access by dotted name, safetensors loading to CPU."""

import torch


def load_torch_file(ckpt, safe_load=False, device=None):
    import safetensors.torch
    return safetensors.torch.load_file(ckpt, device=str(device or "cpu"))


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def get_attr_with_parent(obj, attr):
    *parents, last = attr.split(".")
    parent = obj
    for name in parents:
        parent = getattr(parent, name)
    return parent, last, getattr(parent, last)


def set_attr_raw(obj, attr, value):
    parent, last, _ = get_attr_with_parent(obj, attr)
    setattr(parent, last, value)


def tensor2parameter(x):
    return x if isinstance(x, torch.nn.Parameter) else torch.nn.Parameter(x, requires_grad=False)
