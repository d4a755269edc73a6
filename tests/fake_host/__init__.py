"""A small faithful fake of the WebUI host (host-contract §11) for tests of scripts/ and lib_adapters/hosts/.

`install(flavour)` makes `import modules…` (and, for Forge, `import backend…`) resolve to these fakes, freshly
imported, and forgets previously imported host glue so it binds to them. `load_extension(root)` executes the
extension's scripts/*.py the way the host does.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FORGE = os.path.join(HERE, "forge")
PURGE = ("modules", "backend", "launch", "lib_adapters.hosts")


def _purge() -> None:
    for name in list(sys.modules):
        if any(name == p or name.startswith(p + ".") for p in PURGE):
            del sys.modules[name]


def install(flavour: str = "a1111", data_dir: str | None = None):
    """Point `modules` (and `backend` for Forge) at the fakes; returns the fresh `modules.shared`."""
    assert flavour in ("a1111", "forge")
    _purge()
    sys.path[:] = [p for p in sys.path if p not in (HERE, FORGE)]
    sys.path.insert(0, HERE)
    if flavour == "forge":
        sys.path.insert(0, FORGE)
    os.environ["FAKE_WEBUI_FLAVOUR"] = flavour
    if data_dir:
        os.environ["FAKE_WEBUI_DATA"] = str(data_dir)
    from modules import shared
    return shared


def uninstall() -> None:
    _purge()
    sys.path[:] = [p for p in sys.path if p not in (HERE, FORGE)]


def load_extension(root: str):
    """Execute every scripts/*.py of the extension in name order (host-contract §1.4); returns the modules."""
    from modules import scripts

    folder = os.path.join(root, "scripts")
    return [scripts.load_script_file(os.path.join(folder, f), root)
            for f in sorted(os.listdir(folder)) if f.endswith(".py")]


class FakeApp:
    """Records FastAPI-style route registrations: app.get(path)(fn), app.post(path)(fn)."""

    def __init__(self):
        self.routes: dict[tuple[str, str], object] = {}

    def _add(self, method, path):
        def deco(fn):
            self.routes.setdefault((method, path), fn)  # Starlette dispatches to the first registered route
            return fn
        return deco

    def get(self, path, **kwargs):
        return self._add("GET", path)

    def post(self, path, **kwargs):
        return self._add("POST", path)
