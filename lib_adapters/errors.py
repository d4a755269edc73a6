"""The one exception type the library raises for bad input."""

from __future__ import annotations

import os


class AdapterError(Exception):
    """A file, tag or name that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike | None, reason: str):
        self.path = str(path) if path is not None else None
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class ShapeMismatch(ValueError):
    """An adapter layer whose tensors do not fit the weight it targets."""
