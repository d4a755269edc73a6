"""Fake `modules.shared`: options (the host's defaults for what extensions read), cmd_opts, the current model."""

import argparse
import os
import re

from modules import paths_internal
from modules.options import OptionHTML, OptionInfo, Options, options_section  # noqa: F401

FLAVOUR = os.environ.get("FAKE_WEBUI_FLAVOUR", "a1111")  # "a1111" or "forge"

options_templates: dict = {}
options_templates.update(options_section(("extra_networks", "Extra Networks", "sd"), {
    "extra_networks_default_multiplier": OptionInfo(1.0, "Default multiplier for extra networks"),
    "extra_networks_add_text_separator": OptionInfo(" ", "Extra networks separator"),
    "sd_hypernetwork": OptionInfo("None", "Add hypernetwork to prompt"),
}))
options_templates.update(options_section(("saving-images", "Saving images"), {
    "samples_format": OptionInfo("png", "File format for images"),
}))
options_templates.update(options_section(("optimizations", "Optimizations", "sd"), {
    "persistent_cond_cache": OptionInfo(True, "Persistent cond cache"),
}))
options_templates.update(options_section((None, "Hidden options"), {
    "disabled_extensions": OptionInfo([], "Disable these extensions"),
    "disable_all_extensions": OptionInfo("none", "Disable all extensions"),
}))

opts = Options(options_templates)

cmd_opts = argparse.Namespace(
    lora_dir=os.path.join(paths_internal.models_path, "Lora"),
    lyco_dir_backcompat=os.path.join(paths_internal.models_path, "LyCORIS"),
    no_hashing=False,
    api=False,
    nowebui=False,
)

sd_model = None  # the host makes this a property over sd_models.model_data; tests assign it


class _State:
    interrupted = False
    skipped = False
    job = ""
    sampling_step = 0
    sampling_steps = 0


state = _State()


def natural_sort_key(s, regex=re.compile("([0-9]+)")):
    return [int(text) if text.isdigit() else text.lower() for text in regex.split(s)]


def walk_files(path, allowed_extensions=None):
    if not os.path.exists(path):
        return
    allowed = set(allowed_extensions) if allowed_extensions is not None else None
    items = list(os.walk(path, followlinks=True))
    items = sorted(items, key=lambda x: natural_sort_key(x[0]))
    for root, _, files in items:
        for filename in sorted(files, key=natural_sort_key):
            if allowed is not None and os.path.splitext(filename)[1].lower() not in allowed:
                continue
            yield os.path.join(root, filename)


def html(filename):
    return f"<!-- template {filename} -->"
