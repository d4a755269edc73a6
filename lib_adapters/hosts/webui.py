"""WebUI entry shared by A1111 1.10 and Forge: registers the extension's callbacks with the host.

The pieces live beside it, one per concern: `settings` (options, log), `cache` (parsed adapters), `index` (names
→ files), `infotext`, `runtime` (one activation → the host backend: `a1111`, `forge`), `network` (the `lora`
extra network), `api` (REST routes). Host modules are imported inside functions, so all of them import without a
host."""

from __future__ import annotations

from . import api, infotext, network
from .runtime import RUNTIME
from .settings import log, register_settings, tag_order


def on_infotext_pasted(text: str, params: dict) -> None:
    infotext.restore_prompt(params, tag_order(), RUNTIME.known_hashes())


def on_app_started(demo, app) -> None:
    """Take `lora` over from a builtin that registered after us; add our routes. Runs after before_ui, also on
    reloads."""
    if network.take_over():
        log("took over the <lora:…> tag from the builtin handler registered after ours")
    api.add_routes(app)


def on_model_loaded(sd_model) -> None:
    RUNTIME.on_model_loaded(sd_model)


def on_script_unloaded() -> None:
    """Reload UI: nothing global is patched; the model keeps its adapters until the next activate."""


def register(script_callbacks) -> None:
    """Everything the entry script registers with the host, in one call."""
    register_settings()
    script_callbacks.on_before_ui(network.on_before_ui, name="adapters_before_ui")
    script_callbacks.on_model_loaded(on_model_loaded, name="adapters_model_loaded")
    script_callbacks.on_infotext_pasted(on_infotext_pasted, name="adapters_infotext_pasted")
    script_callbacks.on_app_started(on_app_started, name="adapters_app_started")
    script_callbacks.on_script_unloaded(on_script_unloaded, name="adapters_script_unloaded")
    script_callbacks.on_cfg_denoiser(RUNTIME.on_cfg_denoiser, name="adapters_cfg_denoiser")
