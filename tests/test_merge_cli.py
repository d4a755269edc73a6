"""`python -m lib_adapters merge`: output keys/shapes/dtypes equal the base's, untouched tensors are bit-identical,
tags stack, fp16 bases are within one rounding step of the fp32 merge, and every bad input exits non-zero with one
line naming the file and the reason, leaving no output file."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from lib_adapters.cli import main
from lib_adapters.files import load_tensors
from lib_adapters.models import build_tiny, to_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kohya_lora(model, prefix, count, seed, rank=2, alpha=1.5, kinds=(torch.nn.Linear,)):
    """Random kohya-named LoRA tensors on the first `count` layers of `model` of the given kinds."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)][:count]
    for name, m in layers:
        key = prefix + name.replace(".", "_")
        w = m.weight
        out[f"{key}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * 0.3
        out[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], rank, *[1] * (w.ndim - 2), generator=g) * 0.3
        out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    comps = build_tiny("sd1", seed=2)
    ckpt = {k: v.contiguous() for k, v in to_checkpoint(comps).items()}
    base = d / "base.safetensors"
    save_file(ckpt, str(base), metadata={"note": "tiny"})
    half = {k: v.half() if v.dtype == torch.float32 and k != "alphas_cumprod" else v for k, v in ckpt.items()}
    save_file(half, str(d / "base16.safetensors"))
    save_file({k: v.float() if v.is_floating_point() else v for k, v in half.items()}, str(d / "base16up.safetensors"))
    loras = d / "loras"
    (loras / "sub").mkdir(parents=True)
    a = kohya_lora(comps["unet"], "lora_unet_", 12, 1)
    a.update(kohya_lora(comps["text_encoder"], "lora_te_text_model_", 6, 2))
    save_file(a, str(loras / "alpha.safetensors"))
    b = kohya_lora(comps["unet"], "lora_unet_", 20, 3, kinds=(torch.nn.Linear, torch.nn.Conv2d))
    b["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(2, 4)
    b["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(4, 2)
    save_file(b, str(loras / "sub" / "Beta.safetensors"))
    xl = build_tiny("sdxl", seed=2)
    save_file(kohya_lora(xl["text_encoder_2"], "lora_te2_", 4, 4), str(loras / "xl.safetensors"))
    wrong = kohya_lora(comps["unet"], "lora_unet_", 40, 5)  # same names, other widths (as another family's)
    wrong = {k: torch.cat([v, v[:, :8]], 1) if k.endswith("lora_down.weight") else v for k, v in wrong.items()}
    save_file(wrong, str(loras / "wrongwidth.safetensors"))
    save_file(a, str(loras / "tagged.safetensors"), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    save_file({"emb_params": torch.zeros(2, 16)}, str(loras / "embedding.safetensors"))
    raw = (loras / "alpha.safetensors").read_bytes()
    (loras / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (loras / "pickle.ckpt").write_bytes(b"\x80\x02}q\x00.")
    return d, ckpt


def run(d, *prompt, out="out.safetensors", base="base.safetensors", extra=()):
    out_path = d / out
    if out_path.exists():
        out_path.unlink()
    argv = ["merge", "--checkpoint", str(d / base), "--lora-dir", str(d / "loras"), "--out", str(out_path), *extra,
            *prompt]
    return main(argv), out_path


def test_merge_keeps_keys_shapes_dtypes_and_untouched_bits(setup, capsys):
    d, ckpt = setup
    rc, out = run(d, "a", "photo", "<lora:alpha:0.8:0.5>", "<lora:beta:1>")
    assert rc == 0, capsys.readouterr().err
    header, merged = load_tensors(out)
    assert sorted(merged) == sorted(ckpt)
    reference_reader = load_file(str(out))  # the file is valid for safetensors itself
    assert all(torch.equal(reference_reader[k], v) for k, v in merged.items())
    changed = 0
    for k, v in ckpt.items():
        assert merged[k].dtype == v.dtype and merged[k].shape == v.shape, k
        changed += not torch.equal(merged[k], v)
    layers = {k.split(".")[0] for name in ("alpha", "sub/Beta") for k in load_tensors(d / "loras" / f"{name}.safetensors")[1]}
    assert changed == len(layers - {"lora_unet_not_a_layer"})
    assert header.metadata["note"] == "tiny" and json.loads(header.metadata["lib_adapters.merged"])
    err = capsys.readouterr().err
    assert "not_a_layer" in err  # unmatched keys are reported by name


def test_tags_stack_like_successive_merges(setup, capsys):
    d, _ = setup
    rc, both = run(d, "<lora:alpha:0.8:0.5>", "<lora:sub/Beta:-0.4>", out="both.safetensors")
    assert rc == 0
    rc, first = run(d, "<lora:alpha:0.8:0.5>", out="first.safetensors")
    rc2, second = run(d, "<lora:beta:-0.4>", out="second.safetensors", base="first.safetensors")
    assert rc == rc2 == 0
    a, b = load_tensors(both)[1], load_tensors(second)[1]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_unet_and_te_strengths_apply_separately(setup):
    d, ckpt = setup
    rc, out = run(d, "<lora:alpha:1:te=0>")
    merged = load_tensors(out)[1]
    te = [k for k in ckpt if k.startswith("cond_stage_model.")]
    unet = [k for k in ckpt if k.startswith("model.diffusion_model.")]
    assert rc == 0 and all(torch.equal(merged[k], ckpt[k]) for k in te)
    assert any(not torch.equal(merged[k], ckpt[k]) for k in unet)


def test_fp16_base_is_within_one_rounding_step(setup):
    """Mixed base (fp16 weights, fp32 alphas_cumprod, int64 position_ids): dtypes kept, math in fp32."""
    d, _ = setup
    rc, out16 = run(d, "<lora:alpha:0.9>", "<lora:beta:0.6>", base="base16.safetensors", out="o16.safetensors")
    rc2, out32 = run(d, "<lora:alpha:0.9>", "<lora:beta:0.6>", base="base16up.safetensors", out="o32.safetensors")
    assert rc == rc2 == 0
    base = load_tensors(d / "base16.safetensors")[1]
    m16, m32 = load_tensors(out16)[1], load_tensors(out32)[1]
    worst = 0.0
    for k, v in base.items():
        assert m16[k].dtype == v.dtype, k
        if v.dtype == torch.float16:
            exact = m32[k]
            step = torch.finfo(torch.float16).eps * exact.abs().clamp_min(2.0**-14)
            err = (m16[k].float() - exact).abs()
            assert bool((err <= step).all()), k
            worst = max(worst, float((err / step).max()))
        else:
            assert torch.equal(m16[k], v), k
    assert worst <= 1.0


@pytest.mark.parametrize("dtype,want", [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_dtype_option_converts_floating_tensors_only(setup, dtype, want):
    d, ckpt = setup
    rc, keep = run(d, "<lora:alpha:1>", out="keep.safetensors")
    rc2, conv = run(d, "<lora:alpha:1>", out=f"{dtype}.safetensors", extra=["--dtype", dtype])
    assert rc == rc2 == 0
    kept, converted = load_tensors(keep)[1], load_tensors(conv)[1]
    for k, v in kept.items():
        if v.is_floating_point():
            assert converted[k].dtype == want and torch.equal(converted[k], v.to(want)), k
        else:
            assert converted[k].dtype == v.dtype and torch.equal(converted[k], v), k


BAD = [  # prompt, base, words expected in the message
    (["<lora:nosuch:1>"], "base.safetensors", ["nosuch", "no adapter file"]),
    (["<lora:truncated:1>"], "base.safetensors", ["truncated.safetensors", "truncated"]),
    (["<lora:embedding:1>"], "base.safetensors", ["embedding.safetensors", "not an adapter"]),
    (["<lora:pickle:1>"], "base.safetensors", ["pickle.ckpt", "pickle"]),
    (["<lora:xl:1>"], "base.safetensors", ["xl.safetensors", "sdxl"]),
    (["<lora:tagged:1>"], "base.safetensors", ["tagged.safetensors", "sdxl", "sd1"]),
    (["<lora:wrongwidth:1>"], "base.safetensors", ["wrongwidth.safetensors", "does not fit"]),
    (["<lora:alpha:strong>"], "base.safetensors", ["malformed tag", "strong"]),
    (["<lora:alpha:1:2:3>"], "base.safetensors", ["malformed tag"]),
    (["<lora:alpha:1>"], "loras/alpha.safetensors", ["alpha.safetensors", "not a model checkpoint"]),
    (["<lora:alpha:1>"], "loras/truncated.safetensors", ["truncated.safetensors", "truncated"]),
    (["<lora:alpha:1>"], "missing.safetensors", ["missing.safetensors", "cannot be read"]),
]


@pytest.mark.parametrize("prompt,base,words", BAD, ids=[f"{i}-{b[0][0]}" for i, b in enumerate(BAD)])
def test_bad_input_exits_nonzero_with_one_line_and_no_output(setup, capsys, prompt, base, words):
    d, _ = setup
    rc, out = run(d, *prompt, base=base, out="bad.safetensors")
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert not out.exists() and not list(d.glob("bad.safetensors*"))
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w.lower() in err.lower(), err


def test_command_line_entry_point_exit_codes(setup):
    d, _ = setup
    cmd = [sys.executable, "-m", "lib_adapters", "merge", "--checkpoint", str(d / "base.safetensors"),
           "--lora-dir", str(d / "loras"), "--out", str(d / "cli.safetensors")]
    ok = subprocess.run(cmd + ["<lora:alpha:0.5>"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (d / "cli.safetensors").exists()
    (d / "cli.safetensors").unlink()
    bad = subprocess.run(cmd + ["<lora:nosuch:1>"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "nosuch" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (d / "cli.safetensors").exists()


@pytest.mark.parametrize("dtype,want", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_output_dtype_rounds_the_fp32_merge_once_not_through_the_base_dtype(setup, dtype, want):
    """fp16 base, --dtype fp32/bf16: merged weights are the fp32 math (as from an fp32 copy of the same base)
    rounded once to the output dtype; untouched ones the base converted."""
    d, _ = setup
    rc, out = run(d, "<lora:alpha:0.9>", base="base16.safetensors", out=f"o16-{dtype}.safetensors", extra=["--dtype", dtype])
    rc2, ref = run(d, "<lora:alpha:0.9>", base="base16up.safetensors", out="o16up.safetensors")
    assert rc == rc2 == 0
    base, merged, exact = load_tensors(d / "base16.safetensors")[1], load_tensors(out)[1], load_tensors(ref)[1]
    changed = [k for k, v in base.items() if v.dtype == torch.float16 and not torch.equal(exact[k], v.float())]
    assert changed
    for k, v in base.items():
        if not v.is_floating_point():
            continue
        assert merged[k].dtype == want and torch.equal(merged[k], exact[k].to(want)), k
    if want == torch.float32:  # values no fp16 could hold: not rounded through the base's dtype
        assert any(not torch.equal(merged[k], merged[k].half().float()) for k in changed)


@pytest.mark.parametrize("how", ["same-path", "adapter", "linked-folder", "hard-link"])
def test_merge_refuses_an_output_that_is_one_of_its_inputs(setup, tmp_path, how):
    d, _ = setup
    base = tmp_path / "base.safetensors"
    base.write_bytes((d / "base.safetensors").read_bytes())
    adapter = d / "loras" / "alpha.safetensors"
    if how == "same-path":
        out = base
    elif how == "adapter":
        out = adapter
    elif how == "linked-folder":
        os.symlink(tmp_path, tmp_path / "link")
        out = tmp_path / "link" / "base.safetensors"
    else:
        os.link(base, tmp_path / "hard.safetensors")
        out = tmp_path / "hard.safetensors"
    before = {p: p.read_bytes() for p in (base, adapter)}
    argv = ["merge", "--checkpoint", str(base), "--lora-dir", str(d / "loras"), "--out", str(out), "<lora:alpha:1>"]
    assert main(argv) == 2
    assert all(p.read_bytes() == data for p, data in before.items())
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_convert_refuses_an_output_reaching_its_input_through_a_linked_folder(tmp_path):
    from lib_adapters.convert import convert_file
    from lib_adapters.errors import AdapterError

    src = tmp_path / "a.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2)},
              str(src))
    os.symlink(tmp_path, tmp_path / "link")
    data = src.read_bytes()
    with pytest.raises(AdapterError, match="the same file on disk"):
        convert_file(src, tmp_path / "link" / "a.safetensors", "diffusers")
    assert src.read_bytes() == data
