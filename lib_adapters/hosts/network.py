"""The `lora` extra network (and its `lyco` alias) in the host's registry, backed by the shared RUNTIME
(host-contract §2)."""

from __future__ import annotations

from .runtime import RUNTIME, host_name
from .settings import log, tag_order

BUILTIN_LORA_EXTENSIONS = ("Lora", "sd_forge_lora")

NETWORK = None


def make_network(name: str = "lora"):
    """An ExtraNetwork subclass instance for the host in use, backed by the shared RUNTIME."""
    from modules import extra_networks

    class AdapterNetwork(extra_networks.ExtraNetwork):
        """`<lora:name:w:w_clip>`: every call reconciles the model to exactly the adapters asked for."""

        def activate(self, p, params_list):
            RUNTIME.activate(p, params_list)

        def deactivate(self, p):
            # The host does not always call this (host-contract §2.3); the next activate reconciles instead.
            pass

    return AdapterNetwork(name)


def builtin_enabled() -> str | None:
    """The name of the host's own LoRA extension when it is enabled."""
    try:
        from modules import extensions
    except ImportError:
        return None
    for e in getattr(extensions, "extensions", []):
        if e.name in BUILTIN_LORA_EXTENSIONS and e.enabled:
            return e.name
    return None


def take_over() -> bool:
    """Make `lora` (and the `lyco` alias) ours in the host's registry; True when something else held it."""
    global NETWORK
    from modules import extra_networks

    if NETWORK is None or not isinstance(NETWORK, extra_networks.ExtraNetwork):  # new host modules (tests)
        NETWORK = make_network("lora")
    replaced = extra_networks.extra_network_registry.get("lora") not in (None, NETWORK)
    extra_networks.register_extra_network(NETWORK)
    extra_networks.register_extra_network_alias(NETWORK, "lyco")
    return replaced


def on_before_ui() -> None:
    """Register `lora`/`lyco`. The host runs before_ui callbacks in reverse registration order, so an enabled
    builtin registers its own `lora` after this; `on_app_started` takes it over again before any generation."""
    take_over()
    builtin = builtin_enabled()
    if builtin:
        log(f"<lora:…>/<lyco:…> tags are applied by sd-webui-adapters on {host_name()}. The builtin '{builtin}' "
            f"extension is enabled too: its tag handler is replaced, so every adapter is applied once (by us). "
            f"Disable '{builtin}' to remove its duplicate page and API routes.")
    else:
        log(f"<lora:…>/<lyco:…> tags are applied by sd-webui-adapters on {host_name()} "
            f"(two numbers mean {tag_order().replace(',', ', ')}).")
