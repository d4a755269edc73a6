"""Fake `backend.operations_gguf`: ParameterGGUF (packed bytes, `shape` is the real shape, `gguf_cls` dequantizes once
baked) and dequantize_tensor. Dequantization is the `gguf` package's reference (numpy), not Forge's torch code."""

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants


class GGUFClass:
    """Stands for Forge's per-type class (gguf.Q4_K, …): `qtype`, `bake`, `dequantize_pytorch`."""

    def __init__(self, qtype: GGMLQuantizationType):
        self.qtype = qtype
        self.__name__ = qtype.name

    def bake(self, parameter):
        if parameter.baked:
            return
        block_size, type_size = GGML_QUANT_SIZES[self.qtype]
        parameter.data = parameter.data.reshape(-1, type_size).contiguous()  # Forge's baked layout: one row per block
        parameter.baked = True

    def dequantize_pytorch(self, x):
        if not x.baked:
            raise ValueError("GGUF Tensor is not baked!")
        rows = x.data.reshape(x.real_shape[0], -1).numpy()
        values = quants.dequantize(rows, self.qtype)
        return torch.from_numpy(np.ascontiguousarray(values)).to(x.computation_dtype).view(x.shape)


class ParameterGGUF(torch.nn.Parameter):
    def __new__(cls, data=None, requires_grad=False, no_init=False, qtype=None, shape=None):
        return super().__new__(cls, data, requires_grad=False)

    def __init__(self, data=None, requires_grad=False, no_init=False, qtype=None, shape=None):
        super().__init__()
        if no_init:
            return
        self.gguf_cls = GGUFClass(qtype) if qtype is not None else None
        self.real_shape = torch.Size(shape)
        self.computation_dtype = torch.float16
        self.baked = False

    @property
    def shape(self):
        return self.real_shape

    def copy_with_data(self, data):
        new = ParameterGGUF(data, no_init=True)
        new.gguf_cls, new.real_shape = self.gguf_cls, self.real_shape
        new.computation_dtype, new.baked = self.computation_dtype, self.baked
        return new

    def to(self, *args, **kwargs):
        return self.copy_with_data(self.data.to(*args, **kwargs))


def dequantize_tensor(tensor):
    if tensor is None or getattr(tensor, "gguf_cls", None) is None:
        return tensor
    return tensor.gguf_cls.dequantize_pytorch(tensor)


def quantize(weight: torch.Tensor, qtype: GGMLQuantizationType) -> ParameterGGUF:
    """A real GGUF tensor of `weight` (rows × columns, columns a multiple of the block size) by the gguf package."""
    packed = quants.quantize(weight.detach().float().numpy(), qtype)
    return ParameterGGUF(torch.from_numpy(packed), qtype=qtype, shape=weight.shape)
