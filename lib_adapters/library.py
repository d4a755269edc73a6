"""Finding adapter files by name under one or more folders, as the WebUI's builtin does."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import AdapterError
from .files import PICKLE_SUFFIXES

ADAPTER_SUFFIXES = (".safetensors",) + tuple(sorted(PICKLE_SUFFIXES))


class AdapterIndex:
    """Adapter files under `dirs` (recursive), found by stem, relative path or alias; case-insensitive when unique."""

    def __init__(self, dirs: list[str | os.PathLike] | str | os.PathLike):
        self.dirs = [Path(d) for d in ([dirs] if isinstance(dirs, (str, os.PathLike)) else dirs)]
        self.aliases: dict[str, str] = {}
        self.alias_by_path: dict[str, str] = {}
        self.paths: list[Path] = []
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folders."""
        found = []
        for d in self.dirs:
            if d.is_dir():
                for root, _, files in os.walk(d, followlinks=True):
                    found.extend(Path(root) / f for f in files if f.lower().endswith(ADAPTER_SUFFIXES))
        # .safetensors before a pickle of the same name
        self.paths = sorted(found, key=lambda p: (str(p.with_suffix("")).lower(), p.suffix.lower() != ".safetensors"))
        self.by_name: dict[str, list[Path]] = {}  # stem and relative name, as spelled and case-folded → files
        for p in self.paths:
            for key in {p.stem, self.relative_name(p), p.stem.lower(), self.relative_name(p).lower()}:
                self.by_name.setdefault(key, []).append(p)

    def relative_name(self, path: Path) -> str:
        """'sub/name' for a file under one of the folders, without extension."""
        for d in self.dirs:
            try:
                return path.relative_to(d).with_suffix("").as_posix()
            except ValueError:
                continue
        return path.stem

    def add_alias(self, alias: str, path: str | os.PathLike) -> None:
        self.aliases[alias] = str(path)
        self.alias_by_path[str(path)] = alias

    def alias_of(self, path: str | os.PathLike) -> str | None:
        return self.alias_by_path.get(str(path))

    def _candidates(self, name: str, fold) -> list[Path]:
        key = fold(name.replace("\\", "/"))
        hits = [p for p in self.by_name.get(key, ()) if fold(p.stem) == key or fold(self.relative_name(p)) == key]
        if not hits:
            hits = [Path(p) for a, p in self.aliases.items() if fold(a) == key]
        unique = {}
        for p in hits:
            unique.setdefault(str(p.with_suffix("")).lower(), p)
        return list(unique.values())

    def find(self, name: str) -> str:
        """Path of the adapter called `name`; AdapterError when there is none or several."""
        for fold in (lambda s: s, str.lower):
            hits = self._candidates(name, fold)
            if len(hits) == 1:
                return str(hits[0])
            if len(hits) > 1:
                listed = ", ".join(self.relative_name(p) for p in hits[:5])
                raise AdapterError(name, f"ambiguous adapter name: {len(hits)} files match ({listed}); use the sub-folder path")
        where = ", ".join(str(d) for d in self.dirs) or "no folder"
        raise AdapterError(name, f"no adapter file with this name under {where}")
