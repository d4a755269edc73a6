"""Adapter files by name for the WebUI: the host's Lora folders, indexed like the builtin names them."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from ..errors import AdapterError
from ..files import read_header
from ..library import AdapterIndex


def adapter_dirs() -> list[str]:
    """`--lora-dir` (defined by the builtin's preload, even when it is disabled) and A1111's LyCORIS folder."""
    from modules import paths, shared

    dirs = [getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora"),
            getattr(shared.cmd_opts, "lyco_dir_backcompat", None)]
    out: list[str] = []
    for d in dirs:
        if d and os.path.abspath(d) not in out:
            out.append(os.path.abspath(d))
    return out


def read_metadata(path: str) -> dict:
    """A safetensors file's `__metadata__` (strings), {} for anything unreadable."""
    try:
        return read_header(path).metadata
    except AdapterError:
        return {}


def usable_aliases(paths, metadata_of) -> dict:
    """alias → path for the `ss_output_name` aliases the builtin would use: unique, no file's stem, not "None"."""
    stems = {Path(p).stem.lower() for p in paths}
    found: dict[str, list] = {}
    for p in paths:
        alias = str(metadata_of(p).get("ss_output_name", "")).strip()
        if alias and alias.lower() not in stems and alias.lower() != "none":
            found.setdefault(alias.lower(), []).append((alias, p))
    return {hits[0][0]: hits[0][1] for hits in found.values() if len(hits) == 1}


class Library:
    """Adapter files by name like the builtin: stem, sub-folder path, metadata alias (`ss_output_name`) when it
    is unique, case-insensitive when unique. A missing name triggers one rescan."""

    def __init__(self, dirs=None):
        self._dirs = dirs
        self.index: AdapterIndex | None = None  # replaced whole by refresh: readers keep the one they took
        self.meta: dict[str, tuple[tuple, dict]] = {}
        self.refreshing = threading.Lock()

    def dirs(self) -> list[str]:
        return list(self._dirs) if self._dirs is not None else adapter_dirs()

    def refresh(self) -> None:
        with self.refreshing:  # one scan at a time; lookups meanwhile use the previous index
            index = AdapterIndex(self.dirs())
            for alias, path in usable_aliases(index.paths, lambda p: self.metadata(str(p))).items():
                index.add_alias(alias, path)
            self.index = index

    def current(self) -> AdapterIndex:
        index = self.index
        if index is None:
            self.refresh()
            index = self.index
        return index

    def metadata(self, path: str) -> dict:
        """Header metadata, cached by mtime and size."""
        try:
            st = os.stat(path)
        except OSError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self.meta.get(path)
        if cached and cached[0] == stamp:
            return cached[1]
        meta = read_metadata(path) if path.lower().endswith(".safetensors") else {}
        self.meta[path] = (stamp, meta)
        return meta

    def alias(self, path: str) -> str:
        """The name the builtin would show: the metadata alias when it is usable, else the stem."""
        index = self.index
        alias = index.alias_of(path) if index is not None else None
        return alias or os.path.splitext(os.path.basename(path))[0]

    def find(self, name: str) -> str:
        try:
            return self.current().find(name)
        except AdapterError:
            self.refresh()
            return self.current().find(name)

    def paths(self) -> list[str]:
        return [str(p) for p in self.current().paths]

    def metadata_items(self) -> list[tuple[str, dict]]:
        """(path, metadata) of every file read so far (a copy: safe while other threads read more)."""
        return [(path, meta) for path, (_, meta) in list(self.meta.items())]
