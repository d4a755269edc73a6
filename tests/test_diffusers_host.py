"""Adapters merged into diffusers pipelines (hosts/diffusers.py) against diffusers' own load_lora_weights + fuse_lora,
independent formulas, and exact restore; shipped configs and single-file checkpoint loading."""

import json
import shutil

import numpy as np
import pytest
import torch

from lib_adapters.adapter import Adapter
from lib_adapters.errors import AdapterError
from lib_adapters.files import load_tensors, save_tensors

diffusers = pytest.importorskip("diffusers")

from lib_adapters.convert import kohya_names  # noqa: E402
from lib_adapters.demo import build_demo_pipeline  # noqa: E402
from lib_adapters.hosts.diffusers import DiffusersAdapters, apply_adapters, load_checkpoint_pipeline  # noqa: E402


def weights(pipe, components=("unet", "text_encoder", "text_encoder_2")):
    return {f"{c}.{k}": v.detach().clone() for c in components if getattr(pipe, c, None) is not None
            for k, v in getattr(pipe, c).state_dict().items()}


def image(pipe, prompt="a red fox", size=64, **kw):
    out = pipe(prompt, num_inference_steps=2, width=size, height=size, guidance_scale=7.0,
               generator=torch.Generator().manual_seed(5), output_type="np", **kw).images[0]
    return (out * 255).round().astype(np.uint8)


def fused_reference(build, path, unet, te, te_components=("text_encoder",)):
    """A fresh pipeline with diffusers' own loader: load_lora_weights, fuse per component, unload the adapter."""
    ref = build()
    ref.load_lora_weights(str(path), adapter_name="ref")
    ref.fuse_lora(components=["unet"], lora_scale=unet, adapter_names=["ref"])
    ref.fuse_lora(components=list(te_components), lora_scale=te, adapter_names=["ref"])
    ref.unload_lora_weights()
    return ref


def test_lora_at_other_strengths_equals_diffusers_fuse_lora_scale(demo):
    pipe, paths, _ = demo
    ref = fused_reference(build_demo_pipeline, paths["demo_lora"], 0.7, -0.4)
    with DiffusersAdapters(pipe) as adapters:
        adapters.apply([(paths["demo_lora"], 0.7, -0.4)])
        ours, theirs = weights(pipe), weights(ref)
        assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-6


def test_lora_merge_equals_diffusers_fuse_lora_weights_and_pixels(demo):
    pipe, paths, _ = demo
    ref = fused_reference(build_demo_pipeline, paths["demo_lora"], 1.0, 1.0)
    with DiffusersAdapters(pipe) as adapters:
        adapters.apply([(paths["demo_lora"], 1.0, 1.0)])
        ours, theirs = weights(pipe), weights(ref)
        assert ours.keys() == theirs.keys()
        changed = [k for k in ours if not torch.equal(ours[k], theirs[k])]
        worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
        assert worst < 1e-6, (changed[:3], worst)
        assert np.array_equal(image(pipe), image(ref))


def test_restore_is_bit_exact_after_lora_lokr_and_oft(demo):
    pipe, paths, _ = demo
    before = weights(pipe)
    handle = apply_adapters(pipe, [(paths["demo_lora"], 1.0, 0.5), (paths["demo_lokr"], 0.8), (paths["demo_oft"], 1.0)])
    during = weights(pipe)
    assert sum(not torch.equal(before[k], during[k]) for k in before) >= 100
    handle.restore()
    after = weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_strength_zero_is_the_unpatched_image(demo):
    pipe, paths, _ = demo
    plain = image(pipe)
    with DiffusersAdapters(pipe) as adapters:
        adapters.apply([(paths["demo_lora"], 0.0, 0.0), (paths["demo_oft"], 0.0)])
        assert np.array_equal(image(pipe), plain)
        adapters.apply([(paths["demo_lora"], 1.0, 1.0)])
        assert not np.array_equal(image(pipe), plain)


def test_lokr_and_oft_follow_their_formulas_on_a_live_layer(demo):
    """LoKr: W + γ·kron(w1, w2a·w2b); diag-OFT: each block of rows rotated by Rᵀ, R = (I+Q)(I−Q)⁻¹, Q = B−Bᵀ."""
    pipe, paths, _ = demo
    module = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    key = "lora_unet_" + module.replace(".", "_")
    w = pipe.unet.get_submodule(module).weight.detach().double().clone()
    _, lokr = load_tensors(paths["demo_lokr"])
    rank = lokr[f"{key}.lokr_w2_a"].shape[1]
    gamma = float(lokr[f"{key}.alpha"]) / rank
    delta = torch.kron(lokr[f"{key}.lokr_w1"].double(), lokr[f"{key}.lokr_w2_a"].double() @ lokr[f"{key}.lokr_w2_b"].double())
    _, oft = load_tensors(paths["demo_oft"])
    blocks = oft[f"{key}.oft_blocks"].double()
    q = blocks - blocks.transpose(1, 2)
    eye = torch.eye(blocks.shape[1], dtype=torch.float64)
    rot = torch.block_diag(*[(eye + qb) @ torch.linalg.inv(eye - qb) for qb in q])
    with DiffusersAdapters(pipe) as adapters:
        adapters.apply([(paths["demo_lokr"], 0.5, 0.0)])
        got = pipe.unet.get_submodule(module).weight.detach().double()
        assert torch.allclose(got, w + 0.5 * gamma * delta, atol=1e-5)
        adapters.apply([(paths["demo_oft"], 1.0, 0.0)])
        got = pipe.unet.get_submodule(module).weight.detach().double()
        assert torch.allclose(got, rot.T @ w, atol=1e-5)


def test_prompt_tags_apply_by_name_and_an_unknown_name_changes_nothing(demo):
    pipe, paths, folder = demo
    before = weights(pipe)
    adapters = DiffusersAdapters(pipe, lora_dirs=[folder])
    with pytest.raises(AdapterError, match="no adapter file"):
        adapters.apply_prompt("a fox <lora:demo_lora:1> <lora:nope:1>")
    after = weights(pipe)
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert adapters.apply_prompt("a fox <lora:DEMO_LORA:0.5:0>, snow") == "a fox , snow"
    now = weights(pipe)
    assert any(not torch.equal(before[k], now[k]) for k in before if k.startswith("unet."))
    assert all(torch.equal(before[k], now[k]) for k in before if k.startswith("text_encoder."))
    adapters.restore()


def test_a_broken_file_in_the_list_leaves_the_weights_alone(demo, tmp_path):
    pipe, paths, _ = demo
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(paths["demo_lora"].read_bytes()[:500])
    before = weights(pipe)
    adapters = DiffusersAdapters(pipe)
    with pytest.raises(AdapterError, match="bad.safetensors"):
        adapters.apply([(paths["demo_lora"], 1.0), (bad, 1.0)])
    after = weights(pipe)
    assert all(torch.equal(v, after[k]) for k, v in before.items())


# ---- SDXL ----------------------------------------------------------------------------------------------------


def tiny_sdxl():
    from lib_adapters.configs import tiny_tokenizer
    from lib_adapters.models import build_tiny

    c = build_tiny("sdxl", seed=3)
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipe = diffusers.StableDiffusionXLPipeline(vae=c["vae"], text_encoder=c["text_encoder"],
                                               text_encoder_2=c["text_encoder_2"], tokenizer=tiny_tokenizer(),
                                               tokenizer_2=tiny_tokenizer(), unet=c["unet"], scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_kohya_lora(pipe, path, seed=11):
    """A kohya SDXL LoRA (sgm UNet names, lora_te1_/lora_te2_) on every Linear of attentions and text encoders."""
    names = kohya_names("sdxl")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        for name, m in getattr(pipe, comp).named_modules():
            if not isinstance(m, torch.nn.Linear) or not any(s in name for s in ("attn", "mlp")):
                continue
            full = f"{comp}.{name}" if comp == "unet" else f"{comp}.text_model.{name.removeprefix('text_model.')}"
            key = names[full]
            o, i = m.weight.shape
            rank = 2 + (len(tensors) % 3)
            tensors[f"{key}.lora_down.weight"] = torch.randn(rank, i, generator=g) * 0.3
            tensors[f"{key}.lora_up.weight"] = torch.randn(o, rank, generator=g) * 0.3
            tensors[f"{key}.alpha"] = torch.tensor(float(rank + 1))
    save_tensors(path, tensors, {"ss_base_model_version": "sdxl_base_v1-0", "ss_network_dim": "4"})
    return path


def test_sdxl_lora_on_both_text_encoders_equals_diffusers_fuse_lora(tmp_path):
    pipe = tiny_sdxl()
    base = weights(pipe)
    path = sdxl_kohya_lora(pipe, tmp_path / "xl.safetensors")
    assert Adapter.load(path).family == "sdxl"
    for unet, te in ((1.0, 1.0), (0.8, 0.6)):
        ref = fused_reference(tiny_sdxl, path, unet, te, ("text_encoder", "text_encoder_2"))
        with DiffusersAdapters(pipe) as adapters:
            adapters.apply([(path, unet, te)])
            assert not any(adapters.unmatched.values())
            ours, theirs = weights(pipe), weights(ref)
            for comp in ("unet.", "text_encoder.", "text_encoder_2."):
                assert any(not torch.equal(ours[k], base[k]) for k in ours if k.startswith(comp))
            worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
            assert worst < 1e-6
            if unet == te == 1.0:  # diffusers folds kohya alphas into the factors: last-bit weight differences,
                # which may move a pixel by one level (seen on AMD EPYC, one thread), never more
                a, b = image(pipe).astype(int), image(ref).astype(int)
                assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01


# ---- shipped configs and single-file checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_shipped_configs_build_the_full_size_models(family):
    """The package's diffusers configs give the same parameter names and shapes as the real-size reference configs."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lib_adapters.configs import load_config
    from lib_adapters.models import configs

    expected = configs(family, "full")
    if family == "sd2":  # SD2 conditions on the penultimate layer: diffusers and kohya build 23 of OpenCLIP's 24
        expected["text_encoder"]["num_hidden_layers"] = 23
    with torch.device("meta"):
        ours = diffusers.UNet2DConditionModel.from_config(load_config(family, "unet"))
        ref = diffusers.UNet2DConditionModel(**expected["unet"])
        pairs = [(ours, ref)]
        for comp, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if comp in expected:
                cfg = {k: v for k, v in load_config(family, comp).items() if k != "architectures"}
                pairs.append((cls(CLIPTextConfig(**cfg)), cls(CLIPTextConfig(**expected[comp]))))
    for a, b in pairs:
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(sa[k].shape == sb[k].shape for k in sa)


def tiny_config_dir(family, folder):
    """The shipped model folder with tiny component configs and a byte-level tokenizer."""
    from lib_adapters.configs import config_dir, load_config, tiny_tokenizer
    from lib_adapters.models import configs

    shutil.copytree(config_dir(family), folder)
    for comp, cfg in configs(family).items():
        base = load_config(family, comp)
        base.update({k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()})
        (folder / comp / "config.json").write_text(json.dumps(base))
    for name in ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",):
        tiny_tokenizer().save_pretrained(str(folder / name))
    return folder


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_checkpoint_loads_every_weight_exactly(family, tmp_path):
    """WebUI (ldm/sgm) single file → diffusers pipeline through the shipped model folder, no hub."""
    from lib_adapters.models import build_tiny, to_checkpoint

    comps = build_tiny(family, seed=1)
    ckpt = tmp_path / "model.safetensors"
    save_tensors(ckpt, to_checkpoint(comps, family))
    pipe, detected = load_checkpoint_pipeline(ckpt, config_dir=tiny_config_dir(family, tmp_path / "cfg"))
    assert detected == family
    for comp, module in comps.items():
        want, got = module.state_dict(), getattr(pipe, comp).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), comp


def test_a_checkpoint_that_is_not_one_is_refused(tmp_path):
    path = tmp_path / "notamodel.safetensors"
    save_tensors(path, {"foo.weight": torch.zeros(2, 2)})
    with pytest.raises(AdapterError, match="not a Stable Diffusion"):
        load_checkpoint_pipeline(path)


def test_real_clip_vocabulary_tokenizes_like_clip():
    """Known CLIP ids (OpenAI's published vocabulary): 'a'=320, 'photo'=1125, 'of'=539, 'cat'=2368."""
    from lib_adapters.configs import clip_tokenizer, find_clip_bpe

    if find_clip_bpe() is None:
        pytest.skip("no package ships the CLIP BPE vocabulary here (pip install --no-deps open_clip_torch)")
    assert clip_tokenizer()("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_a_pickled_checkpoint_is_refused_even_with_an_explicit_family(tmp_path):
    from lib_adapters.errors import AdapterError

    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(AdapterError, match="pickled"):
        load_checkpoint_pipeline(path, family="sd1")
