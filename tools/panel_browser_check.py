"""By-hand browser check of the adapter cards (not part of the test suite).

    python tools/panel_browser_check.py make-files DIR        # adapter files for a WebUI's models/Lora
    python tools/panel_browser_check.py webui URL [--out DIR] # drive a running WebUI (A1111/Forge) with the page
    python tools/panel_browser_check.py harness [--out DIR]   # static page: fake-host card HTML + our JS/CSS

Drives Debian's chromium through Playwright (nothing downloaded: `executable_path=/usr/bin/chromium`). Checks:
cards render with badges; a click adds the tag (with activation text) and marks the card active; a second click
removes it exactly; typing a tag into the prompt marks its card; the strength inputs rewrite the tag; hostile
metadata runs no script. Screenshots (light and dark) go to --out (default outputs/panel/, gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless=new", "--disable-background-networking", "--disable-gpu", "--disable-extensions",
        "--disable-default-apps", "--disable-sync", "--no-first-run", "--metrics-recording-only"]
FILES = os.environ.get("PANEL_FILES", "")  # the WebUI's Lora folder, to read the editor's sidecar back
EVIL = '<script>window.__pwned=1</script>" onmouseover="window.__pwned=2'


def make_files(folder: str) -> None:
    """A few adapters of different types and families, one with a preview and user metadata, one hostile."""
    import zlib
    import struct

    from lib_adapters import cards, files
    from reference_adapters import build_lycoris
    from test_panel_cards import tiny_unet_lora

    os.makedirs(os.path.join(folder, "styles"), exist_ok=True)
    files.save_tensors(os.path.join(folder, "cat_style.safetensors"), tiny_unet_lora(768), {
        "ss_tag_frequency": json.dumps({"10_cat": {"cat": 40, "orange fur": 12, "sitting": 5}}),
        "ss_sd_model_name": "v1-5-pruned-emaonly.safetensors", "ss_resolution": "(512, 512)", "ss_num_epochs": "8"})
    cards.write_user_metadata(os.path.join(folder, "cat_style.safetensors"), {
        "description": "Orange cats", "activation text": "orange cat", "preferred weight": 0.8, cards.TE_KEY: 0.5})
    files.save_tensors(os.path.join(folder, "xl_detail.safetensors"), tiny_unet_lora(2048, dora=True))
    for algo, kw in (("loha", dict(algo="loha", linear_dim=8, conv_dim=8)), ("oft", dict(algo="diag-oft", linear_dim=16, conv_dim=16))):
        files.save_tensors(os.path.join(folder, "styles", f"toy_{algo}.safetensors"), build_lycoris(algo, **kw).state_dict)
    files.save_tensors(os.path.join(folder, "evil.safetensors"), build_lycoris("lokr", algo="lokr", linear_dim=4, factor=4).state_dict, {
        "modelspec.description": EVIL, "ss_tag_frequency": json.dumps({"1_x": {EVIL: 3}}), "ss_sd_model_name": EVIL})

    def png(w, h, rgb):  # a flat-colour PNG, stdlib only
        raw = b"".join(b"\x00" + bytes(rgb) * w for _ in range(h))
        chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
            chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")

    with open(os.path.join(folder, "cat_style.preview.png"), "wb") as f:
        f.write(png(64, 96, (230, 140, 40)))
    print(f"wrote adapter files to {folder}")


def harness_page(out: str) -> str:
    """A static page: the fake host renders our items into its card template; our JS and CSS are loaded."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "fake_host"))
    from modules import shared
    from lib_adapters.hosts import panel

    folder = tempfile.mkdtemp(prefix="panel-harness-")
    make_files(folder)
    shared.cmd_opts.lora_dir = folder
    page = panel.make_page_class()()
    page.create_items()
    for name, item in page.items.items():  # the host serves previews by URL; the harness links the file
        if page.cards[name].preview_file:
            item["preview"] = "file://" + page.cards[name].preview_file
    cards_html = "".join(page.create_item_html("txt2img", item, page.card_tpl) for item in page.items.values())
    theme = """
    :root { --body-text-color:#1f2937; --background-fill-primary:#fff; --border-color-primary:#e5e7eb;
            --color-accent:#f97316; --color-accent-soft:#ffedd5; --input-background-fill:#fff; }
    .dark { --body-text-color:#f3f4f6; --background-fill-primary:#0b0f19; --border-color-primary:#374151;
            --color-accent:#f97316; --color-accent-soft:#3b2417; --input-background-fill:#1f2937; }
    body { background: var(--background-fill-primary); color: var(--body-text-color); font-family: sans-serif; }
    .card { position: relative; display: inline-block; width: 180px; height: 240px; margin: 6px; border-radius: 8px;
            background: #555; overflow: hidden; vertical-align: top; cursor: pointer; }
    .card .preview { width: 100%; height: 100%; object-fit: cover; }
    .card .actions { position: absolute; bottom: 0; left: 0; right: 0; padding: 6px; color: #fff;
            background: linear-gradient(transparent, rgba(0,0,0,.8)); }
    .card .name { font-weight: bold; display: block; word-break: break-all; } .hidden { display: none; }
    .card .description { font-size: 0.8em; display: block; max-height: 3em; overflow: hidden; }
    textarea { width: 600px; height: 60px; }"""
    with open(os.path.join(ROOT, "style.css")) as f:
        style = f.read()
    with open(os.path.join(ROOT, "javascript", "adapters.js")) as f:
        script = f.read().replace("</script", "<\\/script")
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><style>{theme}\n{style}</style>
<script>var opts = {{extra_networks_add_text_separator: " "}};</script><script>{script}</script></head>
<body><div id="txt2img_prompt"><label><textarea>a photo</textarea></label></div>
<div id="txt2img_neg_prompt"><label><textarea></textarea></label></div>
<div id="txt2img_extra_tabs"><div id="txt2img_lora_controls" class="extra-network-control">
<div id="txt2img_lora_extra_sort_name" class="extra-network-control--sort" data-sortkey="name">Name</div></div>
<div id="txt2img_lora_cards" class="extra-network-cards">{cards_html}</div></div></body></html>"""
    path = os.path.join(out, "harness.html")
    with open(path, "w") as f:
        f.write(doc)
    return "file://" + path


def check(page, out: str, tab_name: str | None) -> list[str]:
    """The card checks; returns failures (empty when all pass)."""
    failures = []

    def expect(cond, what):
        print(("PASS " if cond else "FAIL ") + what)
        if not cond:
            failures.append(what)

    if tab_name:  # the WebUI: open the extra-networks tab of the page
        page.locator("#txt2img_extra_tabs button", has_text=tab_name).first.click()
    page.wait_for_selector("#txt2img_extra_tabs .card.adapters-card", timeout=60000)
    prompt = page.locator("#txt2img_prompt textarea")
    prompt.fill("a photo")
    prompt.dispatch_event("input")
    cat = page.locator("#txt2img_extra_tabs .card[data-name='cat_style']").first
    cat.scroll_into_view_if_needed()
    page.screenshot(path=os.path.join(out, "cards.png"), full_page=False)
    badges = cat.locator(".adapters-badge").all_inner_texts()
    expect(badges == ["LoRA", "SD1", "r4"], f"cat_style badges {badges}")
    cat.click(position={"x": 20, "y": 60})
    value = prompt.input_value()
    expect(value == "a photo <lora:cat_style:0.8:0.5> orange cat", f"click inserts the tag: {value!r}")
    expect("adapters-active" in (cat.get_attribute("class") or ""), "clicked card is active")
    page.screenshot(path=os.path.join(out, "card-active.png"))
    cat.click(position={"x": 20, "y": 60})
    expect(prompt.input_value() == "a photo", f"second click removes it: {prompt.input_value()!r}")
    expect("adapters-active" not in (cat.get_attribute("class") or ""), "card no longer active")
    prompt.fill("a photo <lora:toy_loha:0.3>")  # a card of unknown family: never hidden by Forge's preset filter
    prompt.dispatch_event("input")
    xl = page.locator("#txt2img_extra_tabs .card[data-name='toy_loha']").first
    page.wait_for_timeout(200)
    expect("adapters-active" in (xl.get_attribute("class") or ""), "typing a tag marks its card")
    te_input = xl.locator(".adapters-strengths input").nth(1)
    expect(xl.locator(".adapters-strengths input").first.input_value() == "0.3", "card inputs follow the prompt")
    te_input.fill("0.7")
    te_input.dispatch_event("input")
    expect(prompt.input_value() == "a photo <lora:toy_loha:0.3:0.7>", f"strength input rewrites: {prompt.input_value()!r}")
    evil = page.locator("#txt2img_extra_tabs .card[data-name='evil']").first
    evil.hover()
    expect(page.evaluate("window.__pwned === undefined"), "hostile metadata ran no script")
    expect(EVIL in evil.inner_text() or EVIL in (evil.text_content() or ""), "hostile text is shown as text")
    page.screenshot(path=os.path.join(out, "cards-after.png"))
    if tab_name:
        failures += check_webui_extras(page, out, tab_name)
    return failures


def check_webui_extras(page, out: str, tab_name: str) -> list[str]:
    """WebUI only: our sort buttons drive the host's sort; the metadata editor saves strengths the card then uses."""
    failures = []

    def expect(cond, what):
        print(("PASS " if cond else "FAIL ") + what)
        if not cond:
            failures.append(what)

    base = f"#txt2img_{tab_name.lower()}"
    page.locator(f"{base}_extra_sort_adapters_type").click()
    page.wait_for_timeout(300)
    types = page.eval_on_selector_all(f"{base}_cards .card:not(.hidden)", "cs => cs.map(c => c.dataset.sortType)")
    expect(types == sorted(types) or types == sorted(types, reverse=True), f"sorted by type: {types}")
    prompt = page.locator("#txt2img_prompt textarea")
    search = page.locator(f"{base}_extra_search >> visible=true").first
    for term, expected in (("loha", ["toy_loha"]), ("rank 4", None), ("orange fur", ["cat_style"])):
        search.fill(term)
        search.dispatch_event("input")
        page.wait_for_timeout(400)
        shown = page.eval_on_selector_all(f"{base}_cards .card:not(.hidden)", "cs => cs.map(c => c.dataset.name)")
        if expected is None:
            expect(shown and "toy_loha" not in shown and "toy_oft" not in shown, f"search {term!r}: {shown}")
        else:
            expect(shown == expected, f"search {term!r}: {shown}")
    search.fill("")
    search.dispatch_event("input")
    page.wait_for_timeout(300)
    prompt = page.locator("#txt2img_prompt textarea")
    prompt.fill("a photo")
    prompt.dispatch_event("input")
    cat = page.locator(f"{base}_cards .card[data-name='cat_style']").first
    cat.hover()
    cat.locator(".edit-button").click()
    editor = page.locator(f"{base}_edit_user_metadata")
    editor.wait_for(state="visible", timeout=30000)
    page.wait_for_timeout(1000)
    training = editor.locator("table.adapters-training").inner_text()
    expect("orange fur" in training and "SD1" in training, "editor shows the training facts and trigger words")
    te = editor.locator("label", has_text="Preferred text-encoder strength").locator("input")
    te.fill("0.35")
    te.dispatch_event("input")
    page.screenshot(path=os.path.join(out, "editor.png"))
    editor.locator("button", has_text="Save").click()
    page.wait_for_timeout(3000)
    saved = json.load(open(os.path.join(FILES, "cat_style.json"))) if FILES else {}
    expect(saved.get("preferred te weight") == 0.35, f"editor saved the TE strength: {saved}")
    cat = page.locator(f"{base}_cards .card[data-name='cat_style']").first
    cat.click(position={"x": 20, "y": 60})
    expect(prompt.input_value() == "a photo <lora:cat_style:0.8:0.35> orange cat",
           f"refreshed card uses the saved strength: {prompt.input_value()!r}")
    prompt.fill("a photo")
    prompt.dispatch_event("input")
    files_in_tree = page.locator(f".tree-list-content-file[data-name='toy_loha']")
    if files_in_tree.count() == 0:
        print("SKIP tree view: set extra_networks_tree_view_style to Tree to check it")
    if files_in_tree.count():
        for folder in (os.path.basename(FILES.rstrip("/")) or "Lora", "styles"):  # expand the tree down to the file
            page.locator(f"{base}_tree .tree-list-content-dir[data-name='{folder}']").first.click()
            page.wait_for_timeout(300)
        page.locator(f"{base}_tree .tree-list-content-file[data-name='toy_loha']").first.click()
        expect(prompt.input_value().startswith("a photo <lora:toy_loha:"), f"a tree-view row toggles too: {prompt.input_value()!r}")
    page.screenshot(path=os.path.join(out, "tree.png"))
    return failures


def run(url: str, out: str, tab_name: str | None) -> int:
    from playwright.sync_api import sync_playwright

    os.makedirs(out, exist_ok=True)
    failures = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        for theme in ("light", "dark"):
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: m.type == "error" and print("console error:", m.text))
            sep = "&" if "?" in url else "?"
            page.goto(url + (f"{sep}__theme=dark" if theme == "dark" and url.startswith("http") else ""), timeout=120000)
            if theme == "dark" and not url.startswith("http"):
                page.evaluate("document.body.classList.add('dark')")
            sub = os.path.join(out, theme)
            os.makedirs(sub, exist_ok=True)
            failures += check(page, sub, tab_name)
            page.close()
        browser.close()
    print(f"{'OK' if not failures else 'FAILED'}: screenshots under {out}")
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("make-files", "webui", "harness"))
    ap.add_argument("target", nargs="?", help="folder (make-files) or URL (webui)")
    ap.add_argument("--out", default=os.path.join(ROOT, "outputs", "panel"))
    ap.add_argument("--tab", default="Lora", help="the page's tab title in the WebUI")
    a = ap.parse_args()
    if a.mode == "make-files":
        make_files(a.target)
        return 0
    if a.mode == "harness":
        os.makedirs(a.out, exist_ok=True)
        return run(harness_page(a.out), os.path.join(a.out, "harness"), None)
    return run(a.target, os.path.join(a.out, "webui"), a.tab)


if __name__ == "__main__":
    sys.exit(main())
