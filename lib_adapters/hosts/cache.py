"""The parsed-adapter cache shared by generations and API calls: a bounded LRU keyed by file identity, safe to use
from several threads (files are read outside the lock; two threads may read the same file once each)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from ..adapter import Adapter
from ..errors import AdapterError
from .settings import OPT_CACHE, opt


class AdapterCache:
    """Bounded LRU of loaded adapters keyed by (path, mtime, size): a changed file is read again."""

    def __init__(self, size_option=lambda: opt(OPT_CACHE)):
        self.size_option = size_option
        self.entries: OrderedDict[tuple, Adapter] = OrderedDict()
        self.reads = 0
        self.lock = threading.Lock()

    @staticmethod
    def key(path: str) -> tuple:
        st = os.stat(path)
        return os.path.abspath(path), st.st_mtime_ns, st.st_size

    def get(self, path: str, keep: int = 0) -> Adapter:
        """The adapter at `path`; `keep` adapters in use now stay cached even above the size setting."""
        try:
            key = self.key(path)
        except OSError as e:
            raise AdapterError(path, f"cannot be read: {e.strerror or e}") from None
        with self.lock:
            adapter = self.entries.get(key)
            if adapter is not None:
                self.entries.move_to_end(key)
                self._trim(keep)
                return adapter
        adapter = Adapter.load(path)
        with self.lock:
            self.reads += 1
            for old in [k for k in self.entries if k[0] == key[0] and k != key]:  # an older version of the file
                del self.entries[old]
            self.entries[key] = adapter
            self.entries.move_to_end(key)
            self._trim(keep)
        return adapter

    def _trim(self, keep: int = 0) -> None:
        limit = max(int(self.size_option() or 0), keep)
        while len(self.entries) > limit:
            self.entries.popitem(last=False)

    def trim(self, keep: int = 0) -> None:
        with self.lock:
            self._trim(keep)

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
