"""Any exception while adapters are applied (a layer that fails late, out of memory, Ctrl-C, even inside the
clean-up) leaves the model exactly at its originals and the bookkeeping saying so: the next request recomputes
everything it asks for (Patcher, DiffusersAdapters, the A1111 and Forge backends through the WebUI)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from fake_host import harness
from fake_host.adapters import write_lora
from fake_host.models import A1111Model, forge_engine
from lib_adapters.algorithms.base import LayerPatch
from lib_adapters.errors import AdapterError
from lib_adapters.patching import ModuleStore, Operation, Patcher, StateDictStore, Target
from test_patching import PATCHES, model_weights, plan_of

FAILURES = {
    "runtime": (lambda: RuntimeError("a rank-0 LoRA"), AdapterError),
    "out-of-memory": (lambda: torch.OutOfMemoryError("CUDA out of memory"), torch.OutOfMemoryError),
    "ctrl-c": (lambda: KeyboardInterrupt(), KeyboardInterrupt),
}


class Boom(LayerPatch):
    """A layer whose merge scribbles over the weight it is given, then fails."""

    kind = "boom"

    def __init__(self, make, before=None):
        self.make, self.before = make, before

    def merge(self, weight, strength, bias=None):
        weight.add_(1.0)
        if self.before:
            self.before()
        raise self.make()


def boom_plan(chosen, make, before=None, weight="b.weight"):
    plan = plan_of(chosen)
    plan.setdefault(weight, []).append(Operation(Boom(make, before), 1.0, Target(weight), "/loras/boom.safetensors|0|x"))
    return plan


@pytest.mark.parametrize("store_kind", ["state-dict-fp16", "module-fp32"])
@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failed_reconcile_leaves_the_originals_and_the_next_one_recomputes(store_kind, failure):
    make, raised = FAILURES[failure]
    if store_kind == "module-fp32":  # in place: compute writes into the live tensors
        module = torch.nn.Module()
        for name, t in model_weights(torch.float32).items():
            module.register_parameter(name.replace(".", "_"), torch.nn.Parameter(t))
        store = ModuleStore(module)
        store.tensors = {n: store.tensors[n.replace(".", "_")] for n in model_weights()}
        live = lambda: {n: t.detach().clone() for n, t in store.tensors.items()}  # noqa: E731
    else:
        weights = model_weights()
        store = StateDictStore(weights)
        live = lambda: {n: t.clone() for n, t in weights.items()}  # noqa: E731
    original = live()
    patcher = Patcher(store)
    good = [("la", 1.0), ("lb", 0.5), ("lk", 1.0)]
    patcher.reconcile(plan_of(good))
    applied = live()
    with pytest.raises(raised):
        patcher.reconcile(boom_plan([("la", 0.7), ("lb", 0.5), ("ov", 1.0)], make))
    assert all(torch.equal(t, original[n]) for n, t in live().items())
    assert patcher.applied == {} and not patcher.dirty and not patcher.originals
    assert patcher.reconcile(plan_of(good))["recomputed"] == 3  # nothing is "kept" from before the failure
    assert all(torch.equal(t, applied[n]) for n, t in live().items())


def test_a_clean_up_interrupted_in_turn_is_finished_by_the_next_call():
    weights = model_weights()
    original = {n: t.clone() for n, t in weights.items()}

    class Flaky(StateDictStore):
        armed = False

        def set(self, name, value):
            if self.armed:
                self.armed = False
                raise KeyboardInterrupt  # Ctrl-C again, inside the clean-up's first write
            super().set(name, value)

    store = Flaky(weights)
    patcher = Patcher(store)
    good = [("la", 1.0), ("lb", 0.5)]
    patcher.reconcile(plan_of(good))
    applied = {n: t.clone() for n, t in weights.items()}
    with pytest.raises(KeyboardInterrupt):
        patcher.reconcile(boom_plan(good[:1] + [("lk", 1.0)], KeyboardInterrupt, lambda: setattr(store, "armed", True)))
    assert patcher.dirty and not patcher.applied  # half-done, and recorded as such
    assert patcher.reconcile(plan_of(good))["recomputed"] == 2
    assert all(torch.equal(t, applied[n]) for n, t in weights.items())
    patcher.restore()
    assert all(torch.equal(t, original[n]) for n, t in weights.items())


# ---- the WebUI backends and the diffusers host, with the failure injected into the core's compute --------------------

def failing_compute(monkeypatch, module, make, after: int = 1):
    """`module.compute` fails on its call number `after + 1`, after scribbling over the live weight it was given."""
    import lib_adapters.patching as patching

    real, calls = patching.compute, []

    def compute(ops, weight, bias, out=None, **kw):
        calls.append(1)
        if len(calls) > after:
            if out is not None:
                out.add_(1.0)
            raise make()
        return real(ops, weight, bias, out=out, **kw)

    monkeypatch.setattr(module, "compute", compute)


@pytest.mark.parametrize("failure", ["runtime", "out-of-memory"])
def test_a1111_generation_goes_on_without_adapters_after_a_failure_and_recovers(tmp_path, monkeypatch, failure):
    import lib_adapters.patching as patching

    host = harness.start(tmp_path)
    model = host.use(A1111Model("sd1"))
    write_lora(os.path.join(host.lora_dir, "a.safetensors"), model, "sd1", seed=1)
    write_lora(os.path.join(host.lora_dir, "b.safetensors"), model, "sd1", seed=2)
    original = host.snapshot()
    _, seen, _ = host.generate("<lora:a:1>")
    with_a = seen["first_pass"][0]
    failing_compute(monkeypatch, patching, FAILURES[failure][0], after=2)
    res, seen, _ = host.generate("<lora:a:0.5> <lora:b:1>")
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())
    assert "no adapter is applied" in res.comments and ("out of memory" in res.comments) == (failure != "runtime")
    monkeypatch.undo()
    _, seen, _ = host.generate("<lora:a:1>")
    assert all(torch.equal(v, with_a[k]) for k, v in seen["first_pass"][0].items())


def test_a1111_ctrl_c_while_applying_leaves_the_originals(tmp_path, monkeypatch):
    import lib_adapters.patching as patching

    host = harness.start(tmp_path)
    model = host.use(A1111Model("sd1"))
    write_lora(os.path.join(host.lora_dir, "a.safetensors"), model, "sd1", seed=1)
    original = host.snapshot()
    _, seen, _ = host.generate("<lora:a:1>")
    with_a = seen["first_pass"][0]
    failing_compute(monkeypatch, patching, KeyboardInterrupt, after=2)
    with pytest.raises(KeyboardInterrupt):
        host.generate("<lora:a:0.5>")
    assert all(torch.equal(v, original[k]) for k, v in host.snapshot().items())
    monkeypatch.undo()
    _, seen, _ = host.generate("<lora:a:1>")
    assert all(torch.equal(v, with_a[k]) for k, v in seen["first_pass"][0].items())


def test_forge_failure_hands_forge_its_own_patchers_and_recovers(tmp_path, monkeypatch):
    host = harness.start(tmp_path, flavour="forge")
    engine = host.use(forge_engine("sd1", seed=1))
    write_lora(os.path.join(host.lora_dir, "a.safetensors"), A1111Model("sd1"), "sd1", seed=2)
    write_lora(os.path.join(host.lora_dir, "b.safetensors"), A1111Model("sd1"), "sd1", seed=3)
    original = host.snapshot()
    _, seen, _ = host.generate("<lora:a:1>")
    with_a = seen["first_pass"][0]
    forge = sys.modules[type(host.runtime.get_backend()).__module__]  # the module the loaded extension uses
    real, made = forge.identifier, []

    def identifier(component, patches):  # the second component fails: the first one's clone was already made
        made.append(component)
        if len(made) > 1:
            raise RuntimeError("failed after a clone was made")
        return real(component, patches)

    monkeypatch.setattr(forge, "identifier", identifier)
    res, seen, _ = host.generate("<lora:a:1> <lora:b:0.5>")
    assert len(made) == 2
    assert all(torch.equal(v, original[k]) for k, v in seen["first_pass"][0].items())
    base = engine.forge_objects_original
    assert engine.forge_objects.unet is base.unet and engine.forge_objects.clip is base.clip
    assert host.runtime.backend.state.last == {} and "no adapter is applied" in res.comments
    monkeypatch.undo()
    _, seen, _ = host.generate("<lora:a:1>")
    assert all(torch.equal(v, with_a[k]) for k, v in seen["first_pass"][0].items())


@pytest.mark.parametrize("failure", list(FAILURES))
def test_diffusers_apply_failure_leaves_the_originals(demo, monkeypatch, failure):
    import lib_adapters.patching as patching
    from lib_adapters.hosts.diffusers import DiffusersAdapters

    pipe, paths, _ = demo
    make = FAILURES[failure][0]
    params = lambda: {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}  # noqa: E731
    original = params()
    with DiffusersAdapters(pipe) as adapters:
        adapters.apply([(paths["demo_lora"], 1.0)])
        applied = params()
        failing_compute(monkeypatch, patching, make, after=3)
        with pytest.raises(type(make())):
            adapters.apply([(paths["demo_lora"], 0.5), (paths["demo_lokr"], 1.0)])
        assert adapters.active == [] and all(torch.equal(v, original[k]) for k, v in params().items())
        monkeypatch.undo()
        assert adapters.apply([(paths["demo_lora"], 1.0)])["kept"] == 0
        assert all(torch.equal(v, applied[k]) for k, v in params().items())
    assert all(torch.equal(v, original[k]) for k, v in params().items())
