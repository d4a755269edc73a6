"""Fake `modules.util`: the directory-listing cache (`MassFileLister`) the extra-networks pages use."""

from __future__ import annotations

import os


class MassFileLister:
    """Lists each directory once and answers existence and (mtime, ctime) questions from that listing."""

    def __init__(self):
        self.dirs: dict[str, dict[str, os.stat_result]] = {}

    def _listing(self, folder: str) -> dict[str, os.stat_result]:
        folder = os.path.abspath(folder)
        if folder not in self.dirs:
            entries = {}
            if os.path.isdir(folder):
                with os.scandir(folder) as it:
                    for e in it:
                        try:
                            entries[e.name.lower()] = e.stat()
                        except OSError:
                            pass
            self.dirs[folder] = entries
        return self.dirs[folder]

    def exists(self, path: str) -> bool:
        folder, name = os.path.split(path)
        return name.lower() in self._listing(folder)

    def mctime(self, path: str) -> tuple[float, float]:
        folder, name = os.path.split(path)
        st = self._listing(folder).get(name.lower())
        return (st.st_mtime, st.st_ctime) if st else (0, 0)

    def reset(self) -> None:
        self.dirs.clear()

    def update_file_entry(self, path: str) -> None:
        folder, name = os.path.split(os.path.abspath(path))
        if folder in self.dirs and os.path.exists(path):
            self.dirs[folder][name.lower()] = os.stat(path)
