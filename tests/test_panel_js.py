"""The card script's prompt logic (javascript/adapters.js, run in node) agrees with the Python tag writer and
parser: the tag it inserts, how it reads tags back, and that a click toggles (adds, then removes exactly)."""

from __future__ import annotations

import json
import os
import random
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
  if (c.op === 'tag') return api.tagText(c.name, c.unet, c.te, c.order, c.lbw, c.schedule);
  if (c.op === 'parse') return api.findTags(c.text, c.order, 1).map(t => [t.name, t.unet, t.te]);
  if (c.op === 'toggle') return api.toggle(c.text, c.payload, c.unet, c.te, c.sep);
  if (c.op === 'set') return api.setStrengths(c.text, c.name, c.unet, c.te, c.order, c.fold);
  if (c.op === 'body') {
    const t = api.parseTagBody(c.body, c.order, 1);
    return t.error ? 'error' : [t.name, t.unet, t.te];
  }
  if (c.op === 'scan') return api.scan(c.text).map(t => [t.start, t.end, t.kind, t.body]);
  if (c.op === 'has') return api.hasTag(c.text, c.name, c.fold);
  if (c.op === 'named') return api.NAMED;
});
process.stdout.write(JSON.stringify(out));
"""


def run_js(cases: list[dict]) -> list:
    done = subprocess.run([NODE, "-e", RUNNER, SCRIPT], input=json.dumps(cases), capture_output=True, text=True,
                          timeout=60, check=True)
    return json.loads(done.stdout)


STRENGTHS = [(1.0, 1.0), (0.8, 0.5), (-0.25, 0.0), (1.23456, 0.1), (0.0, 2.0)]


def test_inserted_tag_matches_the_python_writer():
    cases = [dict(op="tag", name="my lora", unet=u, te=t, order=o, lbw=lbw, schedule=sched)
             for u, t in STRENGTHS for o in tags.ORDERS for lbw, sched in (("", ""), ("OUTD", "0@0,1@0.5"))]
    assert run_js(cases) == [cards.tag_text(c["name"], c["unet"], c["te"], c["order"], c["lbw"], c["schedule"])
                             for c in cases]


def test_a_click_inserts_the_cards_schedule_and_block_weights():
    payload = {"name": "n", "order": "unet,te", "activation": "", "lbw": "OUTD", "schedule": "0@0,1@0.5"}
    [added] = run_js([dict(op="toggle", text="a cat", payload=payload, unet=0.8, te=0.8, sep=" ")])
    assert added == "a cat <lora:n:0.8:unet=0@0,1@0.5:lbw=OUTD>"
    [removed] = run_js([dict(op="toggle", text=added, payload=payload, unet=0.8, te=0.8, sep=" ")])
    assert removed == "a cat"


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
    [gone] = run_js([dict(op="toggle", text="x <lora:SD1:0.3:te=1> y", payload={**payload, "activation": "",
                                                                                "fold": True}, unet=1, te=1, sep=" ")])
    assert gone == "x y"


def test_strength_inputs_rewrite_the_tag_in_place():
    [text] = run_js([dict(op="set", text="a <lora:n:1> b <lora:m:0.5>", name="n", unet=0.7, te=0.2, order="te,unet")])
    assert text == "a <lora:n:0.2:0.7> b <lora:m:0.5>"
    _, found = tags.parse_prompt(text, order="te,unet")
    assert (found[0].unet, found[0].te) == (0.7, 0.2)


def test_strength_inputs_keep_the_other_named_arguments():
    [text] = run_js([dict(op="set", text="<lora:n:1:lbw=1,0,0,1: hr=0.5:te=0>", name="n", unet=0.7, te=0.2,
                          order="unet,te")])
    assert text == "<lora:n:0.7:0.2:lbw=1,0,0,1: hr=0.5>"


# Every case the hostile review listed, and the arguments issue 16 added: the WebUI's Python reader
# (tag_options) and the card script agree on what each means, or that it is malformed.
BODIES = [
    "a:1_0", "a:inf", "a:nan", "a:Infinity", "a:0x10", "a:1.5abc", "a:1:2:3", "a:foo=1", "a:1e309", "a:-1e309",
    "a: .5 ", "a:+1e-1:te=0", "a:1.", "a:-0", "a:1e-400", "a:\u0661", "a:", "a::0.5", "a:unet=", "a:te=1_0",
    "a:0.3:unet=1:te=0.5", "a:1:dyn=8", "a:0@0,1@0.5", "a:1@0,1@0.5", "a:0@-1,1@1", "a:1;", "a:0@0@1",
    "a:1:hr=0.5", "a:hrunet=abc", "a:x=2", "a:x=inf", "a:lbw=1,0,0,1", "a:lbw=OUTD", "a:lbwe=x",
    "a:start=2:stop=1", "a:start=1", "a:stop=3", "a:step=1-5", "a:step=5", "a:start=1.5", " spaced name :0.5",
    "a:=1", "a: 2 : 3 ",
]


def python_reading(body: str, order: str):
    from lib_adapters.errors import AdapterError
    from lib_adapters.schedules import Schedule
    from lib_adapters.tag_options import tag_options

    name, *items = body.split(":")
    try:
        o = tag_options(items, order, 1.0, f"<lora:{body}>")
    except AdapterError:
        return "error"

    def shown(v):
        return v if isinstance(v, float) else f"schedule:{v.text}" if isinstance(v, Schedule) else "window"
    return [name.strip(), shown(o.unet), shown(o.te)]


@pytest.mark.parametrize("order", tags.ORDERS)
def test_the_card_script_reads_every_tag_as_the_webui_does(order):
    bodies = BODIES
    js = run_js([dict(op="body", body=b, order=order) for b in bodies])
    assert js == [python_reading(b, order) for b in bodies]
    [named] = run_js([dict(op="named")])
    from lib_adapters.tag_options import NAMED
    assert named == list(NAMED)


def test_tags_are_found_in_linear_time_and_alike_in_python_and_javascript():
    rng = random.Random(3)
    pieces = ["<lora:", "<lyco:", ">", ":", "a", " ", "<", "lora", "<LORA:"]
    prompts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(200)]
    prompts += ["<lora:" * 40_000, "x <lora:" * 30_000 + ">", "<lora:a:1>" + "<lora:" * 40_000]  # 240 KB each
    js = run_js([dict(op="scan", text=p) for p in prompts])
    assert js == [[[t.start, t.end, t.kind, t.body] for t in tags.scan(p)] for p in prompts]
    assert js[-3] == [] and len(js[-2]) == 1 and js[-1] == [[0, 10, "lora", "a:1"]]


def test_names_match_exactly_unless_the_card_may_fold_case():
    cases = [dict(op="has", text="<lora:Foo:1>", name="foo", fold=False),
             dict(op="has", text="<lora:Foo:1>", name="foo", fold=True),
             dict(op="has", text="<lora:foo:1>", name="foo", fold=False)]
    assert run_js(cases) == [False, True, True]
