"""Fake `modules.sd_models`: metadata reader (real in both hosts), read_state_dict (a stub in Forge), model_data."""

import json
import struct

from modules import shared


def read_metadata_from_safetensors(filename):
    with open(filename, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        doc = json.loads(f.read(n))
    res = {}
    for k, v in (doc.get("__metadata__") or {}).items():
        if isinstance(v, str) and v[:1] == "{":
            try:
                v = json.loads(v)
            except Exception:
                pass
        res[k] = v
    return res


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    if shared.FLAVOUR == "forge":
        return None
    import safetensors.torch
    return safetensors.torch.load_file(checkpoint_file, device="cpu")


class _ModelData:
    def get_sd_model(self):
        return shared.sd_model

    def set_sd_model(self, v):
        shared.sd_model = v


model_data = _ModelData()
