"""Prompt tags: `<lora:name:w>`, `<lora:name:w:w_clip>`, named `unet=`, `te=` (and the builtin's `dyn=`).

One number sets both strengths; two numbers are UNet then text encoder (order "unet,te", ours) or text encoder
then UNet (order "te,unet", A1111's builtin). A named strength overrides only its own part.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .errors import AdapterError

TAG = re.compile(r"<(lora|lyco):([^>]*)>")
ORDERS = ("unet,te", "te,unet")


@dataclass
class AdapterTag:
    """One parsed tag: adapter name, UNet and text-encoder strengths, how many positional numbers it had."""

    name: str
    unet: float
    te: float
    positional: int = 0
    notices: list[str] = field(default_factory=list)
    text: str = ""


def _number(value: str, tag: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise AdapterError(None, f"malformed tag {tag}: {value!r} is not a number") from None


def strengths(items: list[str], order: str = "unet,te", default: float = 1.0, tag: str = "") -> tuple[float, float, int, list[str]]:
    """(unet, te, positional count, notices) from the tag's arguments after the name."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    tag = tag or "<lora:…:" + ":".join(items) + ">"
    positional: list[float] = []
    named: dict[str, float] = {}
    notices = []
    for item in items:
        item = item.strip()
        if "=" in item:
            key, value = (s.strip() for s in item.split("=", 1))
            if key == "dyn":
                notices.append(f"{tag}: dyn={value} (rank truncation) is ignored; the full adapter is applied")
                continue
            if key not in ("unet", "te"):
                raise AdapterError(None, f"malformed tag {tag}: unknown argument {key!r} (use unet= or te=)")
            named[key] = _number(value, tag)
        elif item:
            positional.append(_number(item, tag))
    if len(positional) > 2:
        raise AdapterError(None, f"malformed tag {tag}: at most two strengths (unet, te), got {len(positional)}")
    if not positional:
        unet = te = default
    elif len(positional) == 1:
        unet = te = positional[0]
    elif order == "unet,te":
        unet, te = positional
    else:
        te, unet = positional
    return named.get("unet", unet), named.get("te", te), len(positional), notices


def parse_tag(body: str, order: str = "unet,te", default: float = 1.0) -> AdapterTag:
    """`body` is what stands between `<lora:` and `>`."""
    parts = body.split(":")
    name = parts[0].strip()
    text = f"<lora:{body}>"
    if not name:
        raise AdapterError(None, f"malformed tag {text}: no adapter name")
    unet, te, n, notices = strengths(parts[1:], order, default, text)
    return AdapterTag(name, unet, te, n, notices, text)


def parse_prompt(prompt: str, order: str = "unet,te", default: float = 1.0) -> tuple[str, list[AdapterTag]]:
    """(prompt with the tags removed, tags in prompt order)."""
    tags = [parse_tag(m.group(2), order, default) for m in TAG.finditer(prompt)]
    return TAG.sub("", prompt).strip(), tags


def combine(tags: list[AdapterTag], resolve=str.lower) -> list[tuple[str, AdapterTag]]:
    """[(resolve(name), tag)]: tags resolving to the same adapter (pass an index's `find` to compare files, not
    spellings) become one with summed strengths, at the first one's position."""
    merged: dict[str, AdapterTag] = {}
    for t in tags:
        key = resolve(t.name)
        if key in merged:
            m = merged[key]
            merged[key] = AdapterTag(m.name, m.unet + t.unet, m.te + t.te, max(m.positional, t.positional),
                                     m.notices + t.notices, m.text)
        else:
            merged[key] = t
    return list(merged.items())
