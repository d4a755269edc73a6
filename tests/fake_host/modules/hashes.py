"""Fake `modules.hashes`, with each host's real hash: A1111 addnet hash for safetensors, Forge full-file sha256."""

import hashlib
import struct

from modules import shared
from modules.cache import cache

calls: list = []


def _full(filename):
    h = hashlib.sha256()
    with open(filename, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _addnet(filename):
    h = hashlib.sha256()
    with open(filename, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_from_cache(filename, title, use_addnet_hash=False):
    store = cache("hashes-addnet" if use_addnet_hash else "hashes")
    return store.get(title)


def sha256(filename, title, use_addnet_hash=False):
    calls.append((filename, title, use_addnet_hash))
    store = cache("hashes-addnet" if use_addnet_hash else "hashes")
    if title in store:
        return store[title]
    if shared.cmd_opts.no_hashing:
        return None
    value = _addnet(filename) if use_addnet_hash and shared.FLAVOUR == "a1111" else _full(filename)
    store[title] = value
    return value
