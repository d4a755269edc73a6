"""Tag arguments for schedules and block weights: loractl's positional/named/hires forms, lbw='s `lbw=`, `x=`,
`start=`/`stop=`/`step=`; malformed or unsupported arguments name the tag."""

import pytest

from lib_adapters.errors import AdapterError
from lib_adapters.schedules import Schedule, Window, value_at
from lib_adapters.tag_options import tag_options, te_notice


def at(strength, steps):
    return [value_at(strength, i, steps) for i in range(steps)]


def test_one_positional_schedule_sets_both_parts_and_the_hires_pass():
    o = tag_options(["0@0,1@1"])
    assert isinstance(o.unet, Schedule) and o.te == o.unet and o.hr_unet == o.unet and o.hr_te == o.te
    assert o.scheduled and o.positional == 1 and o.lbw is None


@pytest.mark.parametrize("order,unet,te", [("unet,te", [0, 1], [0.5, 0.5]), ("te,unet", [0.5, 0.5], [0, 1])])
def test_two_positional_follow_the_order_setting(order, unet, te):
    o = tag_options(["0@0,1@1", "0.5"], order)
    assert at(o.unet, 2) == unet and at(o.te, 2) == te


def test_named_forms_and_hires_strengths():
    o = tag_options(["1", "unet=0@0,1@0.5", "hr=0.25"])
    assert at(o.unet, 3) == [0, 1, 1] and o.te == 1.0 and (o.hr_unet, o.hr_te) == (0.25, 0.25)
    o = tag_options(["0.5", "hr=1@0,0@1", "hrte=0.75"])
    assert at(o.hr_unet, 3) == [1, 0.5, 0] and o.hr_te == 0.75 and o.strengths(hires=True) == (o.hr_unet, 0.75)
    o = tag_options(["te=1", "unet=0@0,1@1"])
    assert o.te == 1.0 and o.hr_unet == o.unet


def test_block_weight_arguments_are_kept_as_written():
    o = tag_options(["0.8", "lbw=1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", "x=0.3"])
    assert (o.unet, o.te, o.lbw, o.x) == (0.8, 0.8, "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", 0.3) and not o.scheduled


def test_start_stop_and_step_windows_act_on_the_unet_only():
    o = tag_options(["1", "stop=2"])
    assert isinstance(o.unet, Window) and at(o.unet, 4) == [1, 1, 0, 0] and o.te == 1.0
    assert at(tag_options(["0.5", "start=3"]).unet, 5) == [0, 0, 0, 0.5, 0.5]
    assert at(tag_options(["1", "step=1-3"]).hr_unet, 5) == [0, 1, 1, 0, 0]


@pytest.mark.parametrize("items,words", [
    (["lbwe=ATTNON"], ["lbwe=", "not supported"]),
    (["abc"], ["'abc' is not a number"]),
    (["1", "2", "3"], ["at most two strengths"]),
    (["foo=1"], ["unknown argument 'foo'"]),
    (["hr=1@x"], ["'x' is not a number"]),
    (["stop=2.5"], ["not a step number"]),
    (["step=5"], ["not a range"]),
    (["start=4", "stop=4"], ["no step"]),
    (["x=a"], ["'a' is not a number"]),
])
def test_malformed_arguments_name_the_tag(items, words):
    tag = "<lora:a:" + ":".join(items) + ">"
    with pytest.raises(AdapterError) as e:
        tag_options(items, tag=tag)
    assert tag in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_dyn_is_a_notice_and_a_te_schedule_gets_one_message():
    o = tag_options(["1", "dyn=16", "te=0.2@0,1@1"], tag="<lora:a:1:dyn=16:te=0.2@0,1@1>")
    assert len(o.notices) == 1 and "dyn=16" in o.notices[0]
    message = te_notice("<lora:a:…>", o)
    assert "first step" in message and "0.2" in message
    assert te_notice("<lora:a:…>", tag_options(["0@0,1@1", "te=1"])) is None
