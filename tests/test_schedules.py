"""Step schedules (sd-webui-loractl syntax): values at every step for fractional and absolute forms, parsing and
its messages, and StepPlan: the plan of a step equals the fixed-strength plan its values reduce to."""

import functools

import pytest
import torch

from lib_adapters.adapter import Adapter
from lib_adapters.errors import AdapterError
from lib_adapters.models import build_tiny, to_checkpoint
from lib_adapters.naming import LayerMap, build_plan
from lib_adapters.naming.blocks import load_presets, parse_block_weights
from lib_adapters.patching import Patcher, StateDictStore
from lib_adapters.schedules import Schedule, StepEntry, StepPlan, first, parse_strength, value_at


def values(text, steps):
    s = parse_strength(text)
    return [value_at(s, i, steps) for i in range(steps)]


def test_fractional_schedule_runs_from_the_first_to_the_last_step():
    assert values("0@0,1@1", 5) == [0, 0.25, 0.5, 0.75, 1]
    assert values("0@0,1@0.5", 5) == [0, 0.5, 1, 1, 1]               # constant after the last point
    assert values("0.25@0.5,1@1", 5) == [0.25, 0.25, 0.25, 0.625, 1]  # the first weight before the first point
    assert values("1@0,0@0.5,1@1", 3) == [1, 0, 1]
    assert values("0@0;1~1", 3) == [0, 0.5, 1]                        # `;` and `~` as loractl accepts them
    assert values("0@0,1", 3) == [0, 0.5, 1]                          # a weight without a step is w@1


def test_absolute_schedule_counts_steps_from_one():
    assert values("0@5,1@6", 8) == [0, 0, 0, 0, 0, 1, 1, 1]          # the first five steps without the adapter
    assert values("0@0,1@10", 6) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert values("1@2,0@4", 5) == [1, 1, 0.5, 0, 0]
    assert values("0.5@0.5,1@3", 4) == [0.6, 0.8, 1, 1]                # any step > 1: every step is a step number


def test_a_repeated_step_is_a_jump_the_later_point_holds_at_it():
    assert values("0@0.5,1@0.5", 5) == [0, 0, 1, 1, 1]
    assert values("0@3,1@3", 4) == [0, 0, 1, 1]


def test_one_step_pass_and_the_first_step_value():
    assert values("0.2@0,1@1", 1) == [0.2]
    assert first(parse_strength("0.3@0,1@1")) == 0.3
    assert first(parse_strength("0@0,0.6@1,0.6@20")) == 0.6           # absolute: the first step is step 1
    assert first(parse_strength("1@1,0@20")) == 1.0
    assert first(0.7) == 0.7


def test_plain_numbers_stay_numbers_and_sums_add_up():
    assert parse_strength("0.75") == 0.75
    assert parse_strength("0.7@0,0.7@1") == 0.7 and parse_strength("0.5@3;0.5@9") == 0.5  # one value: a number
    total = parse_strength("0@0,1@1") + 0.5 + parse_strength("1@0,0@1")
    assert [value_at(total, i, 3) for i in range(3)] == [1.5, 1.5, 1.5]


@pytest.mark.parametrize("text,words", [
    ("0@0,", ["empty", "w@step"]), ("a@0,1@1", ["'a' is not a number", "schedule weight"]),
    ("0@x,1@1", ["'x' is not a number", "schedule step"]), ("0@0@1", ["entry '0@0@1'", "expected w@step"]),
    ("1@-1,0@1", ["negative step"]), ("inf@0,1@1", ["'inf' is not a number"]), ("1e999", ["not a number"]),
])
def test_malformed_schedules_name_the_tag(text, words):
    tag = f"<lora:a:{text}>"
    with pytest.raises(AdapterError) as e:
        parse_strength(text, tag)
    assert tag in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


# ---- plans per step ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def sd1():
    return to_checkpoint(build_tiny("sd1", seed=3))


def kohya_lora(ckpt, seed=0):
    """A kohya LoRA on every UNet linear of the first input attention and on one text-encoder projection."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, weight in (("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q",
                         "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
                        ("lora_unet_output_blocks_3_1_proj_out", "model.diffusion_model.output_blocks.3.1.proj_out.weight"),
                        ("lora_unet_middle_block_1_transformer_blocks_0_ff_net_2",
                         "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2.weight"),
                        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                         "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight")):
        out, inp = ckpt[weight].shape[:2]
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, inp, *ckpt[weight].shape[2:], generator=g) * 0.3
        tensors[f"{key}.lora_up.weight"] = torch.randn(out, 2, *([1, 1] if ckpt[weight].ndim == 4 else []),
                                                       generator=g) * 0.3
    return Adapter.from_tensors(tensors, {"ss_base_model_version": "sd_v1"}, f"lora{seed}.safetensors")


def merged(ckpt, plan):
    store = {k: v.clone() for k, v in ckpt.items()}
    Patcher(StateDictStore(store)).reconcile(plan)
    return store


def test_step_plan_equals_the_fixed_strength_plan_at_every_step_bit_exactly():
    ckpt = sd1()
    lm = LayerMap.for_checkpoint(ckpt)
    a, b = kohya_lora(ckpt, 1), kohya_lora(ckpt, 2)
    lbw = parse_block_weights("OUTD", "sd1", load_presets())
    entries = [StepEntry(a, parse_strength("0@0,1@1"), parse_strength("0.4@0,1@1"), lbw), StepEntry(b, 0.5, 0.5)]
    sp = StepPlan(entries, lm)
    steps = 5
    store = {k: v.clone() for k, v in ckpt.items()}
    patcher = Patcher(StateDictStore(store))
    for i in range(steps):
        s = i / 4
        fixed, _ = build_plan([(a, s, 0.4, lbw), (b, 0.5, 0.5)], lm)
        plan = sp.plan_at(i, steps)
        assert {w: [(op.source, op.strength) for op in ops] for w, ops in plan.items()} == \
               {w: [(op.source, op.strength) for op in ops] for w, ops in fixed.items()}
        stats = patcher.reconcile(plan)
        want = merged(ckpt, fixed)
        assert all(torch.equal(store[k], want[k]) for k in ckpt)
        if i:  # only the scheduled adapter's OUT03-OUT06 layer changes between steps; b's other layers are kept
            assert stats["recomputed"] == 1
    patcher.restore()
    assert all(torch.equal(store[k], v) for k, v in ckpt.items())


def test_text_encoder_keeps_its_first_step_value_and_zero_leaves_layers_out():
    ckpt = sd1()
    lm = LayerMap.for_checkpoint(ckpt)
    a = kohya_lora(ckpt, 1)
    sp = StepPlan([StepEntry(a, parse_strength("0@0,1@1"), parse_strength("0.4@0,1@1"))], lm)
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    start, end = sp.plan_at(0, 3), sp.plan_at(2, 3)
    assert list(start) == [te] and start[te][0].strength == 0.4
    assert end[te][0].strength == 0.4 and len(end) == 4


def test_schedule_type_is_frozen_and_reports_its_axis():
    s = parse_strength("0@0,1@10")
    assert isinstance(s, Schedule) and not s.fractional and s.position(0, 20) == 1.0
    assert parse_strength("0@0,1@1").position(19, 20) == 1.0
