"""The WebUI extra-networks page for adapters: one card per file, built from `lib_adapters.cards` (headers only).

Host modules are imported lazily: `register_callbacks()` only registers a before-ui callback; the page class is
built inside it, against whichever `modules.ui_extra_networks` the host (A1111 1.10 or Forge) provides.
"""

from __future__ import annotations

import html
import json
import os
import re
import threading
from pathlib import Path

from .. import cards, tags
from ..errors import AdapterError
from ..library import AdapterIndex
from .index import usable_aliases

BUILTIN_LORA_EXTENSIONS = ("Lora", "sd_forge_lora")
SHOW_ALL_OPTION = "adapters_show_all"
SD_VERSIONS = {"sd1": "SdVersion.SD1", "sd2": "SdVersion.SD2", "sdxl": "SdVersion.SDXL", "sd3": "SdVersion.SD3",
               "flux": "SdVersion.Flux"}
USER_VERSIONS = {"SD1": "sd1", "SD2": "sd2", "SDXL": "sdxl", "Flux": "flux"}



def short_hash(value) -> str:
    """The first 12 hex digits of a metadata hash; anything else (the host shows it unescaped) is dropped."""
    value = str(value or "")[:12]
    return value if re.fullmatch(r"[0-9a-fA-F]{12}", value) else ""

def builtin_lora_enabled() -> bool:
    """Whether the host's own Lora extension is active (its page would then be titled "Lora" too)."""
    try:
        from modules import extensions
    except ImportError:
        return False
    return any(e.name in BUILTIN_LORA_EXTENSIONS and e.enabled for e in getattr(extensions, "extensions", []))


def page_title() -> str:
    """"Lora" when we are the only LoRA page, "Adapters" beside the builtin (element ids must not clash)."""
    return "Adapters" if builtin_lora_enabled() else "Lora"


def default_dirs() -> list[str]:
    """The folders the WebUI script loads adapters from (`index.adapter_dirs`), else the host's LoRA folders."""
    try:
        from .index import adapter_dirs

        dirs = list(adapter_dirs())
    except Exception:  # the script's module missing or broken: the panel still lists the host's folders
        from modules import shared

        dirs = [getattr(shared.cmd_opts, "lora_dir", None), getattr(shared.cmd_opts, "lyco_dir_backcompat", None)]
    seen: list[str] = []
    for d in dirs:
        if d and os.path.abspath(d) not in seen:
            seen.append(os.path.abspath(d))
    return seen


def default_order() -> str:
    """The order the WebUI script reads two positional strengths in (its setting), else ours: "unet,te"."""
    try:
        from .settings import tag_order

        return tag_order()
    except Exception:
        return "unet,te"


def model_family(sd_model) -> str | None:
    """The loaded model's family as `lib_adapters` names it, or None when unknown or no model is loaded."""
    if sd_model is None:
        return None
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd2", False):
        return "sd2"
    if getattr(sd_model, "is_sd1", False):
        return "sd1"
    if getattr(sd_model, "is_sd3", False):
        return "sd3"
    if getattr(sd_model, "is_flux", False) or "flux" in type(sd_model).__name__.lower():
        return "flux"
    return None


def loaded_model():
    """The loaded model without making the host load one (A1111's `shared.sd_model` loads on first access)."""
    try:
        from modules import sd_models

        data = sd_models.model_data
        if "sd_model" in vars(data):
            return data.sd_model
    except (ImportError, AttributeError, TypeError):
        pass
    from modules import shared

    return getattr(shared, "sd_model", None)


def show_all(opts) -> bool:
    """The host's "show all networks" convention where its option exists, else our own option."""
    labels = getattr(opts, "data_labels", {})
    if "lora_show_all" in labels:
        return bool(getattr(opts, "lora_show_all", False))
    if "lora_filter_disabled" in labels:
        return bool(getattr(opts, "lora_filter_disabled", True))
    return bool(getattr(opts, SHOW_ALL_OPTION, False))


def js_string(text: str) -> str:
    """A JavaScript string literal (JSON): quotes, backslashes and newlines escaped, unlike the host's quote_js."""
    return json.dumps(text, ensure_ascii=False).replace("</", "<\\/")


def card_names(paths: list[str], roots: list[str], metadata_of) -> dict[str, tuple[str, str, bool, str]]:
    """path → (card name, name its tag uses, whether the tag may match in any case, why it cannot be tagged or "").

    The card name is the shortest name that finds the file alone (`library.AdapterIndex`: stem, `sub/stem`,
    `Lora/stem`); a name the WebUI cannot read in a tag (`:` or `>` in it, spaces around it) is replaced in the tag
    by the file's `ss_output_name` alias where that is usable, else the card says why it cannot be tagged."""
    index = AdapterIndex(roots)
    aliases = {}
    for alias, path in usable_aliases(index.paths, metadata_of).items():
        index.add_alias(alias, path)
        aliases[str(path)] = alias
    out = {}
    for path in paths:
        name = index.relative_name(Path(path))
        tag_name, reason = name, tags.untaggable(name)
        alias = aliases.get(path)
        if reason and alias and not tags.untaggable(alias):
            tag_name, reason = alias, ""
        why = f"cannot be tagged: {reason}; rename the file or give it an ss_output_name alias" if reason else ""
        out[path] = (name, tag_name, tag_name == name and index.folds_uniquely(name, path), why)
    return out


def card_payload(name: str, card: cards.CardInfo, user: dict, default: float, mismatch: bool, order: str,
                 fold: bool = False, untaggable: str = "") -> dict:
    """What the card's JavaScript needs (rendered as the `data-sort-adapter` attribute, HTML-escaped by the host);
    `name` is the name the tag uses."""
    unet, te = cards.preferred_strengths(user, default)
    lbw, schedule = cards.preferred_extras(user)
    return {
        "name": name,
        "fold": fold,
        "untaggable": untaggable,
        "unet": unet,
        "te": te,
        "lbw": lbw,
        "schedule": schedule,
        "activation": str(user.get("activation text") or "").strip(),
        "negative": str(user.get("negative text") or "").strip(),
        "order": order,
        "type": card.type_label,
        "family": card.family_label,
        "rank": card.rank,
        "rank_label": card.rank_label,
        "mismatch": mismatch,
        "tags": [t for t, _ in card.training.tags],
        "error": card.error,
    }


def item_prompt(payload: dict) -> str:
    """The host's `prompt` field: a JavaScript expression evaluating to the tag (and activation text)."""
    if payload["error"] or payload["untaggable"]:
        return js_string("")
    text = cards.tag_text(payload["name"], payload["unet"], payload["te"], payload["order"], payload.get("lbw", ""),
                          payload.get("schedule", ""))
    if payload["activation"]:
        text += " " + payload["activation"]
    return js_string(text)


def description_of(card: cards.CardInfo, user: dict, description_is_html: bool, untaggable: str = "") -> str:
    """Why the file cannot be used, else the user's description as they wrote it, else the modelspec description
    (escaped if the host won't)."""
    if card.error or untaggable:
        text = f"Cannot be used: {card.error}" if card.error else untaggable[:1].upper() + untaggable[1:]
        return html.escape(text) if description_is_html else text
    if user.get("description"):
        return str(user["description"])
    text = card.training.description or card.training.title
    return html.escape(text) if description_is_html else text


def shown_metadata(card: cards.CardInfo) -> dict:
    """The file's metadata for the host's metadata popup, the embedded thumbnail left out."""
    return {k: v for k, v in card.metadata.items() if k not in ("modelspec.thumbnail", "ssmd_cover_images")}


def make_page_class():
    """The page class, subclassing the host's `ExtraNetworksPage` (imported only now)."""
    from modules import shared, ui_extra_networks

    class AdaptersPage(ui_extra_networks.ExtraNetworksPage):
        """Adapter cards: type, rank, family, training facts; click toggles the tag in the prompt."""

        def __init__(self, dirs=None, title=None, order=None):
            super().__init__(title or page_title())
            self.allow_negative_prompt = True
            self.dirs_fn = dirs if callable(dirs) else (lambda: list(dirs)) if dirs is not None else default_dirs
            self.order_fn = order if callable(order) else (lambda: order) if order else default_order
            self.paths: dict[str, str] = {}
            self.cards: dict[str, cards.CardInfo] = {}
            self.tag_names: dict[str, tuple[str, bool, str]] = {}  # card name → (tag name, fold, untaggable)
            self.scanning = threading.Lock()
            self.errors: list[str] = []

        def refresh(self):
            self.lister.reset()
            self.paths = {}

        def roots(self) -> list[str]:
            return [os.path.abspath(d) for d in self.dirs_fn() if d]

        def scan(self) -> None:
            """List the files and read every header (cached by mtime); remember unreadable files. One scan at a
            time: the host calls pages from several threads (UI and API)."""
            with self.scanning:
                self._scan()

        def _scan(self) -> None:
            roots = self.roots()
            listed = cards.list_cards(roots)
            self.errors = [str(e) for e in listed if not isinstance(e, cards.CardInfo)]
            good = [c if isinstance(c, cards.CardInfo) else cards.error_card(c) for c in listed]  # a card each
            by_path = {c.path: c for c in good}
            names = card_names(list(by_path), roots, lambda p: by_path[str(p)].metadata if str(p) in by_path else {})
            paths = {names[p][0]: p for p in by_path}
            self.tag_names = {names[p][0]: names[p][1:] for p in by_path}
            self.cards = {name: by_path[p] for name, p in paths.items()}
            self.paths = paths

        def list_items(self):
            self.scan()
            for index, name in enumerate(list(self.cards)):
                item = self.create_item(name, index)
                if item is not None:
                    yield item

        def create_item(self, name, index=None, enable_filter=True):
            card = self.cards.get(name)
            if card is None or not os.path.exists(card.path):
                self.scan()
                card = self.cards.get(name)
                if card is None:
                    return None
            else:
                try:
                    card = cards.read_card(card.path)
                except AdapterError as e:
                    card = cards.error_card(e)
                self.cards[name] = card
            return self.item_for(name, card, index, enable_filter)

        def item_for(self, name, card, index, enable_filter):
            opts = shared.opts
            path = card.path
            stem = os.path.splitext(path)[0]
            item = {"name": name, "filename": path}
            self.read_user_metadata(item)
            user = item.get("user_metadata") or {}
            family = USER_VERSIONS.get(str(user.get("sd version", "")), card.family)
            loaded = model_family(loaded_model())
            mismatch = bool(loaded and family in SD_VERSIONS and family != loaded)
            if mismatch and enable_filter and not show_all(opts):
                return None
            default = float(getattr(opts, "extra_networks_default_multiplier", 1.0) or 1.0)
            tag_name, fold, untaggable = self.tag_names.get(name, (name, False, ""))
            payload = card_payload(tag_name, card, user, default, mismatch, self.order_fn(), fold, untaggable)
            preview = None
            if card.preview_file:
                preview = self.link_preview(card.preview_file)
            elif card.metadata.get("ssmd_cover_images"):
                preview = self.find_embedded_preview(stem, name, card.metadata)
            preview = preview or card.thumbnail
            is_html = bool(getattr(opts, "extra_networks_card_description_is_html", False))
            terms = [self.search_terms_from_path(path), card.type_label, card.family_label]
            if card.rank:
                terms.append(f"rank {card.rank}")
            terms += [t for t, _ in card.training.tags[:5]]
            item.update({
                "shorthash": short_hash(card.metadata.get("sshs_model_hash")),
                "preview": preview,
                "description": description_of(card, user, is_html, untaggable),
                "search_terms": [html.escape(t) for t in terms if t],
                "local_preview": f"{stem}.{getattr(opts, 'samples_format', 'png')}",
                "metadata": shown_metadata(card),
                "sort_keys": {
                    "default": index if index is not None else 0,
                    **self.get_sort_keys(path),
                    "type": card.type_label.lower(),
                    "family": card.family_label.lower(),
                    "rank": card.rank or 0,
                    "adapter": json.dumps(payload, ensure_ascii=False),
                },
                "prompt": item_prompt(payload),
                "negative_prompt": js_string(payload["negative"]),
                "onclick": html.escape(f"return adaptersCardClicked(event, this, {js_string(name)})"),
                # Forge hides cards in JavaScript by this key and its UI preset; "show all" opts out of that too
                "sd_version_str": "SdVersion.Unknown" if show_all(opts) else SD_VERSIONS.get(family, "SdVersion.Unknown"),
            })
            self.metadata[name] = item["metadata"]
            return item

        def allowed_directories_for_previews(self):
            return [d for d in self.roots() if os.path.isdir(d)]

        def create_user_metadata_editor(self, ui, tabname):
            return make_editor_class()(ui, tabname, self)

    return AdaptersPage


def save_user_fields(user: dict, description, activation, weight, unet, te, negative, notes, lbw="",
                     schedule="") -> dict:
    """The sidecar dict after an edit: the builtin's keys, plus our UNet/TE strengths, block weights and UNet
    schedule (empty → removed). A schedule or block-weight text that cannot be read raises AdapterError."""
    user = dict(user)
    for key, value in ((cards.LBW_KEY, check_lbw(lbw)), (cards.SCHEDULE_KEY, check_schedule(schedule))):
        if value:
            user[key] = value
        else:
            user.pop(key, None)
    user["description"] = description or ""
    user["activation text"] = activation or ""
    user["preferred weight"] = float(weight or 0.0)
    user["negative text"] = negative or ""
    user["notes"] = notes or ""
    for key, value in ((cards.UNET_KEY, unet), (cards.TE_KEY, te)):
        if value is None or value == "":
            user.pop(key, None)
        else:
            user[key] = float(value)
    return user


def check_lbw(text) -> str:
    """Block weights as the tag takes them: a preset name or a comma list (numbers, X, X+d, X-d); "" for none."""
    text = "".join(str(text or "").split())
    if text and ("," in text and not all(re.fullmatch(r"[-+.0-9eEX]+", v) for v in text.split(","))
                 or re.search(r"[:<>=]", text)):
        raise AdapterError(None, f"block weights {text!r}: expected a preset name or weights separated by commas")
    return text


def check_schedule(text) -> str:
    """A UNet schedule as the tag takes it (`w@step,…`); "" for none."""
    from ..schedules import parse_strength

    text = "".join(str(text or "").split())
    if text:
        parse_strength(text, f"schedule {text!r}")
    return text


def training_html(card: cards.CardInfo) -> str:
    """A small table of what the header tells: type, rank, family, training facts; every value escaped."""
    t = card.training
    rows = [
        ("Type", card.type_label), ("Rank", card.rank), ("Base family", card.family_label), ("Layers", card.layers),
        ("Base model", t.base_model), ("Resolution", t.resolution), ("Epochs", t.epochs), ("Steps", t.steps),
        ("Trigger words", ", ".join(tag for tag, _ in t.tags)),
    ]
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows if v not in (None, ""))
    return f"<table class='file-metadata adapters-training'>{body}</table>"


def make_editor_class():
    """The user-metadata editor, subclassing the host's `UserMetadataEditor` (gradio imported when the UI is built)."""
    from modules import ui_extra_networks_user_metadata as base

    class AdaptersMetadataEditor(base.UserMetadataEditor):
        """The builtin's fields (description, activation text, preferred weight, negative text, notes) plus
        preferred UNet and text-encoder strengths."""

        def create_extra_default_items_in_left_column(self):
            import gradio as gr

            self.html_training = gr.HTML()

        def create_editor(self):
            import gradio as gr

            self.create_default_editor_elems()
            self.edit_activation = gr.Textbox(label="Activation text", lines=2)
            self.edit_weight = gr.Slider(label="Preferred weight (0 = default)", minimum=0.0, maximum=2.0, step=0.05)
            with gr.Row():
                self.edit_unet = gr.Number(label="Preferred UNet strength (empty = preferred weight)")
                self.edit_te = gr.Number(label="Preferred text-encoder strength (empty = preferred weight)")
            with gr.Row():
                self.edit_schedule = gr.Textbox(label="Preferred UNet schedule (unet=, e.g. 0@0,1@0.5)", lines=1)
                self.edit_lbw = gr.Textbox(label="Preferred block weights (lbw=, a preset or a list)", lines=1)
            self.edit_negative = gr.Textbox(label="Negative prompt text", lines=2)
            self.edit_notes = gr.TextArea(label="Notes", lines=4)
            self.create_default_buttons()
            outputs = [self.edit_name, self.edit_description, self.html_filedata, self.html_preview, self.edit_notes,
                       self.html_training, self.edit_activation, self.edit_weight, self.edit_unet, self.edit_te,
                       self.edit_negative, self.edit_schedule, self.edit_lbw]
            self.button_edit.click(fn=self.put_values_into_components, inputs=[self.edit_name_input], outputs=outputs)\
                .then(fn=lambda: gr.update(visible=True), inputs=[], outputs=[self.box])
            self.setup_save_handler(self.button_save, self.save_user_metadata,
                                    [self.edit_description, self.edit_activation, self.edit_weight, self.edit_unet,
                                     self.edit_te, self.edit_negative, self.edit_notes, self.edit_lbw,
                                     self.edit_schedule])

        def put_values_into_components(self, name):
            values = list(super().put_values_into_components(name))
            user = self.get_user_metadata(name)
            card = self.page.cards.get(name)
            return values + [
                training_html(card) if card else "",
                user.get("activation text", ""),
                float(user.get("preferred weight", 0.0) or 0.0),
                user.get(cards.UNET_KEY),
                user.get(cards.TE_KEY),
                user.get("negative text", ""),
                user.get(cards.SCHEDULE_KEY, ""),
                user.get(cards.LBW_KEY, ""),
            ]

        def save_user_metadata(self, name, description, activation, weight, unet, te, negative, notes, lbw="",
                               schedule=""):
            try:
                user = save_user_fields(self.get_user_metadata(name), description, activation, weight, unet, te,
                                        negative, notes, lbw, schedule)
            except AdapterError as e:
                import gradio as gr
                raise gr.Error(str(e)) from None
            self.page.items.get(name, {})["user_metadata"] = user
            self.write_user_metadata(name, user)

    return AdaptersMetadataEditor


def register_options() -> None:
    """Our "show all" option, registered at import as the builtin does, only where the host has none of its own."""
    from modules import shared

    if SHOW_ALL_OPTION in shared.opts.data_labels:
        return
    shared.options_templates.update(shared.options_section(("extra_networks", "Extra Networks"), {
        SHOW_ALL_OPTION: shared.OptionInfo(False, "Adapters page: also show adapters made for another model family")
        .info("otherwise they are hidden; the card is marked either way"),
    }))


PAGES: list = []


def register_callbacks(dirs=None, order=None) -> None:
    """Called by the WebUI script at import: our option now, the page on the host's before-ui callback.

    `dirs`: folders (or a function returning them; default: the script's adapter folders). `order`: "unet,te" or
    "te,unet" (or a function returning one; default: the script's tag-order setting), how two numbers are read."""
    from modules import script_callbacks

    register_options()

    def before_ui():
        from modules import ui_extra_networks

        page = make_page_class()(dirs=dirs, order=order)
        PAGES[:] = [page]
        ui_extra_networks.register_page(page)

    script_callbacks.on_before_ui(before_ui, name="sd-webui-adapters panel")
