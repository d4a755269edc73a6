"""A tag's arguments after the name, beyond two numbers: strengths that change over the steps (sd-webui-loractl:
`w@step,…` as a positional strength or in `unet=`/`te=`; `hr=`, `hrunet=`, `hrte=` for the hires pass) and block
weights (sd-webui-lora-block-weight: `lbw=` list or preset, `x=` for its X letters, `start=`/`stop=`/`step=a-b`).

One positional strength sets both parts; two are UNet then text encoder (order "unet,te") or the reverse
("te,unet"); a named strength overrides only its part; hires strengths default to the first pass's. `dyn=` is
ignored with a notice; `lbwe=` (per-element weights) is refused with a message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import AdapterError
from .schedules import Strength, Window, first, is_scheduled, number, parse_strength
from .tags import scan, split_args

ORDERS = ("unet,te", "te,unet")
NAMED = ("unet", "te", "hr", "hrunet", "hrte", "lbw", "x", "start", "stop", "step", "dyn", "lbwe")


@dataclass
class TagOptions:
    """What one tag asks for: strengths per part and pass (numbers or schedules), block weights as written."""

    unet: Strength
    te: Strength
    hr_unet: Strength
    hr_te: Strength
    lbw: str | None = None
    x: float = 1.0
    positional: int = 0
    notices: list[str] = field(default_factory=list)

    def strengths(self, hires: bool = False) -> tuple[Strength, Strength]:
        """(unet, te) of the first pass or of the hires pass."""
        return (self.hr_unet, self.hr_te) if hires else (self.unet, self.te)

    @property
    def scheduled(self) -> bool:
        return any(is_scheduled(s) for s in (self.unet, self.te, self.hr_unet, self.hr_te))


def _step(value: str, tag: str, key: str) -> int:
    n = number(value, tag, f"{key}= step")
    if n < 0 or n != int(n):
        raise AdapterError(None, f"malformed tag {tag}: {key}={value} is not a step number (0, 1, 2, …)")
    return int(n)


def tag_options(items: list[str], order: str = "unet,te", default: float = 1.0, tag: str = "") -> TagOptions:
    """Parse the arguments after the adapter name; AdapterError naming the tag on anything malformed."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, not {order!r}")
    tag = tag or "<lora:…:" + ":".join(items) + ">"
    positional: list[Strength] = []
    named: dict[str, str] = {}
    notices: list[str] = []
    for arg in split_args(":" + ":".join(items))[1]:
        if arg.key is None:
            positional.append(parse_strength(arg.value, tag))
        elif arg.key in NAMED:
            named[arg.key] = arg.value
        else:
            raise AdapterError(None, f"malformed tag {tag}: unknown argument {arg.key!r} (use unet=, te=, hr=, "
                                     f"hrunet=, hrte=, lbw=, x=, start=, stop= or step=)")
    if len(positional) > 2:
        raise AdapterError(None, f"malformed tag {tag}: at most two strengths (unet, te), got {len(positional)}")
    if "lbwe" in named:
        raise AdapterError(None, f"{tag}: lbwe= (per-element block weights) is not supported; use lbw=")
    if "dyn" in named:
        notices.append(f"{tag}: dyn={named['dyn']} (rank truncation) is ignored; the full adapter is applied")
    if not positional:
        unet = te = default
    elif len(positional) == 1:
        unet = te = positional[0]
    elif order == "unet,te":
        unet, te = positional
    else:
        te, unet = positional
    unet = parse_strength(named["unet"], tag) if "unet" in named else unet
    te = parse_strength(named["te"], tag) if "te" in named else te
    hires = parse_strength(named["hr"], tag) if "hr" in named else None
    hr_unet = parse_strength(named["hrunet"], tag) if "hrunet" in named else hires if hires is not None else unet
    hr_te = parse_strength(named["hrte"], tag) if "hrte" in named else hires if hires is not None else te
    start, stop = _window(named, tag)
    if start or stop is not None:
        unet, hr_unet = Window(unet, start, stop), Window(hr_unet, start, stop)
    x = number(named["x"], tag, "x=") if "x" in named else 1.0
    lbw = named.get("lbw")
    return TagOptions(unet, te, hr_unet, hr_te, lbw, x, len(positional), notices)


def _window(named: dict[str, str], tag: str) -> tuple[int, int | None]:
    start = _step(named["start"], tag, "start") if "start" in named else 0
    stop = _step(named["stop"], tag, "stop") if "stop" in named else None
    if "step" in named:
        low, sep, high = named["step"].partition("-")
        if not sep:
            raise AdapterError(None, f"malformed tag {tag}: step={named['step']} is not a range a-b")
        start, stop = _step(low, tag, "step"), _step(high, tag, "step")
    if stop is not None and stop <= start:
        raise AdapterError(None, f"malformed tag {tag}: the adapter would act on no step (start {start}, stop {stop})")
    return start, stop


def te_notice(tag: str, options: TagOptions, hires: bool = False) -> str | None:
    """The one message a text-encoder schedule gets: the encoder runs once, before sampling."""
    te = options.strengths(hires)[1]
    if not is_scheduled(te):
        return None
    return f"{tag}: the text encoder runs once, before sampling: its scheduled strength is taken at the first step " \
           f"({first(te):g})"


@dataclass
class PromptAdapter:
    """One adapter a prompt names, outside the WebUI: its file, strengths, block weights as written, first tag."""

    path: str
    unet: Strength
    te: Strength
    lbw: str | None
    x: float
    tag: str


def prompt_adapters(prompt: str, find, order: str = "unet,te", default: float = 1.0,
                    schedules: str | None = None) -> tuple[str, list[PromptAdapter]]:
    """(prompt without its tags, the adapters it names in prompt order): names resolved by `find`; the same file
    with the same block weights is one adapter with its strengths summed. `schedules`: where a schedule has no
    meaning (e.g. "merge"), refused there with a message naming the tag."""
    found: dict[tuple, PromptAdapter] = {}
    kept, pos = [], 0
    for span in scan(prompt):
        kept.append(prompt[pos:span.start])
        pos = span.end
        tag = f"<lora:{span.body}>"
        name, *items = span.body.split(":")
        if not name.strip():
            raise AdapterError(None, f"malformed tag {tag}: no adapter name")
        options = tag_options(items, order, default, tag)
        if schedules and options.scheduled:
            raise AdapterError(None, f"{tag}: a schedule changes the strength between sampling steps, which has no "
                                     f"meaning in {schedules}; give one strength")
        path = str(find(name.strip()))
        key = (path, options.lbw, options.x if options.lbw else None)
        if key in found:
            found[key].unet += options.unet
            found[key].te += options.te
        else:
            found[key] = PromptAdapter(path, options.unet, options.te, options.lbw, options.x, tag)
    return ("".join(kept) + prompt[pos:]).strip(), list(found.values())
