"""The fast merge paths give the reference math's result bit for bit.

Every patch's `merge_into` (chunked, in place, straight into a live weight, fp16/bf16 cast once) and
`patching.compute` with a live destination and a reused workspace are compared with `torch.equal` against the
readable reference: the patch's own `merge` (itself checked against LyCORIS/PEFT in test_algorithms_*), applied
operation by operation on a float32 copy and cast once, as `compute` did before it had fast paths.
"""

from __future__ import annotations

import pytest
import torch

from lib_adapters.algorithms import into
from lib_adapters.algorithms.boft import BOFTPatch
from lib_adapters.algorithms.ia3 import IA3Patch
from lib_adapters.algorithms.lokr import LoKrPatch
from lib_adapters.algorithms.lora import LoRAPatch
from lib_adapters.algorithms.oft import OFTPatch
from lib_adapters.patching import ModuleStore, Operation, Patcher, StateDictStore, Target, compute
from test_algorithms_lycoris import CASES, built_cases  # noqa: F401  (the session fixture)

STRENGTHS = (0.5, 1.0, -1.0, 1.7)
ALL_CASES = list(CASES) + ["ia3-out", "ia3-in"]


@pytest.fixture(params=[64, into.CHUNK], ids=["tiny-chunks", "default-chunks"])
def chunk(request, monkeypatch):
    """Run each test with chunks of a few rows (many chunks per weight) and with the default size."""
    monkeypatch.setattr(into, "CHUNK", request.param)
    return request.param


def reference(ops: list[Operation], weight: torch.Tensor, bias: torch.Tensor | None):
    """The merge as it was before the fast paths: each op's `merge` on a float32 copy (plain LoRA: one addmm_),
    row blocks written back, the result cast once by the caller."""
    w = weight.to(torch.float32 if weight.dtype != torch.float64 else weight.dtype, copy=True)
    b = None if bias is None else bias.to(w.dtype, copy=True)
    for op in ops:
        if op.strength == 0:
            continue
        lo, hi = op.target.rows or (0, w.shape[0])
        part = w[lo:hi]
        p = op.patch
        if type(p) is LoRAPatch and p.mid is None and p.extra is None:
            part.view(part.shape[0], -1).addmm_(p.up.reshape(p.up.shape[0], -1).to(w.dtype),
                                                 p.down.reshape(p.down.shape[0], -1).to(w.dtype), alpha=op.strength * p.scale)
            continue
        new_w, new_b = p.merge(part, op.strength, None if b is None else b[lo:hi])
        part.copy_(new_w)
        if new_b is not None and b is not None:
            b[lo:hi] = new_b
    return w, b


def layer_patches(built_cases, case):
    built, adapter = built_cases[case]
    for layer in built.layers:
        w0, b0 = built.base[layer]
        yield layer, adapter.layers[built.module_key(layer)], w0, b0


@pytest.mark.parametrize("case", ALL_CASES)
def test_merge_into_equals_merge_bit_for_bit(built_cases, case, chunk):
    """Into a separate tensor, in place (src is dst), and through compute into a live float32 weight."""
    ws = into.Workspace()
    for layer, patch, w0, b0 in layer_patches(built_cases, case):
        for s in STRENGTHS:
            ref_w, ref_b = patch.merge(w0, s, b0)
            dst = torch.full_like(w0, float("nan"))
            patch.merge_into(w0, s, dst, ws)
            assert torch.equal(dst, ref_w), (layer, s, "into another tensor")
            same = w0.clone()
            patch.merge_into(same, s, same, ws)
            assert torch.equal(same, ref_w), (layer, s, "in place")
            live = torch.full_like(w0, float("nan"))
            op = Operation(patch, s, Target("w", "b"), case)
            ref_w, ref_b = reference([op], w0, b0)  # plain LoRA: compute's addmm, the rest: merge
            new_w, new_b = compute([op], w0, b0, out=live, workspace=ws)
            assert new_w is live and torch.equal(live, ref_w), (layer, s, "compute into a live weight")
            assert (new_b is None) == (ref_b is None) and (ref_b is None or torch.equal(new_b, ref_b)), (layer, s)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ALL_CASES)
def test_half_weights_are_computed_in_float32_and_cast_once(built_cases, case, dtype, chunk):
    """A fp16/bf16 live weight gets exactly the float32 result cast once, written chunk by chunk."""
    ws = into.Workspace()
    for layer, patch, w0, b0 in layer_patches(built_cases, case):
        w16 = w0.to(dtype)
        for s in (0.5, -1.0):
            ops = [Operation(patch, s, Target("w", "b"), case)]
            ref_w, ref_b = reference(ops, w16, b0)
            live = torch.zeros_like(w16)
            new_w, new_b = compute(ops, w16, b0, out=live, workspace=ws)
            assert new_w is live and torch.equal(live, ref_w.to(dtype)), (layer, s)
            assert ref_b is None or torch.equal(new_b, ref_b)


def stack_cases():
    """Pairs of different algorithms on one weight (the second runs in place on the first's result)."""
    return [("lokr-factor4", "diag-oft-constrained-rescaled"), ("loha", "lokr-decompose-both"),
            ("boft-constrained-rescaled", "dora-lora-in"), ("ia3-out", "loha-tucker"), ("dora-lokr-out", "ia3-in"),
            ("lora", "boft"), ("glora", "dora-loha-out"), ("full", "lokr-tucker")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("first,second", stack_cases())
def test_stacked_operations_and_row_blocks(built_cases, first, second, dtype, chunk):
    """Two adapters on one weight, and the same two on a fused weight's row block (OpenCLIP q/k/v), live."""
    ws = into.Workspace()
    second_layers = built_cases[second][1].layers
    for layer, p1, w0, b0 in layer_patches(built_cases, first):
        p2 = second_layers.get(built_cases[second][0].module_key(layer))
        if p2 is None:  # a norm layer only the first adapter has
            continue
        w = w0.to(dtype)
        ops = [Operation(p1, 0.8, Target("w", "b"), first), Operation(p2, -0.6, Target("w", "b"), second)]
        ref_w, ref_b = reference(ops, w, b0)
        live = torch.zeros_like(w)
        new_w, new_b = compute(ops, w, b0, out=live, workspace=ws)
        assert torch.equal(live, ref_w.to(dtype)), layer
        assert ref_b is None or torch.equal(new_b, ref_b)
        n = w.shape[0]
        fused = torch.cat([w, w * 0.5, w * 2])
        fused_b = torch.cat([b0, b0, b0]) if b0 is not None else None
        ops = [Operation(p1, 0.8, Target("w", "b", rows=(n, 2 * n)), first),
               Operation(p2, 1.3, Target("w", "b", rows=(2 * n, 3 * n)), second)]
        ref_w, ref_b = reference(ops, fused, fused_b)
        live = torch.zeros_like(fused)
        new_w, new_b = compute(ops, fused, fused_b, out=live, workspace=ws)
        assert torch.equal(live, ref_w.to(dtype)) and torch.equal(live[:n], fused[:n]), layer
        assert ref_b is None or torch.equal(new_b, ref_b)


def sd_sized_patches():
    """Full-size shapes (SD1.5 attention/ff widths, a 3×3 conv) for the forms with their own chunking."""
    g = torch.Generator().manual_seed(3)

    def r(*shape, std=0.05):
        return (torch.randn(*shape, generator=g) * std).half()

    return {
        "lokr-full (1280x1280, factor 8)": (LoKrPatch(w1=r(8, 8), w2=r(160, 160)), (1280, 1280)),
        "lokr-split (640x2048)": (LoKrPatch(w1a=r(8, 2), w1b=r(2, 8), w2a=r(80, 4), w2b=r(4, 256), alpha_value=2.0), (640, 2048)),
        "lokr-tucker conv (320x320x3x3)": (LoKrPatch(w1=r(4, 4), w2a=r(4, 80), w2b=r(4, 80), t2=r(4, 4, 3, 3), alpha_value=1.0),
                                           (320, 320, 3, 3)),
        "oft b64 rescaled (1280x1280)": (OFTPatch(r(20, 64, 64, std=0.002), 1e-3, (1 + r(1280, 1, std=0.1).float())), (1280, 1280)),
        "oft b8 (5120x640)": (OFTPatch(r(640, 8, 8, std=0.01)), (5120, 640)),
        "oft_diag rotation (640x640)": (OFTPatch(torch.linalg.qr(torch.randn(20, 32, 32, generator=g))[0], 0.0, None, True),
                                        (640, 640)),
        "boft (1280x320)": (BOFTPatch(r(3, 80, 16, 16, std=0.01), 0.0, 1 + r(1280, 1, std=0.1).float()), (1280, 320)),
        "ia3 columns (1280x5120)": (IA3Patch(r(5120), True), (1280, 5120)),
    }


@pytest.mark.parametrize("name", list(sd_sized_patches()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_full_size_weights_bit_for_bit(name, dtype):
    patch, shape = sd_sized_patches()[name]
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    ops = [Operation(patch, 0.7, Target("w"), name)]
    ref, _ = reference(ops, w, None)
    live = torch.empty_like(w)
    compute(ops, w, None, out=live, workspace=into.Workspace())
    assert torch.equal(live, ref.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_patcher_over_live_modules_and_state_dicts_matches_the_reference(built_cases, dtype):
    """Switching, stacking and strength changes through Patcher (in place and replacing), bit-exact every time."""
    layers = ("lin", "conv3", "conv1")
    module = torch.nn.ModuleDict({n: torch.nn.Conv2d(1, 1, 1) if n != "lin" else torch.nn.Linear(1, 1) for n in layers})
    for n in layers:
        module[n].weight = torch.nn.Parameter(built_cases["lora"][0].base[n][0].to(dtype).clone(), requires_grad=False)
        module[n].bias = torch.nn.Parameter(built_cases["lora"][0].base[n][1].to(dtype).clone(), requires_grad=False)
    base = {k: v.detach().clone() for k, v in module.state_dict().items()}
    sd = {k: v.clone() for k, v in base.items()}
    stores = [Patcher(ModuleStore(module)), Patcher(StateDictStore(sd))]

    def plan(chosen):
        out = {}
        for case, s in chosen:
            built, adapter = built_cases[case]
            for n in layers:
                op = Operation(adapter.layers[built.module_key(n)], s, Target(f"{n}.weight", f"{n}.bias"), case)
                out.setdefault(f"{n}.weight", []).append(op)
        return out

    sequence = [[("lokr-factor4", 1.0)], [("loha", 1.0)], [("loha", 0.6)], [("loha", 0.6), ("ia3-in", 1.0)],
                [("diag-oft-constrained-rescaled", 1.0), ("dora-lora-out", -0.5)], [("boft", 0.3), ("lora", 1.0)], []]
    for chosen in sequence:
        p = plan(chosen)
        for patcher in stores:
            patcher.reconcile(p)
        for n in layers:
            ops = p.get(f"{n}.weight", [])
            ref_w, ref_b = reference(ops, base[f"{n}.weight"], base[f"{n}.bias"])
            for got in (module.state_dict(), sd):
                assert torch.equal(got[f"{n}.weight"], ref_w.to(dtype)), (chosen, n)
                assert torch.equal(got[f"{n}.bias"], ref_b.to(dtype)), (chosen, n)
    assert not stores[0].workspace.buffers  # nothing applied: the workspace is given back


def test_workspace_is_reused_from_weight_to_weight():
    """One set of compute buffers serves every weight of a reconcile and the next one (no allocation per layer)."""
    g = torch.Generator().manual_seed(0)
    layers = torch.nn.ModuleList([torch.nn.Linear(64, 64) for _ in range(6)]).half()
    patch = LoKrPatch(w1=torch.randn(4, 4, generator=g), w2=torch.randn(16, 16, generator=g))
    patcher = Patcher(ModuleStore(layers))

    def plan(s):
        return {f"{i}.weight": [Operation(patch, s, Target(f"{i}.weight"), "k")] for i in range(6)}

    patcher.reconcile(plan(1.0))
    first = {k: v.data_ptr() for k, v in patcher.workspace.buffers.items()}
    patcher.reconcile(plan(0.5))
    assert first and {k: v.data_ptr() for k, v in patcher.workspace.buffers.items()} == first
