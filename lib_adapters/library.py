"""Finding adapter files by name under one or more folders, as the WebUI's builtin does.

Folders are walked with symlinks followed, but each real directory once (a link to `.` or to a sibling adds
nothing, link loops end) and each real file once. Every file keeps a name that reaches it: its stem, else its path
under its folder (`sub/name`), else that path under the folder's own name (`Lora/name`, `LyCORIS/name`: the same
stem in two folders), else its full path without the extension. A name that is a file's path wins over stems.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import AdapterError
from .files import PICKLE_SUFFIXES

ADAPTER_SUFFIXES = (".safetensors",) + tuple(sorted(PICKLE_SUFFIXES))


def walk(dirs: list[str | os.PathLike], suffixes: tuple[str, ...] = ADAPTER_SUFFIXES) -> list[tuple[Path, Path]]:
    """(file, the folder of `dirs` it was found under) for every file ending in `suffixes`, each real directory
    and each real file once, folders in order, names sorted (real sub-folders before links to folders)."""
    seen_dirs: set[str] = set()
    seen_files: set[str] = set()
    found = []
    for root in dirs:
        root = Path(root)
        if not root.is_dir():
            continue
        for top, subdirs, files in os.walk(root, followlinks=True):
            real = os.path.realpath(top)
            if real in seen_dirs:
                subdirs[:] = []
                continue
            seen_dirs.add(real)
            subdirs.sort(key=lambda d: (os.path.islink(os.path.join(top, d)), d))
            subdirs[:] = [d for d in subdirs if os.path.realpath(os.path.join(top, d)) not in seen_dirs]
            for name in sorted(files):
                if name.lower().endswith(suffixes):
                    path = Path(top) / name
                    real_file = os.path.realpath(path)
                    if real_file not in seen_files:
                        seen_files.add(real_file)
                        found.append((path, root))
    return found


class AdapterIndex:
    """Adapter files under `dirs` (recursive), found by stem, relative path, folder-qualified path, full path or
    alias; case-insensitive when unique."""

    def __init__(self, dirs: list[str | os.PathLike] | str | os.PathLike):
        self.dirs = [Path(d) for d in ([dirs] if isinstance(dirs, (str, os.PathLike)) else dirs)]
        self.aliases: dict[str, str] = {}
        self.alias_by_path: dict[str, str] = {}
        self.paths: list[Path] = []
        self.refresh()

    def refresh(self) -> None:
        """Rescan the folders."""
        found = walk(self.dirs)
        root_of = {p: r for p, r in found}
        # .safetensors before a pickle of the same name
        self.paths = sorted(root_of, key=lambda p: (str(p.with_suffix("")).lower(), p.suffix.lower() != ".safetensors"))
        self.names: dict[Path, list[str]] = {}  # each file's names, shortest first
        self.by_name: dict[str, list[Path]] = {}  # names as spelled and case-folded → files
        for p in self.paths:
            root = root_of[p]
            relative = p.relative_to(root).with_suffix("").as_posix()
            names = [p.stem, relative, f"{root.name}/{relative}", p.with_suffix("").as_posix()]  # stem, then paths
            self.names[p] = names
            for key in {*names, *(n.lower() for n in names)}:
                self.by_name.setdefault(key, []).append(p)

    def relative_name(self, path: Path) -> str:
        """The shortest name that finds `path` alone ('name', 'sub/name', 'Lora/name' or its full path)."""
        path = Path(path)
        for name in dict.fromkeys(self.names.get(path, [path.stem])):
            if self._candidates(name, lambda s: s) == [path]:
                return name
        return path.with_suffix("").as_posix()

    def folds_uniquely(self, name: str, path: str | os.PathLike) -> bool:
        """Whether `name` written in any case can only mean `path` (no other file has a name, path or alias equal to
        it ignoring case), so that a tag may match it ignoring case."""
        key = name.replace("\\", "/").lower()
        files = {str(p.with_suffix("")).lower() for p in self.by_name.get(key, ())
                 if any(n.lower() == key for n in self.names[p])}
        files |= {str(Path(p).with_suffix("")).lower() for a, p in self.aliases.items() if a.lower() == key}
        return files == {str(Path(path).with_suffix("")).lower()}

    def add_alias(self, alias: str, path: str | os.PathLike) -> None:
        self.aliases[alias] = str(path)
        self.alias_by_path[str(path)] = alias

    def alias_of(self, path: str | os.PathLike) -> str | None:
        return self.alias_by_path.get(str(path))

    def _candidates(self, name: str, fold) -> list[Path]:
        """Files named `name`: by a path (relative, folder-qualified, full) first, else by stem, else by alias."""
        key = fold(name.replace("\\", "/"))
        near = self.by_name.get(key, ())
        hits = [p for p in near if any(fold(n) == key for n in self.names[p][1:])]
        if not hits:
            hits = [p for p in near if fold(p.stem) == key]
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
                raise AdapterError(name, f"ambiguous adapter name: {len(hits)} files match; write one of {listed}")
        where = ", ".join(str(d) for d in self.dirs) or "no folder"
        raise AdapterError(name, f"no adapter file with this name under {where}")
