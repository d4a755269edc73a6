"""SD3 reference material for the tests: target lists, LyCORIS networks on the diffusers MMDiT or on its SAI twin,
the SAI twin as an nn.Module, reading a single-file SD3 checkpoint back through diffusers' converter, and the
comparison with the LyCORIS-hooked modules."""

import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from torch import nn

from lib_adapters.models.sd3 import ROOTS
from reference_adapters import _quiet, lycoris_reference, max_rel_error

SEED = 7
S_UNET, S_TE = 0.7, -0.6
TOL = 1e-5
VARIANT = "sd3.5-medium"
# Diffusers modules covering every kind of SAI target: q/k/v row blocks of x, context and attn2 qkv, both swaps,
# a conv, plain linears, top-level embedders.
DIFFUSERS_TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_k_proj",
                     "transformer_blocks.0.attn2.to_v", "transformer_blocks.2.attn.to_k", "norm_out.linear",
                     "transformer_blocks.2.norm1_context.linear", "transformer_blocks.1.ff.net.0.proj",
                     "transformer_blocks.0.attn.to_add_out", "transformer_blocks.0.norm1.linear", "pos_embed.proj",
                     "context_embedder"]
SAI_TARGETS = ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.1.context_block.attn.qkv",
               "joint_blocks.0.x_block.attn2.qkv", "joint_blocks.2.context_block.adaLN_modulation.1",
               "final_layer.adaLN_modulation.1", "joint_blocks.1.x_block.mlp.fc2", "x_embedder.proj",
               "joint_blocks.0.x_block.adaLN_modulation.1"]
TE_TARGETS = {"text_encoder": ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc2",
                               "text_projection"],
              "text_encoder_2": ["text_model.encoder.layers.1.self_attn.v_proj"],
              "text_encoder_3": ["encoder.block.0.layer.0.SelfAttention.q",
                                 "encoder.block.1.layer.1.DenseReluDense.wi_1"]}
TE_PREFIX = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2", "text_encoder_3": "lora_te3"}
ALGOS = {  # name → create_lycoris options (BOFT needs block-decomposable widths: no 288-row modulation)
    "lora": dict(algo="lora"),
    "loha": dict(algo="loha"),
    "lokr": dict(algo="lokr", factor=4),
    "full": dict(algo="full"),
    "diag-oft": dict(algo="diag-oft", constraint=1e-3, rescaled=True),
    "boft": dict(algo="boft", linear_dim=6, conv_dim=6),
    "ia3": dict(algo="ia3"),
    "glora": dict(algo="glora"),
    "dora": dict(algo="lora", dora_wd=True, wd_on_output=False),
}


def back_to_diffusers(ckpt: dict) -> dict[str, dict]:
    """Component → diffusers state dict of a single-file SD3 checkpoint (diffusers' converter for the MMDiT)."""
    unet = {k: v.clone() for k, v in ckpt.items() if k.startswith(ROOTS["transformer"])}
    out = {"transformer": convert_sd3_transformer_checkpoint_to_diffusers(unet)}
    for comp, root in ROOTS.items():
        if comp != "transformer":
            out[comp] = {k[len(root):]: v for k, v in ckpt.items() if k.startswith(root)}
    out["text_encoder_3"]["encoder.embed_tokens.weight"] = out["text_encoder_3"]["shared.weight"]
    return out


def lycoris(model: nn.Module, prefix: str, names: list[str], options: dict):
    """`create_lycoris` over the named modules of `model`, every parameter random and non-zero."""
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset({"target_module": [], "target_name": names, "lora_prefix": prefix,
                                 "enable_conv": True, "module_algo_map": {}, "name_algo_map": {},
                                 "exclude_name": [], "use_fnmatch": False})
    with _quiet():
        net = create_lycoris(model, 1.0, warn_on_unmatched=False,
                             **{**dict(linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2), **options})
    net.apply_to()
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for pname, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(p * (1 + 0.1 * noise) if pname.endswith(("dora_scale", "rescale")) else 0.2 * noise)
    ids = {id(m): n for n, m in model.named_modules()}
    hooked = {ids[id(lo.org_module[0] if isinstance(lo.org_module, list) else lo.org_module)]: lo for lo in net.loras}
    assert sorted(hooked) == sorted(names), sorted(set(names) - set(hooked))
    return net, hooked


def sai_twin(ckpt: dict) -> nn.Module:
    """An nn.Module holding the checkpoint's MMDiT weights under their SAI paths (Linear/Conv2d by shape)."""
    root = ROOTS["transformer"]
    m = nn.Module()
    for key, t in ckpt.items():
        if not (key.startswith(root) and key.endswith(".weight") and t.ndim in (2, 4)):
            continue
        path = key[len(root):-len(".weight")]
        layer = nn.Linear(t.shape[1], t.shape[0]) if t.ndim == 2 else nn.Conv2d(t.shape[1], t.shape[0], t.shape[2:],
                                                                                 stride=t.shape[2:])
        with torch.no_grad():
            layer.weight.copy_(t)
            layer.bias.copy_(ckpt[root + path + ".bias"])
        *parents, last = path.split(".")
        node = m
        for name in parents:
            if not hasattr(node, name):
                node.add_module(name, nn.Module())
            node = getattr(node, name)
        node.add_module(last, layer)
    return m


def check(merged: dict, base: dict, hooked: dict, strength: float, label: str) -> None:
    """Each hooked module's merged (weight, bias) equals its LyCORIS reference; `merged`/`base` hold those names."""
    for path, (lora, module) in hooked.items():
        w0, b0 = base[path + ".weight"], base.get(path + ".bias")
        want_w, want_b = lycoris_reference(lora, module, strength, (w0, b0))
        got_w = merged[path + ".weight"]
        assert not torch.equal(got_w, w0), f"{label}: {path} unchanged"
        assert max_rel_error(got_w, want_w.reshape(got_w.shape)) < TOL, f"{label}: {path}"
        if b0 is not None:
            assert max_rel_error(merged[path + ".bias"], want_b) < TOL, f"{label}: {path} bias"


def assert_untouched(out: dict, ckpt: dict, touched_roots) -> None:
    for key, value in ckpt.items():
        if not key.startswith(tuple(touched_roots)):
            assert torch.equal(out[key], value), f"untouched {key} changed"
