"""Block-weight presets in the WebUI: the common ones, sd-webui-lora-block-weight's own preset file (where that
extension is or was installed) and `lbwpresets.txt` in this extension's folder; re-read when a file changes."""

from __future__ import annotations

import os

from ..naming.blocks import PRESET_FILE, REFERENCE_EXTENSION, Presets, load_presets

EXTENSION_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def preset_folders() -> list[str]:
    """Folders whose `lbwpresets.txt` is read, later ones winning: the reference extension's `scripts/`, ours."""
    folders = []
    try:
        from modules import extensions, paths_internal

        candidates = [os.path.join(paths_internal.extensions_dir, REFERENCE_EXTENSION, "scripts")]
        candidates += [os.path.join(e.path, "scripts") for e in getattr(extensions, "extensions", [])]
    except ImportError:
        candidates = []
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, PRESET_FILE)) and folder not in folders:
            folders.append(folder)
    return folders + [EXTENSION_ROOT]


class PresetCache:
    """The presets, read again only when a preset file appears, disappears or changes."""

    def __init__(self, folders=preset_folders):
        self.folders = folders
        self.stamp: tuple = ()
        self.presets: Presets | None = None

    def get(self) -> Presets:
        folders = self.folders()
        stamp = tuple((f, _mtime(os.path.join(f, PRESET_FILE))) for f in folders)
        if self.presets is None or stamp != self.stamp:
            self.presets, self.stamp = load_presets(folders), stamp
        return self.presets


def _mtime(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None
