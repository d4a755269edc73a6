"""Every LyCORIS algorithm, built by lycoris-lora itself, merges like the LyCORIS forward pass.

Files are the library's own state dicts (kohya-style `lora_unet_` prefix), saved with safetensors and read back
with `Adapter.load`. Where our documented semantics differ from LyCORIS (OFT/BOFT rescale at s ≠ 1, DoRA strength,
LoHa/LoKr `merge_to`), the reference is derived from LyCORIS as described in tests/reference_adapters.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lib_adapters.adapter import Adapter
from reference_adapters import build_ia3, build_lycoris, max_rel_error

STRENGTHS = (0.0, 0.5, 1.0, -1.0, 1.7)
TOL = 1e-5
DIMS = dict(linear_dim=8, linear_alpha=4, conv_dim=4, conv_alpha=2)

# case name → (create_lycoris kwargs, keys that must be in the file so the case tests what it says)
CASES = {
    "lora": (dict(algo="lora", train_norm=True, **DIMS), ["conv3.lora_down.weight", "ln.w_norm", "gn.b_norm"]),
    "lora-tucker": (dict(algo="lora", use_tucker=True, **DIMS), ["conv3.lora_mid.weight"]),
    "loha": (dict(algo="loha", **DIMS), ["conv3.hada_w1_b"]),
    "loha-tucker": (dict(algo="loha", use_tucker=True, **DIMS), ["conv3.hada_t1", "conv3.hada_t2"]),
    "lokr-full-full": (dict(algo="lokr", **DIMS), ["lin.lokr_w1", "lin.lokr_w2"]),
    "lokr-factor4": (dict(algo="lokr", factor=4, **DIMS), ["lin.lokr_w2_a"]),
    "lokr-decompose-both": (dict(algo="lokr", factor=8, decompose_both=True, linear_dim=2, linear_alpha=1,
                                 conv_dim=2, conv_alpha=1), ["lin.lokr_w1_a", "lin.lokr_w2_a"]),
    "lokr-tucker": (dict(algo="lokr", factor=4, use_tucker=True, linear_dim=8, linear_alpha=4, conv_dim=2,
                         conv_alpha=1), ["conv3.lokr_t2"]),
    "lokr-full-matrix": (dict(algo="lokr", factor=4, full_matrix=True, **DIMS), ["lin.lokr_w2"]),
    "lokr-unbalanced": (dict(algo="lokr", factor=4, unbalanced_factorization=True, **DIMS), ["lin.lokr_w1"]),
    "diag-oft": (dict(algo="diag-oft", linear_dim=16, conv_dim=16), ["lin.oft_blocks"]),
    "diag-oft-constrained-rescaled": (dict(algo="diag-oft", linear_dim=16, conv_dim=16, constraint=0.02, rescaled=True),
                                      ["lin.rescale", "conv3.rescale"]),
    "boft": (dict(algo="boft", linear_dim=8, conv_dim=8), ["lin.oft_blocks"]),
    "boft-constrained-rescaled": (dict(algo="boft", linear_dim=8, conv_dim=8, constraint=0.02, rescaled=True),
                                  ["lin.rescale"]),
    "glora": (dict(algo="glora", **DIMS), ["lin.a1.weight", "conv3.b2.weight"]),
    "full": (dict(algo="full"), ["lin.diff", "lin.diff_b"]),
}
for algo in ("lora", "loha", "lokr"):
    for on_output in (True, False):
        extra = dict(factor=4) if algo == "lokr" else {}
        CASES[f"dora-{algo}-{'out' if on_output else 'in'}"] = (
            dict(algo=algo, dora_wd=True, wd_on_output=on_output, **extra, **DIMS), ["lin.dora_scale"])

@pytest.fixture(scope="session")
def built_cases(tmp_path_factory):
    """Every case built once, saved, and loaded back through the file reader."""
    out = {}
    folder = tmp_path_factory.mktemp("lycoris")
    for name, (kwargs, must_have) in CASES.items():
        built = build_lycoris(name, **kwargs)
        for key in must_have:
            assert f"lora_unet_{key}" in built.state_dict, (name, key, sorted(built.state_dict))
        path = folder / f"{name}.safetensors"
        save_file(built.state_dict, str(path))
        out[name] = (built, Adapter.load(path))
    for on_input in (False, True):
        built = build_ia3(on_input)
        path = folder / f"{built.name}.safetensors"
        save_file(built.state_dict, str(path))
        out[built.name] = (built, Adapter.load(path))
    return out


def merge_errors(built, adapter):
    """{(layer, strength): (weight error, bias error)} against the reference."""
    errors = {}
    for layer in built.layers:
        patch = adapter.layers[built.module_key(layer)]
        w0, b0 = built.base[layer]
        for s in STRENGTHS:
            ref_w, ref_b = built.reference(layer, s)
            w, b = patch.merge(w0.clone(), s, None if b0 is None else b0.clone())
            assert w.shape == w0.shape and w.dtype == torch.float32
            if s != 0:  # the adapter must do something measurable, or the comparison proves nothing
                assert (ref_w - w0).abs().max() > 1e-2 * w0.abs().max(), (layer, s)
            errors[layer, s] = (max_rel_error(w, ref_w), max_rel_error(b, ref_b) if ref_b is not None else 0.0)
    return errors


@pytest.mark.parametrize("case", list(CASES) + ["ia3-out", "ia3-in"])
def test_merge_matches_lycoris_reference(built_cases, case):
    built, adapter = built_cases[case]
    assert set(adapter.layers) == {built.module_key(n) for n in built.layers}
    assert adapter.unmatched == []
    errors = merge_errors(built, adapter)
    worst = max(max(e) for e in errors.values())
    assert worst <= TOL, {k: v for k, v in errors.items() if max(v) > TOL}


@pytest.mark.parametrize("case", list(CASES) + ["ia3-out", "ia3-in"])
def test_strength_zero_is_the_base_weight_exactly(built_cases, case):
    built, adapter = built_cases[case]
    for layer in built.layers:
        w0, b0 = built.base[layer]
        w, b = adapter.layers[built.module_key(layer)].merge(w0.clone(), 0.0, None if b0 is None else b0.clone())
        assert torch.equal(w, w0), layer
        assert b0 is None or torch.equal(b, b0), layer


def test_detected_kinds_and_dora_axes(built_cases):
    """The right patch type per file, DoRA axis from the shape of `dora_scale`, IA3 side from `on_input`."""
    from lib_adapters.algorithms import kind_name

    for name, (built, adapter) in built_cases.items():
        for layer in built.layers:
            patch = adapter.layers[built.module_key(layer)]
            if layer in ("ln", "gn"):
                assert kind_name(patch) == "norm"
                continue
            family = name.split("-")[0]
            if family == "dora":
                assert patch.dora and patch.on_output == name.endswith("-out")
                family = name.split("-")[1]
            expected = {"diag": "oft", "ia3": "ia3"}.get(family, family)
            kind = kind_name(patch)
            if expected == "lora":
                expected = "locon" if layer == "conv3" else "lora"
            assert kind == expected, (name, layer, kind)
            if family == "ia3":
                assert patch.on_input == name.endswith("-in")


def test_lokr_tucker_rank_and_scale_come_from_the_file(built_cases):
    """Tucker LoKr: rank = lokr_w2_b rows (not w2_a columns), γ = alpha / rank; full-full LoKr: no rank, γ = 1."""
    built, adapter = built_cases["lokr-tucker"]
    sd = built.state_dict
    patch = adapter.layers["lora_unet_conv3"]
    assert patch.rank == sd["lora_unet_conv3.lokr_t2"].shape[0] == sd["lora_unet_conv3.lokr_w2_b"].shape[0]
    assert patch.rank == built.extra["modules"]["conv3"].lora_dim
    full = built_cases["lokr-full-full"][1].layers["lora_unet_lin"]
    assert full.rank is None


@pytest.mark.parametrize("case", ["loha", "lokr-factor4"])
def test_loha_lokr_do_not_follow_lycoris_merge_gamma_squared(built_cases, case):
    """LyCORIS `get_merged_weight` scales LoHa/LoKr by γ² (formats.md §8 D1); we follow its forward (γ)."""
    built, adapter = built_cases[case]
    module = built.extra["modules"]["lin"]
    gamma = module.scale
    assert gamma != 1
    w0, _ = built.base["lin"]
    ours, _ = adapter.layers["lora_unet_lin"].merge(w0, 1.0)
    with torch.no_grad():
        lyco_merge, _ = module.get_merged_weight(1.0)
    assert max_rel_error(lyco_merge - w0, gamma * (ours - w0)) < TOL


def test_glora_old_layout_is_detected_and_merges_the_same(built_cases, tmp_path):
    """The 2023 layout (a1 (r, I), a2 (I, r), b1 (r, I), b2 (O, r), ΔW = b2·b1 + W·a2·a1) holds the same factors
    under swapped names; it must be recognised and give the same weight."""
    built, adapter = built_cases["glora"]
    old = {}
    swap = {"a1.weight": "a2.weight", "a2.weight": "a1.weight", "b1.weight": "b2.weight", "b2.weight": "b1.weight"}
    for layer in ("lin", "conv1"):
        for param, other in swap.items():
            old[f"lora_unet_{layer}.{param}"] = built.state_dict[f"lora_unet_{layer}.{other}"]
        old[f"lora_unet_{layer}.alpha"] = built.state_dict[f"lora_unet_{layer}.alpha"]
    path = tmp_path / "glora-old.safetensors"
    save_file(old, str(path))
    old_adapter = Adapter.load(path)
    for layer in ("lin", "conv1"):
        patch = old_adapter.layers[f"lora_unet_{layer}"]
        assert not patch.new_layout and patch.rank == built.extra["modules"][layer].lora_dim
        w0, b0 = built.base[layer]
        for s in STRENGTHS:
            ref, _ = built.reference(layer, s)
            assert max_rel_error(patch.merge(w0, s)[0], ref) <= TOL


def test_glora_square_layer_old_and_new_layout(tmp_path):
    """Linear(64→64): every shape test is ambiguous; rank < width decides, and both layouts merge right."""
    from lycoris.modules.glora import GLoRAModule

    torch.manual_seed(3)
    layer = torch.nn.Linear(64, 64)
    w0 = layer.weight.detach().clone()
    module = GLoRAModule("lora_unet_sq", layer, 1.0, lora_dim=8, alpha=2)
    module.apply_to()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    new = {f"lora_unet_sq.{k}": v.detach().clone() for k, v in module.state_dict().items()}
    swap = {"a1": "a2", "a2": "a1", "b1": "b2", "b2": "b1"}
    old = {}
    for key, value in new.items():
        module, _, param = key.partition(".")
        name = param.split(".")[0]
        old[f"{module}.{swap[name]}.weight" if name in swap else key] = value
    from reference_adapters import effective_weight

    ref, _ = effective_weight(layer, w0.shape)
    for sd, is_new in ((new, True), (old, False)):
        patch = Adapter.from_tensors(sd, path="sq").layers["lora_unet_sq"]
        assert patch.new_layout is is_new
        assert max_rel_error(patch.merge(w0, 1.0)[0], ref) <= TOL


ALPHA_FORMS = {
    "fp32": lambda a: a.float(),
    "fp16": lambda a: a.half(),
    "bf16": lambda a: a.bfloat16(),
    "int64": lambda a: a.round().long(),
    "shape-1": lambda a: a.reshape(1),
    "fp16-shape-1": lambda a: a.half().reshape(1),
}


@pytest.mark.parametrize("form", list(ALPHA_FORMS) + ["missing", "zero", "scale-key"])
def test_alpha_dtypes_shapes_and_absence(built_cases, form, tmp_path):
    """alpha as fp16/bf16/int64/(1,)-shaped scales by its stored value / rank; absent (or 0) alpha means scale 1."""
    from lycoris.functional.locon import diff_weight

    built, _ = built_cases["lora"]
    sd = dict(built.state_dict)
    for layer in ("lin", "conv3"):
        key = f"lora_unet_{layer}.alpha"
        sd[key] = torch.tensor(0.3 if form.startswith(("bf16", "fp16")) else sd[key].item())
        if form == "missing":
            del sd[key]
        elif form == "zero":
            sd[key] = torch.tensor(0.0)
        elif form == "scale-key":  # A1111: an explicit `scale` replaces alpha / rank
            sd[f"lora_unet_{layer}.scale"] = torch.tensor(0.25)
        else:
            sd[key] = ALPHA_FORMS[form](sd[key])
    path = tmp_path / f"alpha-{form}.safetensors"
    save_file(sd, str(path))
    adapter = Adapter.load(path)
    for layer in ("lin", "conv3"):
        down, up = sd[f"lora_unet_{layer}.lora_down.weight"], sd[f"lora_unet_{layer}.lora_up.weight"]
        alpha = sd.get(f"lora_unet_{layer}.alpha")
        gamma = 1.0 if alpha is None or float(alpha.float().reshape(-1)[0]) == 0 else \
            float(alpha.float().reshape(-1)[0]) / down.shape[0]
        if form == "scale-key":
            gamma = 0.25
        w0, _ = built.base[layer]
        expected = w0 + 0.5 * diff_weight(down, up, None, gamma=gamma).reshape(w0.shape)
        assert max_rel_error(adapter.layers[f"lora_unet_{layer}"].merge(w0, 0.5)[0], expected) <= TOL


@pytest.mark.parametrize("case", ["diag-oft-constrained-rescaled", "boft-constrained-rescaled"])
def test_oft_orientation_matches_lycoris_functional(built_cases, case):
    """Diag-OFT rotates blocks by Rᵀ, BOFT by R (formats.md §8 D15): `lycoris.functional.*.diff_weight` at s = 1."""
    from lycoris.functional import boft, diag_oft

    built, adapter = built_cases[case]
    for layer in ("lin", "conv3"):
        module = built.extra["modules"][layer]
        w0, _ = built.base[layer]
        fn = diag_oft.diff_weight if case.startswith("diag") else boft.diff_weight
        with torch.no_grad():
            ref = w0 + fn(w0, module.oft_blocks, module.rescale, constraint=module.constraint)
        assert max_rel_error(adapter.layers[f"lora_unet_{layer}"].merge(w0, 1.0)[0], ref) <= TOL


def test_lycoris_2_0_oft_diag_holds_the_rotation(built_cases):
    """LyCORIS 2.0 saved `oft_diag` = R itself (no alpha): same weight as the blocks it came from, at any s."""
    built, _ = built_cases["diag-oft"]
    for layer in LAYERS_WITH_WEIGHTS:
        module = built.extra["modules"][layer]
        with torch.no_grad():
            rotation = module.get_r().detach().clone()
        patch = Adapter.from_tensors({f"m.oft_diag": rotation}, path="oft_diag").layers["m"]
        w0, _ = built.base[layer]
        for s in STRENGTHS:
            ref, _ = built.reference(layer, s)
            assert max_rel_error(patch.merge(w0, s)[0], ref) <= TOL


LAYERS_WITH_WEIGHTS = ("lin", "conv3", "conv1")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["lora-tucker", "loha-tucker", "lokr-tucker", "glora"])
def test_half_precision_files(built_cases, case, dtype):
    """A file saved in fp16/bf16 (kohya --save_precision) merges like the LyCORIS forward of the rounded factors."""
    built, _ = built_cases[case]
    rounded = {k: v.to(dtype) if v.is_floating_point() else v for k, v in built.state_dict.items()}
    adapter = Adapter.from_tensors(rounded, path="half")
    with torch.no_grad():
        for layer in LAYERS_WITH_WEIGHTS:
            module = built.extra["modules"][layer]
            saved = {n: p.detach().clone() for n, p in module.named_parameters()}
            for n, p in module.named_parameters():
                p.copy_(p.to(dtype).float())
            try:
                ref, _ = built.reference(layer, 0.5)
            finally:
                for n, p in module.named_parameters():
                    p.copy_(saved[n])
            w0, _ = built.base[layer]
            assert max_rel_error(adapter.layers[f"lora_unet_{layer}"].merge(w0, 0.5)[0], ref) <= TOL


@pytest.mark.parametrize("case", ["lora-tucker", "loha-tucker", "lokr-tucker", "glora", "diag-oft-constrained-rescaled",
                                  "boft", "dora-loha-in", "full", "ia3-in"])
def test_float64_weights_stay_float64(built_cases, case):
    """A float64 weight is merged in float64 and agrees with the float32 reference to float32 precision."""
    built, adapter = built_cases[case]
    for layer in LAYERS_WITH_WEIGHTS:
        w0, b0 = built.base[layer]
        w, b = adapter.layers[f"lora_unet_{layer}"].merge(w0.double(), 1.7, b0.double())
        assert w.dtype == torch.float64
        ref, _ = built.reference(layer, 1.7)
        assert max_rel_error(w, ref) <= TOL


def test_sparse_residual_and_dense_bias_add_before_scaling(built_cases):
    """The LyCORIS extractor's sparse residual (int16 indices, fp16 values) and A1111's dense `bias`:
    ΔW = γ·(up@down + R)."""
    built, _ = built_cases["lora"]
    sd = {k: v for k, v in built.state_dict.items() if k.startswith("lora_unet_conv3.")}
    up, down = sd["lora_unet_conv3.lora_up.weight"], sd["lora_unet_conv3.lora_down.weight"]
    gamma = float(sd["lora_unet_conv3.alpha"]) / down.shape[0]
    w0, _ = built.base["conv3"]
    rows, cols = w0.shape[0], w0[0].numel()
    g = torch.Generator().manual_seed(5)
    dense = torch.zeros(rows, cols)
    picked = torch.randperm(rows * cols, generator=g)[:50]
    dense.view(-1)[picked] = torch.randn(50, generator=g).half().float()
    idx = dense.nonzero().T
    sparse = dict(sd, **{"lora_unet_conv3.bias_indices": idx.to(torch.int16),
                         "lora_unet_conv3.bias_values": dense[idx[0], idx[1]].half(),
                         "lora_unet_conv3.bias_size": torch.tensor([rows, cols], dtype=torch.int16)})
    dense_file = dict(sd, **{"lora_unet_conv3.bias": dense.clone()})
    expected = w0 + 0.8 * gamma * ((up.flatten(1) @ down.flatten(1)) + dense).reshape(w0.shape)
    for tensors in (sparse, dense_file):
        adapter = Adapter.from_tensors(tensors, path="residual")
        assert adapter.unmatched == []
        assert max_rel_error(adapter.layers["lora_unet_conv3"].merge(w0, 0.8)[0], expected) <= TOL


def test_norm_patches_match_the_lycoris_norm_forward(built_cases):
    """LayerNorm/GroupNorm outputs of the LyCORIS NormModule forward equal F.layer_norm/group_norm with our γ', β'."""
    import torch.nn.functional as F

    built, adapter = built_cases["lora"]
    model = built.extra["model"]
    g = torch.Generator().manual_seed(9)
    inputs = {"ln": torch.randn(5, 96, generator=g), "gn": torch.randn(2, 48, 3, 3, generator=g)}
    for layer in ("ln", "gn"):
        module = built.extra["modules"][layer]
        w0, b0 = built.base[layer]
        for s in (0.5, -1.0):
            module.multiplier = s
            try:
                with torch.no_grad():
                    ref = getattr(model, layer)(inputs[layer])
            finally:
                module.multiplier = 1.0
            w, b = adapter.layers[f"lora_unet_{layer}"].merge(w0, s, b0)
            ours = F.layer_norm(inputs["ln"], (96,), w, b) if layer == "ln" else F.group_norm(inputs["gn"], 4, w, b)
            assert max_rel_error(ours, ref) <= TOL
