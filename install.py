"""Run by the WebUI launcher (A1111/Forge) before start-up. The extension needs nothing beyond the host's own
packages (torch, safetensors), so this installs nothing; it never touches torch."""

import importlib.util

MISSING = [name for name in ("safetensors",) if importlib.util.find_spec(name) is None]
if MISSING:
    print(f"[Adapters] missing packages: {', '.join(MISSING)}; the host should provide them")
