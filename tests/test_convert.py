"""`convert`: kohya ↔ diffusers/PEFT files load in diffusers and merge like the original; round trips are lossless;
what PEFT or diffusers cannot hold is refused with one clear error and no output."""

import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from lib_adapters.adapter import Adapter  # noqa: E402
from lib_adapters.convert import HINT_KEY, convert_file, kohya_names  # noqa: E402
from lib_adapters.demo import build_demo_pipeline  # noqa: E402
from lib_adapters.errors import AdapterError  # noqa: E402
from lib_adapters.files import load_tensors, save_tensors  # noqa: E402
from lib_adapters.hosts.diffusers import DiffusersAdapters  # noqa: E402


META = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_base_model_version": "sd_v1",
        "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.title": "rich", "ss_tag_frequency": '{"a": 1}'}


def rich_kohya(pipe, path, dora=False, dtype=torch.float16, uniform=False):
    """kohya SD1 file: LoRA with mixed ranks/alphas (fp16 alpha), one zero alpha, one missing alpha,
    LoCon on 3×3 resnet convs, text-encoder layers; optionally output-axis DoRA on every UNet layer.
    `uniform`: rank 4 and alpha 3 everywhere (diffusers 0.42 drops per-module kohya alphas on load)."""
    g = torch.Generator().manual_seed(4)
    names = kohya_names("sd1")
    t = {}
    layers = [(f"unet.{n}", m) for n, m in pipe.unet.named_modules()
              if (isinstance(m, torch.nn.Linear) and "attn" in n) or n.endswith("resnets.0.conv1")]
    layers += [(f"text_encoder.text_model.{n.removeprefix('text_model.')}", m)
               for n, m in pipe.text_encoder.named_modules() if isinstance(m, torch.nn.Linear) and "layers.1." in n]
    for i, (full, m) in enumerate(layers):
        key = names[full]
        rank = 4 if uniform else (2, 3, 4)[i % 3]
        w = m.weight
        down_shape = (rank, w.shape[1], *w.shape[2:])
        up_shape = (w.shape[0], rank, *([1, 1] if w.ndim == 4 else []))
        t[f"{key}.lora_down.weight"] = (torch.randn(down_shape, generator=g) * 0.3).to(dtype)
        t[f"{key}.lora_up.weight"] = (torch.randn(up_shape, generator=g) * 0.3).to(dtype)
        if uniform:
            t[f"{key}.alpha"] = torch.tensor(3.0, dtype=dtype)
        elif i != 5:
            t[f"{key}.alpha"] = torch.tensor(0.0 if i == 7 else float(rank + i % 2), dtype=dtype)
        if dora and full.startswith("unet."):  # PEFT's use_dora is per component: every UNet layer
            norm = w.detach().flatten(1).norm(dim=1).reshape(-1, *[1] * (w.ndim - 1))
            t[f"{key}.dora_scale"] = (norm * (1 + 0.1 * torch.rand(norm.shape, generator=g))).to(dtype)
    save_tensors(path, t, META)
    return path


def weights(pipe):
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, c, None) is not None for k, v in getattr(pipe, c).state_dict().items()}


def our_merge(pipe, path, unet=1.0, te=1.0):
    with DiffusersAdapters(pipe) as adapters:
        adapters.apply([(path, unet, te)])
        return weights(pipe)


def diffusers_merge(build, path, scale=1.0):
    ref = build()
    ref.load_lora_weights(str(path), adapter_name="ref")
    ref.fuse_lora(lora_scale=scale, adapter_names=["ref"])
    ref.unload_lora_weights()
    return weights(ref)


def close(a, b, tol=2e-6):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < tol, worst


@pytest.mark.parametrize("target,fold", [("diffusers", False), ("diffusers", True), ("peft", False)])
def test_kohya_file_converted_loads_in_diffusers_and_fuses_like_our_merge(demo, tmp_path, target, fold):
    pipe, _, _ = demo
    src = rich_kohya(pipe, tmp_path / "rich.safetensors", dtype=torch.float32)
    dst = tmp_path / "out.safetensors"
    convert_file(src, dst, target, fold_scale=fold)
    header, tensors = load_tensors(dst)
    assert all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert all(k.startswith(("unet.", "text_encoder.")) for k in tensors)
    assert {k: v for k, v in header.metadata.items() if k in META} == META
    expected = our_merge(pipe, src)
    assert sum(not torch.equal(expected[k], v) for k, v in weights(pipe).items()) > 50
    close(diffusers_merge(build_demo_pipeline, dst), expected)
    close(our_merge(pipe, dst), expected)


def test_dora_file_goes_to_peft_magnitudes_that_diffusers_fuses_like_our_merge(demo, tmp_path):
    pipe, _, _ = demo
    src = rich_kohya(pipe, tmp_path / "dora.safetensors", dora=True, dtype=torch.float32)
    dst = tmp_path / "dora_diffusers.safetensors"
    convert_file(src, dst, "diffusers")
    header, tensors = load_tensors(dst)
    assert any(k.endswith("lora_magnitude_vector") for k in tensors)
    assert json.loads(header.metadata["lora_adapter_metadata"])["unet.use_dora"] is True
    expected = our_merge(pipe, src)
    close(our_merge(pipe, dst), expected)
    close(diffusers_merge(build_demo_pipeline, dst), expected, tol=1e-5)
    mixed = tmp_path / "mixed.safetensors"
    _, t = load_tensors(src)
    save_tensors(mixed, {k: v for k, v in t.items() if not (k.endswith("dora_scale") and "attn1" in k)}, META)
    with pytest.raises(AdapterError, match="DoRA on"):
        convert_file(mixed, tmp_path / "never.safetensors", "diffusers")
    assert not (tmp_path / "never.safetensors").exists()


@pytest.mark.parametrize("target", ["diffusers", "peft"])
def test_kohya_to_diffusers_to_kohya_is_lossless(demo, tmp_path, target):
    pipe, _, _ = demo
    src = rich_kohya(pipe, tmp_path / "rich16.safetensors", dora=True, dtype=torch.float16)
    mid, back = tmp_path / "mid.safetensors", tmp_path / "back.safetensors"
    convert_file(src, mid, target)
    convert_file(mid, back, "kohya")
    (h1, a), (h2, b) = load_tensors(src), load_tensors(back)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
    assert h1.metadata == h2.metadata


def test_a_file_saved_by_diffusers_converts_to_kohya_that_merges_like_diffusers_loads_it(demo, tmp_path):
    """Reverse direction against the reference: diffusers' own saved LoRA (PEFT keys, alpha in metadata)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = build_demo_pipeline()
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["to_q", "to_v", "to_out.0"], init_lora_weights=False)
    donor.unet.add_adapter(config)
    with torch.no_grad():
        for name, p in donor.unet.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)
    state = get_peft_model_state_dict(donor.unet)
    diffusers.StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=state,
                                                        unet_lora_adapter_metadata=config.to_dict(),
                                                        weight_name="saved.safetensors")
    saved = tmp_path / "saved.safetensors"
    kohya = tmp_path / "kohya.safetensors"
    convert_file(saved, kohya, "kohya", family="sd1")
    _, tensors = load_tensors(kohya)
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {6.0}
    pipe, _, _ = demo
    close(our_merge(pipe, kohya), diffusers_merge(build_demo_pipeline, saved))


def test_lokr_and_loha_go_to_peft_layouts_and_keep_their_merge(demo, tmp_path):
    pipe, paths, _ = demo
    g = torch.Generator().manual_seed(9)
    loha = {}
    for name, m in pipe.unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith("attn1.to_q"):
            key = "lora_unet_" + name.replace(".", "_")
            o, i = m.weight.shape
            loha.update({f"{key}.hada_w1_a": torch.randn(o, 2, generator=g), f"{key}.hada_w1_b": torch.randn(2, i, generator=g),
                         f"{key}.hada_w2_a": torch.randn(o, 2, generator=g), f"{key}.hada_w2_b": torch.randn(2, i, generator=g),
                         f"{key}.alpha": torch.tensor(1.0)})
    save_tensors(tmp_path / "loha.safetensors", loha, {"ss_network_module": "lycoris.kohya"})
    for src in (paths["demo_lokr"], tmp_path / "loha.safetensors"):
        dst = tmp_path / f"peft_{Path(src).stem}.safetensors"
        convert_file(src, dst, "peft", family="sd1")
        _, tensors = load_tensors(dst)
        assert all(k.startswith("unet.") and (".lokr_" in k or ".hada_" in k) for k in tensors)
        assert Adapter.load(dst).algorithms() == Adapter.load(src).algorithms()
        close(our_merge(pipe, dst, 0.7), our_merge(pipe, src, 0.7))
        with pytest.raises(AdapterError, match="diffusers loads only LoRA"):
            convert_file(src, tmp_path / "never.safetensors", "diffusers", family="sd1")
        assert not (tmp_path / "never.safetensors").exists()


def test_oft_is_refused_with_one_line_and_no_output(demo, tmp_path, capsys):
    from lib_adapters.cli import main

    _, paths, _ = demo
    out = tmp_path / "oft_peft.safetensors"
    assert main(["convert", str(paths["demo_oft"]), str(out), "--to", "peft"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "oft" in err and "PEFT" in err and "demo_oft" in err
    assert not out.exists()


def test_bad_inputs_give_the_same_errors_as_loading(demo, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(AdapterError) as convert_error:
        convert_file(bad, tmp_path / "x.safetensors", "diffusers")
    with pytest.raises(AdapterError) as load_error:
        Adapter.load(bad)
    assert str(convert_error.value) == str(load_error.value)
    _, paths, _ = demo
    with pytest.raises(AdapterError, match="overwrite the input"):
        convert_file(paths["demo_lora"], paths["demo_lora"], "diffusers")
    save_tensors(tmp_path / "odd.safetensors", {"lora_unet_nowhere_at_all.lora_down.weight": torch.zeros(2, 4),
                                                "lora_unet_nowhere_at_all.lora_up.weight": torch.zeros(4, 2)})
    with pytest.raises(AdapterError, match="matches no layer"):
        convert_file(tmp_path / "odd.safetensors", tmp_path / "y.safetensors", "diffusers", family="sd1")
    assert not list(tmp_path.glob("[xy].safetensors"))


def test_sdxl_te1_te2_convert_loads_in_diffusers_and_round_trips(tmp_path):
    from test_diffusers_host import sdxl_kohya_lora, tiny_sdxl

    pipe = tiny_sdxl()
    src = sdxl_kohya_lora(pipe, tmp_path / "xl.safetensors")
    mid, back = tmp_path / "xl_diffusers.safetensors", tmp_path / "xl_back.safetensors"
    convert_file(src, mid, "diffusers")
    _, tensors = load_tensors(mid)
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder", "text_encoder_2"}
    close(diffusers_merge(tiny_sdxl, mid), our_merge(pipe, src))
    convert_file(mid, back, "kohya")
    (h1, a), (h2, b) = load_tensors(src), load_tensors(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert h1.metadata == h2.metadata
    assert HINT_KEY not in h2.metadata


def test_rslora_scale_survives_conversion_to_kohya(demo, tmp_path):
    """PEFT rsLoRA scales by alpha/√r; the kohya file must carry the alpha that gives that scale with alpha/r."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = build_demo_pipeline()
    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["to_q", "to_v"], init_lora_weights=False)
    donor.unet.add_adapter(config)
    state = get_peft_model_state_dict(donor.unet)
    diffusers.StableDiffusionPipeline.save_lora_weights(str(tmp_path), unet_lora_layers=state,
                                                        unet_lora_adapter_metadata=config.to_dict(),
                                                        weight_name="rs.safetensors")
    kohya = tmp_path / "rs_kohya.safetensors"
    convert_file(tmp_path / "rs.safetensors", kohya, "kohya", family="sd1")
    _, tensors = load_tensors(kohya)
    assert {float(v) for k, v in tensors.items() if k.endswith(".alpha")} == {8 / 4**0.5 * 4}  # γ = 8/√4 = 4
    pipe, _, _ = demo
    close(our_merge(pipe, kohya), our_merge(pipe, tmp_path / "rs.safetensors"))
