"""Infotext: `Lora hashes` and `Adapter strength order` written after a generation and read back when a user
pastes parameters (host-contract §8)."""

from __future__ import annotations

import hashlib
import os
import struct

from .. import tags
from .settings import OPT_HASHES, opt

HASHES_KEY = "Lora hashes"
ORDER_KEY = "Adapter strength order"


def addnet_hash(path: str) -> str:
    """sha256 of the bytes after the safetensors header (the A1111 builtin's hash for .safetensors)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def short_hash(path: str, metadata: dict) -> str:
    """12 hex digits, as the builtin writes them: `sshs_model_hash` metadata, else the host's (cached) file hash
    (A1111: addnet hash; Forge: full-file sha256), else our own addnet hash."""
    value = metadata.get("sshs_model_hash") or ""
    if not value:
        title = "lora/" + os.path.splitext(os.path.basename(path))[0]
        safetensors = path.lower().endswith(".safetensors")
        try:
            from modules import hashes
            value = hashes.sha256(path, title, use_addnet_hash=safetensors) or ""
        except ImportError:
            value = addnet_hash(path) if safetensors else ""
    return value[:12]


class Hashes:
    """Short hashes of adapter files, computed once per (mtime, size)."""

    def __init__(self):
        self.entries: dict[str, tuple[tuple, str]] = {}  # single reads and writes only: safe across threads

    def of(self, path: str, metadata: dict) -> str:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self.entries.get(path)
        if cached and cached[0] == stamp:
            return cached[1]
        value = short_hash(path, metadata)
        self.entries[path] = (stamp, value)
        return value

    def known(self, library) -> dict[str, str]:
        """short hash → local name, for hashes already computed or stored in metadata."""
        out = {}
        for path, (_, value) in list(self.entries.items()):
            out[value.lower()] = library.alias(path)
        for path, meta in library.metadata_items():
            if meta.get("sshs_model_hash"):
                out[meta["sshs_model_hash"][:12].lower()] = library.alias(path)
        return out


def infotext_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")


def write(p, req, order: str, hashes: Hashes) -> None:
    """The hashes of the applied adapters (kept from the first pass in hires) and, after a two-number tag, the
    order its numbers were read in."""
    params = getattr(p, "extra_generation_params", None)
    if params is None:
        return
    if opt(OPT_HASHES):
        found = dict(getattr(p, "adapters_hashes", {}) or {}) if getattr(p, "is_hr_pass", False) else {}
        for adapter in {w.adapter.path: w.adapter for w in req.entries}.values():
            name = infotext_name(req.names[adapter.path])
            try:
                value = hashes.of(adapter.path, adapter.metadata)
            except OSError:
                value = ""
            if value:
                found[name] = value
        p.adapters_hashes = found
        if found:
            params[HASHES_KEY] = ", ".join(f"{k}: {v}" for k, v in found.items())
        else:
            params.pop(HASHES_KEY, None)
    if req.two_numbers:
        params[ORDER_KEY] = order
    elif not getattr(p, "is_hr_pass", False):
        params.pop(ORDER_KEY, None)


def parse_hashes(text: str) -> list[tuple[str, str]]:
    """`"a: 0123456789ab, b: …"` → [(a, hash), …]."""
    pairs = []
    for part in (text or "").strip('"').split(","):
        name, sep, value = part.rpartition(":")
        if sep and name.strip():
            pairs.append((name.strip(), value.strip()))
    return pairs


def _rewrite(prompt: str, edit) -> str:
    """`prompt` with every tag's body replaced by `edit(body)` (None: unchanged), tags found by the linear scan."""
    out, pos = [], 0
    for t in tags.scan(prompt):
        body = edit(t.body)
        if body is not None:
            out += [prompt[pos:t.start], f"<{t.kind}:{body}>"]
            pos = t.end
    return "".join(out) + prompt[pos:]


def _swapped(body: str) -> str | None:
    """The body with its two positional arguments exchanged (spacing and named arguments kept), else None."""
    parts = body.split(":")
    where = [i for i, part in enumerate(parts[1:], 1) if "=" not in part and part.strip()]
    if len(where) != 2:
        return None
    i, j = where
    parts[i], parts[j] = parts[j], parts[i]
    return ":".join(parts)


def swap_positional(prompt: str) -> str:
    """Swap the two positional strengths of every tag that has two: moves a tag between the two orders."""
    return _rewrite(prompt, _swapped)


def rename(prompt: str, old: str, new: str) -> str:
    """Tags naming `old` (as written, spaces around it ignored) name `new` instead."""
    def edit(body):
        name, sep, rest = body.partition(":")
        return f"{new}{sep}{rest}" if name.strip() == old else None
    return _rewrite(prompt, edit)


def restore_prompt(params: dict, order: str, known: dict[str, str]) -> None:
    """Keep two-number tags meaning what they meant (order recorded in the infotext), and rename adapters whose
    hash matches a local file under another name (`known`: short hash → local name)."""
    prompt = params.get("Prompt")
    if not isinstance(prompt, str):
        return
    recorded = str(params.get(ORDER_KEY, "")).replace(" ", "")
    if recorded in tags.ORDERS and recorded != order:
        prompt = swap_positional(prompt)
    for name, value in parse_hashes(params.get(HASHES_KEY, "")):
        local = known.get(value.lower())
        if local and local != name:
            prompt = rename(prompt, name, local)
    params["Prompt"] = prompt
