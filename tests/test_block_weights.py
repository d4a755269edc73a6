"""Block weights (`lbw=`): the block of every layer equals sd-webui-lora-block-weight's assignment, re-derived here
from its rule (a substring of A1111's network layer name, the last listed block found wins; the text encoders are
BASE; anything else keeps weight 1), for SD1, SD2 and SDXL in checkpoint and diffusers naming; a layer's strength
is the tag's strength times its block's weight for every algorithm; weight 0 leaves a layer bit-exactly untouched;
presets and the preset file; bad values give one message naming the tag and what was expected."""

import functools

import pytest
import torch

from lib_adapters.adapter import Adapter
from lib_adapters.errors import AdapterError
from lib_adapters.models import build_tiny, to_checkpoint
from lib_adapters.naming import LayerMap, build_plan
from lib_adapters.naming.blocks import LISTS, BlockWeights, block_of, load_presets, parse_block_weights
from lib_adapters.patching import Patcher, StateDictStore

from test_naming_reach import ldm_module_names

# The reference's 26 block ids and the substrings it looks for, in its order (index 26, 27 are text encoders).
BLOCK26 = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)]
NEEDLES = (["encoder"] + [f"diffusion_model_input_blocks_{i}_" for i in range(12)] + ["diffusion_model_middle_block_"]
           + [f"diffusion_model_output_blocks_{i}_" for i in range(12)] + ["embedders", "transformer_resblocks"])


def network_name(weight: str) -> str:
    """A1111's network layer name of a checkpoint weight: the module path under sd_model.model or the (wrapped)
    text encoder, `.` → `_`; SDXL encoders get their index as prefix."""
    module = weight.rpartition(".")[0]
    if module.startswith("model."):
        return module[len("model."):].replace(".", "_")
    if module.startswith("conditioner.embedders."):
        index, _, rest = module[len("conditioner.embedders."):].partition(".")
        return f"{index}_" + rest.replace(".", "_")
    return module[len("cond_stage_model."):].replace(".", "_")


def reference_block(weight: str) -> str | None:
    found = None
    for i, needle in enumerate(NEEDLES):
        if needle in network_name(weight):
            found = BLOCK26[0 if i >= 26 else i]
    return found


@functools.lru_cache(maxsize=None)
def tiny(family):
    comps = build_tiny(family, seed=7)
    return comps, to_checkpoint(comps)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_checkpoint_layer_is_in_the_reference_block(family):
    _, ckpt = tiny(family)
    names = [k for k in ckpt if k.startswith(("model.diffusion_model.", "cond_stage_model.", "conditioner."))]
    assert {block_of(k) for k in names} >= ({"BASE", "M00", "IN00", "OUT00"})
    mismatched = [(k, block_of(k), reference_block(k)) for k in names if block_of(k) != reference_block(k)]
    assert mismatched == []
    assert block_of("model.diffusion_model.time_embed.0.weight") is None
    assert block_of("model.diffusion_model.out.2.weight") is None


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_diffusers_names_are_in_the_block_of_their_ldm_layer(family):
    comps, ckpt = tiny(family)
    ldm = ldm_module_names(comps, ckpt)
    for path, module in comps["unet"].named_modules():
        if isinstance(getattr(module, "weight", None), torch.nn.Parameter):
            assert block_of(f"unet.{path}.weight") == reference_block(f"model.diffusion_model.{ldm[path]}.weight"), path
    encoders = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    for comp in encoders:
        for name in comps[comp].state_dict():
            want = "BASE" if name.startswith(("encoder.layers.", "text_model.encoder.layers.")) else None
            assert block_of(f"{comp}.{name}") == want, name


def test_block_lists_are_the_reference_lists():
    assert LISTS[26] == tuple(BLOCK26)
    assert LISTS[17] == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05",
                         "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
    assert LISTS[12] == ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04",
                         "OUT05")
    assert LISTS[20] == tuple(BLOCK26[:10] + ["M00"] + [f"OUT{i:02d}" for i in range(9)])


# ---- strengths per layer, every algorithm ------------------------------------------------------------------------

UNET_ALL = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
ALGOS = [("lora", {}), ("loha", {}), ("lokr", {"factor": 4}), ("full", {}), ("ia3", {}), ("glora", {}),
         ("diag-oft", {"constraint": 0}), ("boft", {}), ("lora", {"dora_wd": True})]


def lycoris_state(model, prefix, modules, algo, dim=4, **options):
    """A LyCORIS network over `model` (kohya-style names), every parameter random and non-zero."""
    from lycoris import LycorisNetwork, create_lycoris

    LycorisNetwork.apply_preset({"target_module": modules, "target_name": [], "lora_prefix": prefix,
                                 "enable_conv": True, "module_algo_map": {}, "name_algo_map": {},
                                 "exclude_name": [], "use_fnmatch": False})
    net = create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=2, conv_dim=dim, conv_alpha=3, algo=algo,
                         warn_on_unmatched=False, **options)
    net.apply_to()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}


def lycoris_adapter(family, algo, options, path):
    comps = build_tiny(family, seed=7)
    modules = ["Transformer2DModel"] if algo in ("ia3", "glora") else UNET_ALL
    dim = 8 if algo == "boft" else 4  # BOFT: block size 8 divides every tiny width
    sd = lycoris_state(comps["unet"], "lora_unet", modules, algo, dim, **options)
    te_prefix = "lora_te1" if family == "sdxl" else "lora_te"
    sd.update(lycoris_state(comps["text_encoder"], te_prefix, ["CLIPAttention"], algo, dim, **options))
    return Adapter.from_tensors(sd, {}, path)


def random_weights(n, seed):
    g = torch.Generator().manual_seed(seed)
    values = [round(float(v), 3) for v in torch.rand(n, generator=g) * 2 - 0.5]
    values[3] = 0.0
    return values


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("algo,options", ALGOS, ids=[a + ("-dora" if o.get("dora_wd") else "") for a, o in ALGOS])
def test_each_layer_gets_tag_strength_times_its_block_weight(family, algo, options):
    comps, ckpt = tiny(family)
    adapter = lycoris_adapter(family, algo, options, f"{algo}.safetensors")
    n = 26 if family == "sd1" else 20
    values = random_weights(n, seed=len(algo))
    lbw = parse_block_weights(",".join(map(str, values)), family, load_presets())
    by_block = dict(zip(LISTS[n], values))
    unet, te = 0.8, -0.6
    lm = LayerMap.for_checkpoint(ckpt)
    plan, _ = build_plan([(adapter, unet, te, lbw)], lm)
    fixed, _ = build_plan([(adapter, unet, te)], lm)
    seen_blocks = set()
    for weight, ops in fixed.items():
        block = reference_block(weight)
        seen_blocks.add(block)
        factor = 1.0 if block is None else by_block.get(block, 0.0)
        base = unet if ops[0].target.component == "unet" else te
        if factor == 0:
            assert weight not in plan, weight
            continue
        assert [op.strength for op in plan[weight]] == [base * factor] * len(ops), weight
    assert len(seen_blocks - {None}) >= 6
    diffusers = LayerMap.for_diffusers({k: comps[k].state_dict() for k in ("unet", "text_encoder", "text_encoder_2")
                                        if k in comps})
    d_plan, _ = build_plan([(adapter, unet, te, lbw)], diffusers)
    assert sorted(op.strength for ops in d_plan.values() for op in ops) == \
        sorted(op.strength for ops in plan.values() for op in ops)


def test_zero_weight_blocks_stay_bit_identical_and_others_equal_the_fixed_strength_merge():
    _, ckpt = tiny("sd1")
    adapter = lycoris_adapter("sd1", "loha", {}, "loha.safetensors")
    lm = LayerMap.for_checkpoint(ckpt)
    lbw = parse_block_weights("OUTD", "sd1", load_presets())  # BASE and OUT03-OUT06 at 1, the rest 0
    store = {k: v.clone() for k, v in ckpt.items()}
    patcher = Patcher(StateDictStore(store))
    plan, _ = build_plan([(adapter, 0.7, 0.4, lbw)], lm)
    patcher.reconcile(plan)
    full, _ = build_plan([(adapter, 0.7, 0.4)], lm)
    reference = {k: v.clone() for k, v in ckpt.items()}
    Patcher(StateDictStore(reference)).reconcile(full)
    changed = {k for k in ckpt if not torch.equal(store[k], ckpt[k])}
    assert changed and {reference_block(k) for k in changed} <= {"BASE", "OUT03", "OUT04", "OUT05", "OUT06", None}
    for k in full:
        if reference_block(k) in ("BASE", "OUT03", "OUT04", "OUT05", "OUT06", None):
            assert torch.equal(store[k], reference[k]), k
        else:
            assert torch.equal(store[k], ckpt[k]), k
    patcher.restore()
    assert all(torch.equal(store[k], v) for k, v in ckpt.items())


# ---- presets and messages ------------------------------------------------------------------------------------------

def test_shipped_presets_and_a_user_file(tmp_path):
    (tmp_path / "lbwpresets.txt").write_text(
        "MINE:1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0.5\n"
        "OUTD:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1\n"      # replaces the shipped OUTD
        "# COMMENTED:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1\n"
        "SHORT:1,1,1\n"                                   # no list has 3 weights: skipped, as the reference does
        "XL:1,1,1,1,1,1,0,0,0,0,0,0\n", encoding="utf-8")
    presets = load_presets([str(tmp_path), str(tmp_path / "missing")])
    mine = parse_block_weights("MINE", "sd1", presets)
    assert mine.weights["BASE"] == 1 and mine.weights["OUT11"] == 0.5
    assert mine.of("model.diffusion_model.input_blocks.0.0.weight") == 0  # IN00 is not in the 17-block list
    assert parse_block_weights("OUTD", "sd1", presets).weights["OUT11"] == 1
    assert parse_block_weights("ALL", "sdxl", presets).of("model.diffusion_model.output_blocks.0.1.proj_in.weight") == 1
    assert parse_block_weights("XL", "sdxl", presets).weights["M00"] == 1
    for bad in ("COMMENTED", "SHORT"):
        with pytest.raises(AdapterError, match="unknown block-weight preset"):
            parse_block_weights(bad, "sd1", presets)


def test_default_presets_mean_what_the_reference_ships():
    presets = load_presets()
    ins = parse_block_weights("INS", "sd1", presets)
    assert [b for b, w in ins.weights.items() if w] == ["BASE", "IN01", "IN02", "IN04"]
    assert parse_block_weights("ALL0.5", "sd1", presets).weights == dict.fromkeys(LISTS[17], 0.5)


@pytest.mark.parametrize("value,family,words", [
    ("1,1,1", "sd1", ["3 block weights", "SD1", "17 or 26"]),
    ("1,1,1,1,1,1,1,1,1,1,1,1", "sd1", ["12 block weights", "17 or 26"]),
    ("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", "sdxl", ["17 block weights", "SDXL", "12 or 20"]),
    ("OUTD", "sdxl", ["preset 'OUTD' has 17 weights", "12 or 20"]),
    ("NOPE", "sd1", ["unknown block-weight preset 'NOPE'", "ALL", "OUTD"]),
    ("R,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", "sd1", ["R (a random value) is not supported"]),
    ("1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,one", "sd1", ["'one' is not a number"]),
    ("", "sd1", ["empty"]),
])
def test_bad_block_weights_name_the_tag_and_what_was_expected(value, family, words):
    tag = f"<lora:a:1:lbw={value}>"
    with pytest.raises(AdapterError) as e:
        parse_block_weights(value, family, load_presets(), tag=tag)
    assert tag in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_x_takes_the_tags_x_value():
    bw = parse_block_weights("X,1,1,1,1,1,1,1,X+0.25,X-1,0,0,0,0,0,0,0", "sd1", load_presets(), x=0.5)
    assert (bw.weights["BASE"], bw.weights["OUT03"], bw.weights["OUT04"]) == (0.5, 0.75, -0.5)
    assert parse_block_weights("X,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1", "sd1", load_presets()).weights["BASE"] == 1.0


def test_layers_outside_every_block_keep_weight_one():
    bw = BlockWeights(dict.fromkeys(LISTS[26], 0.0))
    assert bw.of("model.diffusion_model.time_embed.0.weight") == 1.0
    assert bw.of("cond_stage_model.transformer.text_model.final_layer_norm.weight") == 1.0
    assert bw.of("model.diffusion_model.input_blocks.1.1.proj_in.weight") == 0.0


# ---- merge and the diffusers host ----------------------------------------------------------------------------------

def kohya_file(path, ckpt, seed=0):
    """A kohya LoRA (sgm names) on layers of several blocks and the text encoder, shapes from the checkpoint."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for weight in ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                   "model.diffusion_model.output_blocks.3.1.proj_out.weight",
                   "model.diffusion_model.output_blocks.9.1.transformer_blocks.0.ff.net.2.weight",
                   "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight",
                   "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"):
        key = ("lora_te_" + weight.split("transformer.", 1)[1] if weight.startswith("cond") else
               "lora_unet_" + weight[len("model.diffusion_model."):]).rsplit(".", 1)[0].replace(".", "_")
        shape = ckpt[weight].shape
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, *shape[1:], generator=g) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(shape[0], 2, *([1, 1] if len(shape) == 4 else []),
                                                       generator=g) * 0.3
    save_file(tensors, str(path), {"ss_base_model_version": "sd_v1"})


def test_merge_applies_block_weights_and_refuses_schedules(tmp_path):
    from safetensors.torch import save_file

    from lib_adapters.files import load_tensors
    from lib_adapters.merge import merge

    _, ckpt = tiny("sd1")
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in ckpt.items()}, str(base))
    loras = tmp_path / "loras"
    loras.mkdir()
    kohya_file(loras / "a.safetensors", ckpt)
    (loras / "lbwpresets.txt").write_text("MINE:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,0.5\n")
    out = tmp_path / "out.safetensors"
    merge(str(base), [str(loras)], str(out), "x <lora:a:0.7:0.4:lbw=MINE>", log=lambda m: None)
    merged = load_tensors(str(out))[1]
    lm = LayerMap.for_checkpoint(ckpt)
    blocks = parse_block_weights("MINE", "sd1", load_presets([str(loras)]))
    plan, _ = build_plan([(Adapter.load(str(loras / "a.safetensors")), 0.7, 0.4, blocks)], lm)
    want = {k: v.clone() for k, v in ckpt.items()}
    Patcher(StateDictStore(want)).reconcile(plan)
    assert all(torch.equal(merged[k], want[k]) for k in ckpt)
    to_q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"  # IN01 weighs 0
    assert torch.equal(merged[to_q], ckpt[to_q])
    assert not torch.equal(merged["model.diffusion_model.output_blocks.9.1.transformer_blocks.0.ff.net.2.weight"],
                           ckpt["model.diffusion_model.output_blocks.9.1.transformer_blocks.0.ff.net.2.weight"])
    bad = tmp_path / "bad.safetensors"
    for tag, words in (("<lora:a:0@0,1@1>", ["no meaning in merge"]), ("<lora:a:1:lbw=1,1>", ["2 block weights"])):
        with pytest.raises(AdapterError) as e:
            merge(str(base), [str(loras)], str(bad), tag, log=lambda m: None)
        assert tag in str(e.value) and all(w in str(e.value) for w in words) and not bad.exists()


def test_diffusers_host_takes_block_weights_in_tags_and_lists(tmp_path):
    from lib_adapters.hosts.diffusers import DiffusersAdapters

    comps, ckpt = tiny("sd1")
    comps = build_tiny("sd1", seed=7)
    kohya_file(tmp_path / "a.safetensors", ckpt)
    before = {k: v.clone() for k, v in comps["unet"].state_dict().items()}
    with DiffusersAdapters(unet=comps["unet"], text_encoder=comps["text_encoder"], lora_dirs=[tmp_path]) as ad:
        text = ad.apply_prompt("a fox <lora:a:1:lbw=OUTS>")
        after = comps["unet"].state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert text == "a fox" and changed == {"up_blocks.3.attentions.0.transformer_blocks.0.ff.net.2.weight"}
        ad.apply([(str(tmp_path / "a.safetensors"), 1.0, 1.0, "OUTD")])  # OUT03-OUT06: up_blocks.1
        changed = {k for k in before if not torch.equal(before[k], comps["unet"].state_dict()[k])}
        assert changed == {"up_blocks.1.attentions.0.proj_out.weight"}
        with pytest.raises(AdapterError, match="one strength per image"):
            ad.apply_prompt("<lora:a:0@0,1@1>")
    assert all(torch.equal(before[k], v) for k, v in comps["unet"].state_dict().items())


# ---- Flux and SD3 ----------------------------------------------------------------------------------------------------

def reference_flux_block(weight: str) -> str | None:
    """sd-webui-lora-block-weight's Flux rule on a Forge-style key (`.` → `_`): t5xxl, clip_, double/single block
    index, `_in`, final_layer; anything else is not picked (weight 1)."""
    import re

    key = weight.replace(".", "_")
    if "t5xxl" in key:
        return "T5"
    if "clip_" in key:
        return "CLIP"
    m = re.search(r"_(\d+)_", key)
    if "double_blocks" in key:
        return f"D{m.group(1).zfill(2)}"
    if "single_blocks" in key:
        return f"S{m.group(1).zfill(2)}"
    if "_in" in key:
        return "IN"
    if "final_layer" in key:
        return "OUT"
    return None


def lora_on(weights, ckpt, key_of, seed=0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for w in weights:
        out, inp = ckpt[w].shape
        tensors[f"{key_of(w)}.lora_down.weight"] = torch.randn(2, inp, generator=g) * 0.1
        tensors[f"{key_of(w)}.lora_up.weight"] = torch.randn(out, 2, generator=g) * 0.1
    return tensors


def test_flux_layers_get_the_reference_flux_blocks():
    import flux_material

    ckpt = flux_material.checkpoint(vae=False)
    lm = LayerMap.for_checkpoint(ckpt)
    assert lm.family == "flux"
    unet = [k for k, v in ckpt.items() if k.startswith("model.diffusion_model.") and v.ndim == 2]
    te = ["text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
          "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.weight"]
    tensors = lora_on(unet, ckpt, lambda w: "lora_unet_" + w[len("model.diffusion_model."):-len(".weight")]
                      .replace(".", "_"))
    tensors.update(lora_on(te[:1], ckpt, lambda w: "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 1))
    tensors.update(lora_on(te[1:], ckpt, lambda w: "lora_te3_encoder_block_0_layer_0_SelfAttention_q", 2))
    adapter = Adapter.from_tensors(tensors, {}, "flux.safetensors")
    values = [round(0.1 * i - 2, 2) for i in range(61)]
    lbw = parse_block_weights(",".join(map(str, values)), "flux", load_presets())
    by_block = dict(zip(LISTS[61], values))
    plan, _ = build_plan([(adapter, 0.5, 2.0, lbw)], lm)
    assert set(plan) == set(unet + te)
    for weight, ops in plan.items():
        base = 0.5 if ops[0].target.component == "unet" else 2.0
        assert ops[0].strength == base * by_block[reference_flux_block(weight)], weight
    with pytest.raises(AdapterError, match=r"a Flux model takes a preset name or 61 .*D00…D18, S00…S37, OUT\)"):
        parse_block_weights(",".join(["1"] * 17), "flux", load_presets())
    assert parse_block_weights("FLUXALL", "flux", load_presets()).weights["S37"] == 1.0


@pytest.mark.parametrize("name,block", [
    ("model.diffusion_model.joint_blocks.7.x_block.attn.qkv.weight", "J07"),
    ("model.diffusion_model.joint_blocks.0.context_block.mlp.fc1.weight", "J00"),
    ("model.diffusion_model.x_embedder.proj.weight", "IN"), ("model.diffusion_model.final_layer.linear.weight", "OUT"),
    ("transformer.transformer_blocks.3.attn.add_q_proj.weight", "J03"), ("transformer.pos_embed.proj.weight", "IN"),
    ("text_encoders.clip_g.transformer.text_model.encoder.layers.1.mlp.fc1.weight", "CLIP"),
    ("text_encoder_2.text_model.encoder.layers.1.mlp.fc1.weight", "CLIP"),
    ("text_encoders.t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wo.weight", "T5"),
    ("text_encoder_3.encoder.block.1.layer.1.DenseReluDense.wo.weight", "T5"),
])
def test_sd3_blocks(name, block):
    assert block_of(name, "sd3") == block
    lbw = parse_block_weights(",".join(str(i) for i in range(28)), "sd3", load_presets())
    assert lbw.of(name) == LISTS[28].index(block) if block in LISTS[28] else 0
