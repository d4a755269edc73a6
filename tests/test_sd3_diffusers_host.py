"""The diffusers host on a StableDiffusion3Pipeline (tiny SD3.5 Medium, CLIP-L, CLIP-G, T5): diffusers-named
adapters patch the pipeline's own layers, SAI-named ones (fused q/k/v, swapped modulations) patch the stacked
to_q/to_k/to_v as one weight, every algorithm; results equal LyCORIS on the same names (the SAI reference read back
through diffusers' SD3 converter); restore is bit-exact."""

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from safetensors.torch import save_file

from lib_adapters.hosts.diffusers import DiffusersAdapters
from lib_adapters.models.sd3 import ROOTS, build_sd3, sd3_to_checkpoint
from reference_adapters import lycoris_reference, max_rel_error
from sd3_reference import (ALGOS, DIFFUSERS_TARGETS, SAI_TARGETS, SEED, TE_PREFIX, TE_TARGETS, TOL, VARIANT, lycoris,
                           sai_twin)

S_UNET, S_TE = 0.8, 0.5


def pipeline():
    from diffusers import StableDiffusion3Pipeline

    comps = build_sd3(VARIANT, SEED)
    return StableDiffusion3Pipeline(scheduler=None, vae=None, tokenizer=None, tokenizer_2=None, tokenizer_3=None,
                                    **comps)


def state(pipe) -> dict[str, dict]:
    return {c: {k: v.detach().clone() for k, v in getattr(pipe, c).state_dict().items()}
            for c in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")}


@pytest.mark.parametrize("algo", ["lora", "lokr", "diag-oft", "dora"])
def test_diffusers_named_adapters_match_lycoris_and_restore_exactly(tmp_path, algo):
    pipe = pipeline()
    before = state(pipe)
    ref = build_sd3(VARIANT, SEED)
    tensors, hooked = {}, {}
    net, hooked["transformer"] = lycoris(ref["transformer"], "lycoris", DIFFUSERS_TARGETS, ALGOS[algo])
    tensors.update(net.state_dict())
    for comp, names in TE_TARGETS.items():
        net, hooked[comp] = lycoris(ref[comp], TE_PREFIX[comp], names, ALGOS[algo])
        tensors.update(net.state_dict())
    path = tmp_path / "a.safetensors"
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
    with DiffusersAdapters(pipe) as adapters:
        assert adapters.family == "sd3"
        adapters.apply([(str(path), S_UNET, S_TE)])
        assert adapters.unmatched[str(path)] == []
        now = state(pipe)
        for comp, mods in hooked.items():
            s = S_UNET if comp == "transformer" else S_TE
            for p, lo in mods.items():
                module = ref[comp].get_submodule(p)
                w0, b0 = before[comp][p + ".weight"], before[comp].get(p + ".bias")
                want_w, want_b = lycoris_reference(lo, module, s, (w0, b0))
                assert max_rel_error(now[comp][p + ".weight"], want_w.reshape(w0.shape)) < TOL, (comp, p)
                if b0 is not None:
                    assert max_rel_error(now[comp][p + ".bias"], want_b) < TOL, (comp, p)
    after = state(pipe)
    assert all(torch.equal(after[c][k], v) for c in before for k, v in before[c].items())


@pytest.mark.parametrize("algo", list(ALGOS))
def test_sai_named_adapters_patch_stacked_diffusers_layers(tmp_path, algo):
    """kohya/LyCORIS `lora_unet_joint_blocks_…` on the diffusers pipeline equals the SAI twin merged by LyCORIS."""
    pipe = pipeline()
    before = state(pipe)
    ckpt = sd3_to_checkpoint(build_sd3(VARIANT, SEED, components=("transformer",)))
    twin = sai_twin(ckpt)
    targets = [n for n in SAI_TARGETS if algo != "boft" or n != "joint_blocks.0.x_block.adaLN_modulation.1"]
    net, hooked = lycoris(twin, "lora_unet", targets, ALGOS[algo])
    path = tmp_path / "sai.safetensors"
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, str(path))
    root = ROOTS["transformer"]
    want = dict(ckpt)
    for p, lo in hooked.items():
        w0, b0 = ckpt[root + p + ".weight"], ckpt[root + p + ".bias"]
        w, b = lycoris_reference(lo, twin.get_submodule(p), S_UNET, (w0, b0))
        want[root + p + ".weight"], want[root + p + ".bias"] = w.reshape(ckpt[root + p + ".weight"].shape), b
    want = convert_sd3_transformer_checkpoint_to_diffusers(want)
    adapters = DiffusersAdapters(pipe)
    adapters.apply([(str(path), S_UNET, S_TE)])
    now = state(pipe)["transformer"]
    moved = {k for k, v in before["transformer"].items() if not torch.equal(now[k], v)}
    should = {k for k, v in before["transformer"].items() if not torch.equal(want[k], v)}
    assert moved == should and moved
    for k in should:
        assert max_rel_error(now[k], want[k]) < TOL, k
    adapters.restore()
    after = state(pipe)
    assert all(torch.equal(after[c][k], v) for c in before for k, v in before[c].items())
