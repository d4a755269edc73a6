"""WebUI settings of the extension (Settings → Adapters) and the console log line (host-contract §9).

Host modules are imported inside functions, so this file imports without a host."""

from __future__ import annotations

import sys

from .. import tags

LOG_PREFIX = "[Adapters]"
SECTION = ("adapters", "Adapters", "sd")

OPT_ORDER = "adapters_tag_order"
OPT_CACHE = "adapters_cache_size"
OPT_HASHES = "adapters_add_hashes_to_infotext"
OPT_WARN_UNMATCHED = "adapters_warn_unmatched"
OPT_SCHEDULES = "adapters_schedule_path"
SCHEDULE_PATHS = ("auto", "merge", "forward")
DEFAULTS = {OPT_ORDER: "unet,te", OPT_CACHE: 8, OPT_HASHES: True, OPT_WARN_UNMATCHED: True,
            OPT_SCHEDULES: "auto"}


def log(message: str) -> None:
    print(f"{LOG_PREFIX} {message}", file=sys.stderr if message.startswith("error") else sys.stdout, flush=True)


def register_settings() -> None:
    """Add our options to the host's templates at import time (as the builtin does), so --nowebui has them too."""
    from modules import shared

    try:
        import gradio as gr
    except ImportError:  # tests, or a host without gradio: the options still exist, only their widgets differ
        gr = None
    if not hasattr(gr, "Radio"):
        gr = None
    info = shared.OptionInfo
    options = {
        OPT_ORDER: info(DEFAULTS[OPT_ORDER], "Two numbers in <lora:name:a:b> mean", gr.Radio if gr else None,
                        {"choices": list(tags.ORDERS)}).info(
            "unet,te: a = UNet, b = text encoder (this extension's default); te,unet: the builtin Lora's order"),
        OPT_CACHE: info(DEFAULTS[OPT_CACHE], "Parsed adapters kept in memory", gr.Slider if gr else None,
                        {"minimum": 0, "maximum": 64, "step": 1}).info(
            "re-selecting a cached adapter does not read its file again; a changed file is re-read"),
        OPT_HASHES: info(DEFAULTS[OPT_HASHES], "Add adapter hashes to infotext (\"Lora hashes\")"),
        OPT_WARN_UNMATCHED: info(DEFAULTS[OPT_WARN_UNMATCHED],
                                 "Warn when an adapter has keys that match no layer of the model"),
        OPT_SCHEDULES: info(DEFAULTS[OPT_SCHEDULES], "Strengths that change over the steps (w@step schedules) are "
                            "applied by", gr.Radio if gr else None, {"choices": list(SCHEDULE_PATHS)}).info(
            "merge: the changed layers are recomputed at each step where their strength changes (exact, the cheaper "
            "way on a CPU); forward: those layers run their adapter in the forward pass, a change costs nothing; "
            "auto: merge on a CPU or when the strength changes at most twice, forward otherwise"),
    }
    shared.options_templates.update(shared.options_section(SECTION, options))
    for key, option in options.items():  # options_templates is opts.data_labels in the host; keep data in step
        if key not in shared.opts.data_labels:
            shared.opts.add_option(key, option)
        elif key not in shared.opts.data:
            shared.opts.data[key] = option.default


def opt(key: str):
    """An option's value, falling back to our default where the host has none (no settings yet)."""
    try:
        from modules import shared
        value = getattr(shared.opts, key)
    except (ImportError, AttributeError):
        return DEFAULTS[key]
    return DEFAULTS[key] if value is None else value


def tag_order() -> str:
    order = str(opt(OPT_ORDER)).replace(" ", "")
    return order if order in tags.ORDERS else DEFAULTS[OPT_ORDER]
