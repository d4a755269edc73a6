"""WebUI entry: registers sd-webui-adapters with the host (A1111 1.10 or Forge). Everything else is in
lib_adapters/hosts/. Runs at every script load, including Reload UI, so registration happens here."""

from modules import errors, script_callbacks, scripts

EXTENSION_ROOT = scripts.basedir()  # valid only while the host loads this file

from lib_adapters.hosts import webui  # noqa: E402  (the extension root is on sys.path during load)

webui.register(script_callbacks)

try:
    from lib_adapters.hosts import panel
except ModuleNotFoundError as e:
    if e.name != "lib_adapters.hosts.panel":
        errors.report(f"sd-webui-adapters: the adapters page is unavailable: {e}", exc_info=True)
    panel = None
except Exception as e:  # the panel is optional: loading adapters must work without it
    errors.report(f"sd-webui-adapters: the adapters page is unavailable: {e}", exc_info=True)
    panel = None
if panel is not None:
    panel.register_callbacks()
