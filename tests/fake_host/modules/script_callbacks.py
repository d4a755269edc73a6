"""Fake `modules.script_callbacks`: registration functions and the drivers the host calls (errors are reported)."""

from collections import defaultdict

from modules import errors

callback_map: dict[str, list] = defaultdict(list)


def _add(category, callback, name=None):
    callback_map[category].append((name or getattr(callback, "__name__", "callback"), callback))


def _run(category, *args, reverse=False):
    callbacks = list(callback_map[category])
    for name, cb in reversed(callbacks) if reverse else callbacks:
        try:
            cb(*args)
        except Exception as e:  # the host reports and goes on
            errors.report(f"Error executing callback {name} for {category}: {e}", exc_info=True)


def clear_callbacks():
    callback_map.clear()


def on_before_ui(callback, *, name=None):
    _add("before_ui", callback, name)


def on_ui_settings(callback, *, name=None):
    _add("ui_settings", callback, name)


def on_model_loaded(callback, *, name=None):
    _add("model_loaded", callback, name)


def on_infotext_pasted(callback, *, name=None):
    _add("infotext_pasted", callback, name)


def on_app_started(callback, *, name=None):
    _add("app_started", callback, name)


def on_script_unloaded(callback, *, name=None):
    _add("script_unloaded", callback, name)


def on_before_reload(callback, *, name=None):
    _add("before_reload", callback, name)


def on_ui_tabs(callback, *, name=None):
    _add("ui_tabs", callback, name)


def on_cfg_denoiser(callback, *, name=None):
    _add("cfg_denoiser", callback, name)


class CFGDenoiserParams:
    """The host's per-call sampler state (same signature as A1111 1.10 / Forge)."""

    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


def cfg_denoiser_callback(params):
    _run("cfg_denoiser", params)


def before_ui_callback():
    # The host runs before_ui callbacks (and script_unloaded) in REVERSE registration order (1.10, Forge):
    # a builtin extension's before_ui therefore runs after a user extension's.
    _run("before_ui", reverse=True)


def ui_settings_callback():
    _run("ui_settings")


def model_loaded_callback(sd_model):
    _run("model_loaded", sd_model)


def infotext_pasted_callback(infotext, params):
    _run("infotext_pasted", infotext, params)


def app_started_callback(demo, app):
    _run("app_started", demo, app)


def script_unloaded_callback():
    _run("script_unloaded", reverse=True)
