"""PEFT-written adapters (LoRA, DoRA, rsLoRA, LoHa, LoKr) merge like PEFT's own `merge_and_unload`.

PEFT files carry no alpha tensors: the scale comes from the config, which diffusers stores as the
`lora_adapter_metadata` JSON (unprefixed here for a bare PEFT model, `unet.`-prefixed as diffusers writes it).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lib_adapters.adapter import Adapter
from reference_adapters import LAYERS, build_peft, max_rel_error

STRENGTHS = (0.0, 0.5, 1.0, -1.0, 1.7)
TOL = 1e-5

CASES = {
    "lora": ("lora", dict(r=4, lora_alpha=8)),
    "dora": ("lora", dict(r=4, lora_alpha=8, use_dora=True)),
    "rslora": ("lora", dict(r=4, lora_alpha=6, use_rslora=True)),
    "alpha-pattern": ("lora", dict(r=4, lora_alpha=8, alpha_pattern={"conv3": 2})),
    # the regular-expression forms users give PEFT: anchors, classes, alternation, wildcards; the first key that
    # matches wins, in file order (diffusers writes the config with sorted keys: given sorted here)
    "regex-patterns": ("lora", dict(r=4, lora_alpha=8, rank_pattern={r"^conv\d$": 2, "lin": 3},
                                    alpha_pattern={"^conv1$": 3, "conv(1|3)": 5, "l.[mn]": 6})),
    "loha": ("loha", dict(r=4, alpha=8, use_effective_conv2d=True)),
    "lokr": ("lokr", dict(r=4, alpha=8, decompose_both=True)),
}


@pytest.fixture(scope="session")
def peft_cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("peft")
    out = {}
    for name, (kind, config) in CASES.items():
        built = build_peft(kind, **config)
        path = folder / f"{name}.safetensors"
        save_file(built.state_dict, str(path), metadata=built.metadata)
        out[name] = (built, Adapter.load(path))
    return out


def test_peft_keys_as_written():
    """What PEFT 0.21 writes: adapter name stripped, `lora_magnitude_vector` without `.weight`."""
    built = build_peft("lora", r=2, lora_alpha=2, use_dora=True)
    keys = set(built.state_dict)
    assert "base_model.model.lin.lora_A.weight" in keys and "base_model.model.lin.lora_magnitude_vector" in keys
    assert not any(".default" in k for k in keys)
    assert tuple(built.state_dict["base_model.model.conv3.lora_magnitude_vector"].shape) == (1, 48, 1, 1)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft_merge_and_unload(peft_cases, case):
    built, adapter = peft_cases[case]
    assert adapter.unmatched == []
    errors = {}
    for layer in LAYERS:
        patch = adapter.layers[built.module_key(layer)]
        w0, b0 = built.base[layer]
        for s in STRENGTHS:
            ref_w, _ = built.reference(layer, s)
            w, b = patch.merge(w0.clone(), s, b0.clone())
            if s == 0:
                assert torch.equal(w, w0) and torch.equal(b, b0)
            else:
                assert (ref_w - w0).abs().max() > 1e-2 * w0.abs().max()
            errors[layer, s] = max_rel_error(w, ref_w)
    assert max(errors.values()) <= TOL, {k: v for k, v in errors.items() if v > TOL}


def test_diffusers_prefixed_metadata_and_keys(peft_cases, tmp_path):
    """The same LoRA as diffusers saves it: `unet.` module keys, config flattened as `unet.r`, `unet.lora_alpha`."""
    built, _ = peft_cases["alpha-pattern"]
    sd = {k.replace("base_model.model.", "unet."): v for k, v in built.state_dict.items()}
    config = json.loads(built.metadata["lora_adapter_metadata"])
    meta = {"format": "pt", "lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()})}
    path = tmp_path / "diffusers.safetensors"
    save_file(sd, str(path), metadata=meta)
    adapter = Adapter.load(path)
    for layer in LAYERS:
        w0, _ = built.base[layer]
        ref, _ = built.reference(layer, 0.5)
        assert max_rel_error(adapter.layers[f"unet.{layer}"].merge(w0, 0.5)[0], ref) <= TOL


def test_without_metadata_peft_lora_means_scale_one(peft_cases, tmp_path):
    """No alpha tensor and no config: scale 1 (the diffusers/PEFT default lora_alpha = r)."""
    built, _ = peft_cases["lora"]
    path = tmp_path / "bare.safetensors"
    save_file(built.state_dict, str(path))
    adapter = Adapter.load(path)
    for layer in LAYERS:
        sd = built.state_dict
        up = sd[f"base_model.model.{layer}.lora_B.weight"]
        down = sd[f"base_model.model.{layer}.lora_A.weight"]
        w0, _ = built.base[layer]
        expected = w0 + (up.flatten(1) @ down.flatten(1)).reshape(w0.shape)
        assert max_rel_error(adapter.layers[f"base_model.model.{layer}"].merge(w0, 1.0)[0], expected) <= TOL


@pytest.mark.parametrize("case", ["dora", "lokr"])
def test_runtime_state_dict_with_adapter_name_loads_the_same(peft_cases, case):
    """`peft_model.state_dict()` spells `lora_A.default.weight`, `lokr_w1.default`: the adapter name is dropped."""
    built, adapter = peft_cases[case]
    peft_model = built.extra["model"]
    runtime = {k: v.detach().clone() for k, v in peft_model.state_dict().items() if ".default" in k}
    assert runtime and all(".default" in k for k in runtime)
    again = Adapter.from_tensors(runtime, built.metadata, "runtime")
    assert set(again.layers) == set(adapter.layers) and again.unmatched == []
    for layer in LAYERS:
        w0, _ = built.base[layer]
        key = built.module_key(layer)
        assert torch.equal(again.layers[key].merge(w0, 0.7)[0], adapter.layers[key].merge(w0, 0.7)[0])
