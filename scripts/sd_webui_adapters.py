"""WebUI entry: registers sd-webui-adapters with the host (A1111 1.10 or Forge). Everything else is in
lib_adapters/hosts/. Runs at every script load, including Reload UI, so registration happens here."""

from modules import errors, script_callbacks, scripts

EXTENSION_ROOT = scripts.basedir()  # valid only while the host loads this file

from lib_adapters.hosts import webui  # noqa: E402  (the extension root is on sys.path during load)

webui.register(script_callbacks)

try:  # the panel is optional: loading adapters must work without it
    from lib_adapters.hosts import panel

    panel.register_callbacks()
except Exception as e:
    errors.report(f"sd-webui-adapters: the adapters page is unavailable: {e}", exc_info=True)
