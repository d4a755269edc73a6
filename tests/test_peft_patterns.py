"""PEFT's rank_pattern/alpha_pattern keys are matched as PEFT matches them (`peft.utils.other.get_pattern_key`,
PEFT 0.21.2), in linear time: a key from a file is never run by Python's backtracking `re`."""

from __future__ import annotations

import random
import re

import pytest
from peft.utils.other import get_pattern_key

from lib_adapters.patterns import check_pattern, pattern_value, peft_match

NAMES = "ab._1"


def random_pattern(rng: random.Random, depth: int = 0) -> str:
    def atom():
        r = rng.random()
        if r < 0.45:
            return rng.choice("ab_1")
        if r < 0.72:
            return rng.choice([".", r"\.", "[ab]", "[^a]", "[a-b1]", r"\d", r"\w", "[._]", r"\W"])
        return "(" + random_pattern(rng, depth + 1) + ")" if depth < 2 else "a"

    def sequence():
        text = "".join(atom() + rng.choice(["", "", "", "*", "+", "?", "{2}", "{0,2}", "{1,}", "*?"])
                       for _ in range(rng.randint(0, 4)))
        return ("^" if rng.random() < 0.1 else "") + text + ("$" if rng.random() < 0.1 else "")

    return "|".join(sequence() for _ in range(rng.randint(1, 2)))


def test_random_patterns_match_exactly_as_peft_matches_them():
    rng = random.Random(13)
    compared = 0
    for _ in range(300):
        key = random_pattern(rng)
        try:
            re.compile(key)
        except re.error:
            continue
        for _ in range(6):
            name = "".join(rng.choice(NAMES) for _ in range(rng.randint(0, 8)))
            assert peft_match(key, name) == (get_pattern_key([key], name) == key != name or
                                             bool(re.match(rf"(.*\.)?({key})$", name))), (key, name)
            compared += 1
    assert compared > 1000


MODULES = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
           "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k",
           "mid_block.attentions.0.proj_in", "up_blocks.2.resnets.0.conv1", "text_model.encoder.layers.3.mlp.fc1"]
FORMS = [  # what diffusers writes (full module names) and what users give PEFT
    {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 8, "mid_block.attentions.0.proj_in": 2},
    {"to_q": 1, "to_k": 2, "conv1": 3},
    {"^mid_block.*": 4, r"attn\d\.to_[qk]": 5, "layers\\.[0-9]+\\.mlp\\..*": 6},
    {"(up|down)_blocks\\.\\d+\\..*": 7, ".*": 8},
    {"attentions.0": 9, "fc1$": 10},
]


@pytest.mark.parametrize("patterns", FORMS)
def test_written_forms_pick_the_value_peft_picks(patterns):
    for module in MODULES:
        key = get_pattern_key(list(patterns), module)
        assert pattern_value(patterns, module) == patterns.get(key), (patterns, module)


@pytest.mark.parametrize("key", ["(a+)+b", "(a|a)(a|a)(a|a)(a|a)(a|a)(a|a)(a|a)(a|a)b", "(.*.*.*.*.*)*x", "(a*)*$b"])
def test_catastrophic_patterns_run_in_linear_time(key):
    for name in ("a" * 3000, "a." * 1500):
        assert peft_match(key, name) is False  # Python's re would backtrack for years on these


@pytest.mark.parametrize("key", ["(?<=x)lin", r"(a)\1", "(?=a)a", "a[", "(?i)lin", "a**", r"\bx"])
def test_patterns_outside_the_subset_or_invalid_are_refused(key):
    with pytest.raises(ValueError):
        check_pattern(key)
        peft_match(key, "lin")
