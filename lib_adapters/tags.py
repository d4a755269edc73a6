"""Prompt tags: `<lora:name:w>`, `<lora:name:w:w_clip>`, named `unet=`, `te=` (and the builtin's `dyn=`).

A tag is found by a linear scan (`scan`): `<lora:` or `<lyco:` up to the next `>`, as the WebUI reads it. Its body
splits at `:` into the name and arguments, each positional or `key=value` with its raw text kept (`split_args`);
numbers are read strictly (`number`): decimal with optional sign, fraction and exponent, finite, as users write
them (`1`, `0.5`, `.5`, `-1e-1`); `nan`, `inf`, `1e309`, `1_0`, `0x10`, `1.5abc` are refused with the tag named.
`javascript/adapters.js` reads tags by the same rules.

One number sets both strengths; two numbers are UNet then text encoder (order "unet,te", ours) or text encoder
then UNet (order "te,unet", A1111's builtin). A named strength overrides only its own part.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .errors import AdapterError

TAG_START = re.compile(r"<(lora|lyco):")
NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
ORDERS = ("unet,te", "te,unet")


@dataclass(frozen=True)
class TagSpan:
    """Where one tag stands in a prompt: `text[start:end]` is `<kind:body>`."""

    start: int
    end: int
    kind: str
    body: str


@dataclass(frozen=True)
class Arg:
    """One argument after the name: `key` None for a positional one; `raw` as written (spaces kept)."""

    key: str | None
    value: str
    raw: str


def scan(text: str) -> list[TagSpan]:
    """Every `<lora:…>` / `<lyco:…>` in `text`, in order, in one linear pass (the body runs to the next `>`)."""
    out: list[TagSpan] = []
    pos = 0
    while True:
        m = TAG_START.search(text, pos)
        if m is None:
            return out
        end = text.find(">", m.end())
        if end < 0:  # no `>` after this start: none after any later start either
            return out
        out.append(TagSpan(m.start(), end + 1, m.group(1), text[m.end():end]))
        pos = end + 1


def split_args(body: str) -> tuple[str, list[Arg]]:
    """(name, arguments): the body split at `:`; an argument with `=` is named (key and value stripped)."""
    name, *items = body.split(":")
    args = []
    for raw in items:
        if "=" in raw:
            key, value = raw.split("=", 1)
            args.append(Arg(key.strip(), value.strip(), raw))
        elif raw.strip():
            args.append(Arg(None, raw.strip(), raw))
    return name.strip(), args


def number(text: str, tag: str, what: str = "strength") -> float:
    """A finite decimal number as users write it, or AdapterError naming the tag."""
    text = text.strip()
    if not NUMBER.fullmatch(text) or not math.isfinite(value := float(text)):
        raise AdapterError(None, f"malformed tag {tag}: {text!r} is not a number ({what})")
    return value


def untaggable(name: str) -> str:
    """Why `name` cannot be written in a WebUI tag ("" when it can): the WebUI ends a tag at `>`, splits its
    arguments at `:` and its name loses surrounding spaces."""
    if ":" in name:
        return "its name contains ':', where a tag's arguments begin"
    if ">" in name:
        return "its name contains '>', where a tag ends"
    if name != name.strip() or not name:
        return "its name begins or ends with a space"
    return ""


@dataclass
class AdapterTag:
    """One parsed tag: adapter name, UNet and text-encoder strengths, how many positional numbers it had."""

    name: str
    unet: float
    te: float
    positional: int = 0
    notices: list[str] = field(default_factory=list)
    text: str = ""


def strengths(items: list[str], order: str = "unet,te", default: float = 1.0, tag: str = "") -> tuple[float, float, int, list[str]]:
    """(unet, te, positional count, notices) from the tag's arguments after the name."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    tag = tag or "<lora:…:" + ":".join(items) + ">"
    positional: list[float] = []
    named: dict[str, float] = {}
    notices = []
    for arg in split_args(":" + ":".join(items))[1]:
        if arg.key is None:
            positional.append(number(arg.value, tag))
        elif arg.key == "dyn":
            notices.append(f"{tag}: dyn={arg.value} (rank truncation) is ignored; the full adapter is applied")
        elif arg.key in ("unet", "te"):
            named[arg.key] = number(arg.value, tag, f"{arg.key}=")
        else:
            raise AdapterError(None, f"malformed tag {tag}: unknown argument {arg.key!r} (use unet= or te=)")
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
    name = body.split(":", 1)[0].strip()
    text = f"<lora:{body}>"
    if not name:
        raise AdapterError(None, f"malformed tag {text}: no adapter name")
    unet, te, n, notices = strengths(body.split(":")[1:], order, default, text)
    return AdapterTag(name, unet, te, n, notices, text)


def parse_prompt(prompt: str, order: str = "unet,te", default: float = 1.0) -> tuple[str, list[AdapterTag]]:
    """(prompt with the tags removed, tags in prompt order)."""
    spans = scan(prompt)
    tags = [parse_tag(t.body, order, default) for t in spans]
    kept, pos = [], 0
    for t in spans:
        kept.append(prompt[pos:t.start])
        pos = t.end
    return ("".join(kept) + prompt[pos:]).strip(), tags


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
