"""Fake `backend.operations` (Forge's layer classes, host-contract §6): Linear/Conv2d that cast their stored weight
(fp8 included) to the input's dtype and device per forward, multiply by `scale_weight` (fp8 "scaled" files) and merge
online LoRA patches there; the GGUF Linear dequantizes per forward and does not recurse in `_apply`."""

import torch

from backend import utils
from backend.operations_gguf import dequantize_tensor


def get_weight_and_bias(layer, weight_args=None, bias_args=None, weight_fn=None, bias_fn=None):
    from backend.patcher.lora import merge_lora_to_weight

    patches = getattr(layer, "forge_online_loras", None) or {}
    weight = layer.weight
    if weight_fn is not None:
        weight = weight_fn(weight)
    if weight_args is not None:
        weight = weight.to(**weight_args)
    scale = getattr(layer, "scale_weight", None)
    if scale is not None:
        weight = weight * scale.to(device=weight.device, dtype=weight.dtype)
    if "weight" in patches:
        weight = merge_lora_to_weight(patches["weight"], weight, "online weight lora", computation_dtype=weight.dtype)
    bias = layer.bias
    if bias is not None:
        if bias_fn is not None:
            bias = bias_fn(bias)
        if bias_args is not None:
            bias = bias.to(**bias_args)
        if "bias" in patches:
            bias = merge_lora_to_weight(patches["bias"], bias, "online bias lora", computation_dtype=bias.dtype)
    return weight, bias


def weights_manual_cast(layer, x, skip_bias_dtype=False, weight_fn=None):
    weight_args = dict(device=x.device, dtype=x.dtype)
    bias_args = dict(device=x.device) if skip_bias_dtype else dict(device=x.device, dtype=x.dtype)
    return get_weight_and_bias(layer, weight_args, bias_args, weight_fn=weight_fn)


class ForgeOperations:
    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features, bias=True, dtype=None):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = torch.nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype), requires_grad=False)
            self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
            self.scale_weight = None
            self.parameters_manual_cast = True

        def forward(self, x):
            weight, bias = weights_manual_cast(self, x) if self.parameters_manual_cast else get_weight_and_bias(self)
            return torch.nn.functional.linear(x, weight, bias)

    class Conv2d(torch.nn.Conv2d):
        parameters_manual_cast = True

        def forward(self, x):
            weight, bias = weights_manual_cast(self, x) if self.parameters_manual_cast else get_weight_and_bias(self)
            return self._conv_forward(x, weight, bias)


class ForgeOperationsGGUF(ForgeOperations):
    class Linear(torch.nn.Module):
        def __init__(self, weight, bias=None):
            super().__init__()
            self.weight = weight
            self.bias = bias
            self.parameters_manual_cast = False

        def _apply(self, fn, recurse=True):  # as Forge: only its own parameters, no children, no buffers
            for k, p in self.named_parameters(recurse=False, remove_duplicate=True):
                setattr(self, k, utils.tensor2parameter(fn(p)))
            return self

        def forward(self, x):
            if self.bias is not None and self.bias.dtype != x.dtype:
                self.bias = utils.tensor2parameter(dequantize_tensor(self.bias).to(x.dtype))
            weight, bias = weights_manual_cast(self, x, skip_bias_dtype=True, weight_fn=dequantize_tensor)
            return torch.nn.functional.linear(x, weight, bias)
