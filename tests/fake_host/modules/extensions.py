"""Fake `modules.extensions`: the list of extensions with name/enabled/is_builtin."""

import os


class Extension:
    def __init__(self, name, path, enabled=True, is_builtin=False):
        self.name = name
        self.canonical_name = name.lower()
        self.path = path
        self.enabled = enabled
        self.is_builtin = is_builtin


extensions: list = []


def active():
    return [e for e in extensions if e.enabled]


def find_extension(filename):
    for e in extensions:
        if os.path.abspath(filename).startswith(os.path.abspath(e.path)):
            return e
    return None
