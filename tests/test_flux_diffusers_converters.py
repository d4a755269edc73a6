"""Our reading of full-size Flux files agrees with diffusers' own converters (which hard-code FLUX.1's 3072/12288
widths and 19/38 blocks, so the files here are full size at rank 1–4): kohya (incl. split-qkv files, which diffusers
also applies at alpha/(3r) and alpha/(4r)) and BFL Control LoRAs. Each converted diffusers layer's B·A·x equals our
patch's rows for the BFL layer holding it, by the documented mapping."""

import pytest
import torch

import flux_material as fm
from lib_adapters import Adapter
from lib_adapters.naming import LayerMap

H, M, DOUBLE, SINGLE = 3072, 12288, 19, 38
ROOT = "model.diffusion_model."


@pytest.fixture(scope="module")
def shapes():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    return {k: tuple(v.shape) for k, v in fm.to_bfl(model.state_dict(), DOUBLE, SINGLE).items()}


def linears(shapes):
    return [(n[:-len(".weight")], s) for n, s in shapes.items() if n.endswith(".weight") and len(s) == 2]


def probe(adapter, layer_map, key, bfl, x):
    """Our patch's output rows for x, over the whole BFL layer `bfl` (the file names it whole)."""
    patch = adapter.layers[key]
    (target,) = layer_map.resolve(key, patch)
    assert target.weight == f"{ROOT}{bfl}.weight" and target.rows is None and target.order is None
    return (patch.up.double() @ (patch.down.double() @ x)) * patch.scale


def diffusers_rows(y, rows, swapped):
    if rows is not None:
        return y[rows[0]:rows[1]]
    return fm.swap(y) if swapped else y


def test_kohya_files_read_like_diffusers_converter(shapes):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    g = torch.Generator().manual_seed(0)
    tensors = {}
    split = {"double_blocks.3.img_attn.qkv": 3, "double_blocks.5.txt_attn.qkv": 3, "single_blocks.7.linear1": 4}
    for module, (out, inp) in linears(shapes):
        key = fm.kohya_name(module)
        parts = split.get(module)
        rank = parts or 1
        tensors[f"{key}.lora_down.weight"] = torch.randn(rank, inp, generator=g) * 0.1
        up = torch.randn(out, rank, generator=g) * 0.1
        if parts:  # block-diagonal up: kohya split_qkv=True
            widths = [H, H, H, M][:parts]
            mask, lo = torch.zeros_like(up), 0
            for j, w in enumerate(widths):
                mask[lo:lo + w, j] = 1
                lo += w
            up = up * mask
        tensors[f"{key}.lora_up.weight"] = up
        # diffusers ignores the final layer's alpha (a TODO in its converter): give those scale 1
        tensors[f"{key}.alpha"] = torch.tensor(float(rank) if "final_layer" in module else 0.5 + float(torch.rand(1, generator=g)))
    adapter = Adapter.from_tensors(tensors, {}, "kohya-full.safetensors")
    assert adapter.summary()["split_qkv"]["layers"] == len(split)
    layer_map = LayerMap.for_checkpoint({ROOT + k: s for k, s in shapes.items()})
    converted = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in tensors.items()})
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in converted}
    assert len(modules) == 19 * 14 + 38 * 6 + 10
    for module in sorted(modules):
        name = f"transformer.{module}" if f"transformer.{module}.lora_A.weight" in converted else module
        a, b = converted[f"{name}.lora_A.weight"].double(), converted[f"{name}.lora_B.weight"].double()
        x = torch.randn(a.shape[1], 2, generator=g, dtype=torch.float64)
        bfl, rows, swapped = fm.bfl_of(module, H, M, DOUBLE, SINGLE)
        ours = diffusers_rows(probe(adapter, layer_map, fm.kohya_name(bfl), bfl, x), rows, swapped)
        want = b @ (a @ x)
        assert float((ours - want).abs().max() / want.abs().max()) < 1e-6, module


def test_bfl_control_files_read_like_diffusers_converter(shapes):
    from diffusers.loaders.lora_conversion_utils import _convert_bfl_flux_control_lora_to_diffusers

    g = torch.Generator().manual_seed(1)
    tensors = {}
    for module, (out, inp) in linears(shapes):
        rank = 2 if module == "final_layer.adaLN_modulation.1" else 1  # diffusers chunks its lora_A in two
        tensors[f"{module}.lora_A.weight"] = torch.randn(rank, inp, generator=g) * 0.1
        tensors[f"{module}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.1
        tensors[f"{module}.lora_B.bias"] = torch.randn(out, generator=g) * 0.1
    for name, shape in shapes.items():
        if name.endswith("_norm.scale"):
            tensors[name] = 1 + 0.1 * torch.randn(shape, generator=g)
    adapter = Adapter.from_tensors(tensors, {}, "control-full.safetensors")
    assert adapter.key_format == "bfl-control" and not adapter.unmatched
    layer_map = LayerMap.for_checkpoint({ROOT + k: s for k, s in shapes.items()})
    converted = _convert_bfl_flux_control_lora_to_diffusers({k: v.clone() for k, v in tensors.items()})
    checked = 0
    for key, value in converted.items():
        module, _, param = key.removeprefix("transformer.").rpartition(".lora_") if ".lora_" in key else (None, 0, key)
        if module is None:  # a replaced norm gain
            dif = key.removeprefix("transformer.").removesuffix(".weight")
            bfl, _, _ = fm.bfl_of(dif, H, M, DOUBLE, SINGLE)
            patch = adapter.layers[f"{bfl}.scale"]
            (target,) = layer_map.resolve(f"{bfl}.scale", patch)
            assert target.weight == f"{ROOT}{bfl}.scale" and torch.equal(patch.value, value)
            checked += 1
            continue
        if param != "B.weight" or module == "norm_out.linear":  # diffusers also swaps lora_A's rank rows there
            continue
        a, b = converted[f"{key[:-len('B.weight')]}A.weight"].double(), value.double()
        bfl, rows, swapped = fm.bfl_of(module, H, M, DOUBLE, SINGLE)
        x = torch.randn(a.shape[1], 2, generator=g, dtype=torch.float64)
        ours = diffusers_rows(probe(adapter, layer_map, bfl, bfl, x), rows, swapped)
        assert float((ours - b @ (a @ x)).abs().max() / (b @ (a @ x)).abs().max()) < 1e-6, module
        bias = converted[f"{key[:-len('B.weight')]}B.bias"].double()
        ours_bias = diffusers_rows(adapter.layers[bfl].up_bias.double(), rows, swapped)
        assert torch.equal(ours_bias, bias), module
        checked += 1
    assert checked == (19 * 14 + 38 * 6 + 9) + (19 * 4 + 38 * 2)
