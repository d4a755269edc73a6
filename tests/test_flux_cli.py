"""The command line on Flux: `merge` into single-file Flux checkpoints (all-in-one with text encoders and VAE, and
transformer only with or without a prefix) keeps the base's keys, shapes and dtypes, leaves untouched tensors
bit-identical and equals PEFT's merge; `inspect` reports the family, format, split-qkv and zero diffs; bad input
(another family, a partly matching file) is reported by name."""

import json

import pytest
import torch
from safetensors.torch import save_file

import flux_material as fm
import flux_references as refs
from lib_adapters.cli import main
from lib_adapters.files import load_tensors
from lib_adapters.models import build_tiny, to_checkpoint

ROOT = "model.diffusion_model."


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("flux-cli")
    ref = refs.peft_reference(seed=0, save_dir=str(d))
    loras = d / "loras"
    loras.mkdir()
    save_file(refs.kohya(ref), str(loras / "kohya.safetensors"), metadata={"ss_base_model_version": "flux1"})
    tensors, metadata = ref.files["diffusers"]
    save_file(tensors, str(loras / "peft.safetensors"), metadata=metadata)
    split, _ = refs.split_qkv_kohya(ref)
    save_file(split, str(loras / "split.safetensors"))
    mixture = dict(refs.comfy(ref))
    mixture["diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale.diff"] = torch.zeros(fm.HEAD_DIM)
    mixture["text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.diff"] = torch.zeros(24, 24)
    save_file(mixture, str(loras / "mixture.safetensors"))
    partly = dict(refs.kohya(ref))
    partly["lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight"] = torch.zeros(2, fm.H)
    partly["lora_unet_double_blocks_7_img_attn_qkv.lora_up.weight"] = torch.zeros(3 * fm.H, 2)
    save_file(partly, str(loras / "partly.safetensors"))
    sd1 = build_tiny("sd1", seed=1)
    from test_merge_cli import kohya_lora
    save_file(kohya_lora(sd1["unet"], "lora_unet_", 8, 1), str(loras / "sd1lora.safetensors"))
    save_file({k: v.contiguous() for k, v in to_checkpoint(sd1).items()}, str(d / "sd1.safetensors"))
    bases = {}
    for name, root, encoders, dtype in (("aio", ROOT, True, torch.bfloat16), ("bare", "", False, torch.float32),
                                        ("dm", "diffusion_model.", False, torch.float16)):
        ckpt = fm.checkpoint(fm.transformer(0), root=root, encoders=encoders, vae=encoders, dtype=dtype)
        ckpt["first_stage_marker"] = torch.arange(3)  # an integer tensor, kept as is
        bases[name] = (d / f"{name}.safetensors", root, dtype)
        save_file(ckpt, str(bases[name][0]), metadata={"modelspec.architecture": "flux-1-dev"})
    return d, ref, bases


def run(d, base, prompt, out="out.safetensors"):
    rc = main(["merge", "--checkpoint", str(base), "--lora-dir", str(d / "loras"), "--out", str(d / out), *prompt])
    return rc, d / out


@pytest.mark.parametrize("layout", ["aio", "bare", "dm"])
def test_merge_keeps_the_checkpoint_contract_and_equals_peft(setup, layout):
    d, ref, bases = setup
    path, root, dtype = bases[layout]
    rc, out = run(d, path, ["<lora:peft:0.7>"], f"{layout}-out.safetensors")
    assert rc == 0
    header, base = load_tensors(path)
    out_header, merged = load_tensors(out)
    assert {k: (e.dtype, e.shape) for k, e in out_header.entries.items()} == \
        {k: (e.dtype, e.shape) for k, e in header.entries.items()}
    assert out_header.metadata["modelspec.architecture"] == "flux-1-dev"
    want, base32 = fm.to_bfl(ref.expected(0.7, set(ref.factors))), fm.to_bfl(ref.base)
    changed = 0
    for k, v in base.items():
        rel = k[len(root):] if k.startswith(root) else None
        if rel in want and not torch.equal(want[rel], base32[rel]):
            exact = v.float() + (want[rel] - base32[rel])  # PEFT's delta on this checkpoint's own base
            ulp = exact.abs() * (2 ** -8 if dtype == torch.bfloat16 else 2 ** -11 if dtype == torch.float16 else 1e-6)
            assert bool(((merged[k].float() - exact).abs() <= ulp + 1e-7).all()), k  # one rounding, half an ulp
            changed += 1
        else:
            assert torch.equal(merged[k], v), f"untouched {k} changed"
    assert changed == 2 * 10 + 2 * 3 + 10  # every Linear weight of 2 double, 2 single blocks and the top level

def test_inspect_reports_flux_formats(setup, capsys):
    d, _, _ = setup
    for name, fmt in (("kohya", "kohya"), ("peft", "peft"), ("split", "kohya"), ("mixture", "ldm")):
        assert main(["inspect", "--json", str(d / "loras" / f"{name}.safetensors")]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["family"] == "flux" and summary["key_format"] == fmt, name
        assert ("split_qkv" in summary) == (name == "split")
        assert summary["zero_layers"] == (2 if name == "mixture" else 0)
    assert main(["inspect", str(d / "loras" / "split.safetensors")]) == 0
    assert "split-qkv" in capsys.readouterr().out


def test_another_family_is_refused_naming_the_file_and_both_families(setup, capsys):
    d, _, bases = setup
    rc, out = run(d, bases["bare"][0], ["<lora:sd1lora:1>"], "x.safetensors")
    err = capsys.readouterr().err
    assert rc != 0 and not out.exists()
    assert "sd1lora.safetensors" in err and "sd1" in err and "flux" in err
    rc, out = run(d, d / "sd1.safetensors", ["<lora:kohya:1>"], "y.safetensors")
    err = capsys.readouterr().err
    assert rc != 0 and not out.exists() and "kohya.safetensors" in err and "flux" in err and "sd1" in err


def test_a_partly_matching_file_is_applied_and_its_unmatched_keys_named(setup, capsys):
    d, _, bases = setup
    rc, out = run(d, bases["bare"][0], ["<lora:partly:1>"], "partly-out.safetensors")
    err = capsys.readouterr().err
    assert rc == 0 and out.exists()
    assert "lora_unet_double_blocks_7_img_attn_qkv" in err and "1 of" in err
    _, merged = load_tensors(out)
    _, base = load_tensors(bases["bare"][0])
    assert not torch.equal(merged["double_blocks.0.img_attn.qkv.weight"], base["double_blocks.0.img_attn.qkv.weight"])
