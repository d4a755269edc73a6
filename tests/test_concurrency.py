"""The WebUI serves API calls on several threads while a generation runs: listing, inspecting, refreshing, the
panel and pasted infotext, all at once beside a generation that switches adapters, 100 rounds, with the thread
switch interval made tiny. Nothing raises, every answer is whole and every generation sees exactly the
weights the same prompt gives when run alone."""

from __future__ import annotations

import os
import random
import sys
import threading

import torch

from fake_host import FakeApp, harness
from fake_host.adapters import write_lora
from fake_host.models import A1111Model

ROUNDS = 100
PROMPTS = ["<lora:a:1>", "<lora:b:0.5> <lora:c:1:0>", "plain", "<lora:a:0.3> <lora:d:1>", "<lora:broken:1> <lora:c:1>"]


def test_api_panel_and_a_generation_at_once_run_clean(tmp_path):
    host = harness.start(tmp_path)
    from lib_adapters.hosts import panel
    from modules import script_callbacks

    model = host.use(A1111Model("sd1"))
    for i, name in enumerate("abcd"):
        write_lora(os.path.join(host.lora_dir, f"{name}.safetensors"), model, "sd1", seed=i,
                   metadata={"ss_output_name": f"{name}_alias", "sshs_model_hash": f"{i:012x}"})
    with open(os.path.join(host.lora_dir, "broken.safetensors"), "wb") as f:
        f.write(b"\x08\0\0\0\0\0\0\0{broken}")
    host.set_option("adapters_cache_size", 1)  # every switch evicts: the cache is written all the time
    app = FakeApp()
    script_callbacks.app_started_callback(None, app)
    listing, inspect = app.routes[("GET", "/sdapi/v1/adapters")], app.routes[("GET", "/sdapi/v1/adapters/inspect")]
    refresh = app.routes[("POST", "/sdapi/v1/adapters/refresh")]
    page = panel.PAGES[0]
    expected = {}
    for prompt in PROMPTS:  # each prompt alone, first
        _, seen, _ = host.generate(prompt)
        expected[prompt] = seen["first_pass"][0]

    errors: list[BaseException] = []
    stop = threading.Event()

    def api_user(seed: int):
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                what = rng.randrange(5)
                if what == 0:
                    items = listing()
                    assert {i["name"] for i in items} == {"a", "b", "c", "d", "broken"}
                elif what == 1:
                    name = rng.choice(["a", "b_alias", "c", "d"])
                    assert inspect(name=name)["layers"] > 0
                elif what == 2:
                    refresh()
                elif what == 3:
                    assert len(list(page.list_items())) == 5
                else:
                    params = {"Prompt": "<lora:x:0.2:0.9>", "Adapter strength order": "te,unet",
                              "Lora hashes": "x: 000000000001"}
                    script_callbacks.infotext_pasted_callback("", params)
                    assert params["Prompt"] in ("<lora:b_alias:0.9:0.2>", "<lora:x:0.9:0.2>")
            except BaseException as e:  # noqa: BLE001 - every failure is reported by the test
                errors.append(e)
                return

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        rng = random.Random(0)
        for round_ in range(ROUNDS):
            stop.clear()
            users = [threading.Thread(target=api_user, args=(round_ * 4 + k,)) for k in range(4)]
            for t in users:
                t.start()
            prompt = rng.choice(PROMPTS)
            _, seen, _ = host.generate(prompt)
            got = seen["first_pass"][0]
            assert all(torch.equal(v, expected[prompt][k]) for k, v in got.items()), (round_, prompt)
            stop.set()
            for t in users:
                t.join()
            assert not errors, (round_, errors[:3])
    finally:
        sys.setswitchinterval(interval)
