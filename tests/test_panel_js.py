"""The card script's prompt logic (javascript/adapters.js, run in node) agrees with the Python tag writer and
parser: the tag it inserts, how it reads tags back, and that a click toggles (adds, then removes exactly)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from lib_adapters import cards, tags

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "javascript", "adapters.js")
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")

RUNNER = """
const api = require(process.argv[1]);
const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const out = cases.map(c => {
  if (c.op === 'tag') return api.tagText(c.name, c.unet, c.te, c.order);
  if (c.op === 'parse') return api.findTags(c.text, c.order, 1).map(t => [t.name, t.unet, t.te]);
  if (c.op === 'toggle') return api.toggle(c.text, c.payload, c.unet, c.te, c.sep);
  if (c.op === 'set') return api.setStrengths(c.text, c.name, c.unet, c.te, c.order);
});
process.stdout.write(JSON.stringify(out));
"""


def run_js(cases: list[dict]) -> list:
    done = subprocess.run([NODE, "-e", RUNNER, SCRIPT], input=json.dumps(cases), capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(done.stdout)


STRENGTHS = [(1.0, 1.0), (0.8, 0.5), (-0.25, 0.0), (1.23456, 0.1), (0.0, 2.0)]


def test_inserted_tag_matches_the_python_writer():
    cases = [dict(op="tag", name="my lora", unet=u, te=t, order=o) for u, t in STRENGTHS for o in tags.ORDERS]
    assert run_js(cases) == [cards.tag_text(c["name"], c["unet"], c["te"], c["order"]) for c in cases]


PROMPTS = [
    "a cat <lora:a:0.5> <lyco:b:0.2:0.7>", "<lora:c:te=0.3> x <lora:d:0.4:unet=0.9>", "<lora:e> <lora:f:1:2>",
    "<lora: spaced name :0.5>",
]


@pytest.mark.parametrize("order", tags.ORDERS)
def test_tags_read_back_as_the_python_parser_reads_them(order):
    js = run_js([dict(op="parse", text=p, order=order) for p in PROMPTS])
    for prompt, got in zip(PROMPTS, js):
        _, parsed = tags.parse_prompt(prompt, order=order)
        assert got == [[t.name, t.unet, t.te] for t in parsed]


def test_click_toggles_and_restores_the_prompt_exactly():
    payload = {"name": "sd1", "activation": 'say "hi"', "order": "unet,te"}
    starts = ["a cat, sitting", "", "<lora:other:0.5> dog"]
    added = run_js([dict(op="toggle", text=s, payload=payload, unet=0.8, te=0.5, sep=" ") for s in starts])
    for start, text in zip(starts, added):
        _, found = tags.parse_prompt(text)
        assert [(t.name, t.unet, t.te) for t in found if t.name == "sd1"] == [("sd1", 0.8, 0.5)]
        assert text.endswith('<lora:sd1:0.8:0.5> say "hi"')
    removed = run_js([dict(op="toggle", text=t, payload=payload, unet=0.8, te=0.5, sep=" ") for t in added])
    assert removed == starts
    # an edited tag (other strengths, case) is still recognised and removed
    [gone] = run_js([dict(op="toggle", text="x <lora:SD1:0.3:te=1> y", payload={**payload, "activation": ""},
                          unet=1, te=1, sep=" ")])
    assert gone == "x y"


def test_strength_inputs_rewrite_the_tag_in_place():
    [text] = run_js([dict(op="set", text="a <lora:n:1> b <lora:m:0.5>", name="n", unet=0.7, te=0.2, order="te,unet")])
    assert text == "a <lora:n:0.2:0.7> b <lora:m:0.5>"
    _, found = tags.parse_prompt(text, order="te,unet")
    assert (found[0].unet, found[0].te) == (0.7, 0.2)
