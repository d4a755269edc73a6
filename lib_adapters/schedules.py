"""Strengths that change over the sampling steps, in sd-webui-loractl's syntax: `w@step` pairs separated by `,` or
`;` (`~` for `@` too; a weight without a step means `w@1`), linear between points, constant outside.

A list whose steps are all ≤ 1 is fractional: 0 is the first step of the pass, 1 its last, step i of N (counted
from 0) sits at i/(N−1). Otherwise steps are step numbers counted from 1, as the progress bar counts them: step i
(from 0) sits at i+1, so `0@5,1@6` leaves the first five steps without the adapter. A schedule is evaluated at the
step being computed (sd-webui-loractl reads the host's step counter, which runs one to two steps late).

`StepPlan` turns scheduled entries into the plan of any step: built once at unit strength, re-scaled per step,
so a step costs only the weights whose strength changed.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import AdapterError
from .patching import Operation, Plan
from .tags import number  # one number grammar for every tag argument



@dataclass(frozen=True)
class Schedule:
    """A strength over the steps: (step, value) points sorted by step; fractional or step numbers."""

    points: tuple[tuple[float, float], ...]
    fractional: bool
    text: str = ""

    def position(self, index: int, steps: int) -> float:
        """Where step `index` (from 0) of a pass of `steps` steps sits on this schedule's axis."""
        if not self.fractional:
            return index + 1.0
        return index / (steps - 1) if steps > 1 else 0.0

    def at(self, index: int, steps: int) -> float:
        return interpolate(self.points, self.position(index, steps))

    def __add__(self, other):
        return Total((self, other))

    __radd__ = __add__


@dataclass(frozen=True)
class Total:
    """The sum of several strengths (the same adapter tagged more than once)."""

    terms: tuple

    def at(self, index: int, steps: int) -> float:
        return sum(value_at(t, index, steps) for t in self.terms)

    def __add__(self, other):
        return Total(self.terms + (other,))

    __radd__ = __add__


@dataclass(frozen=True)
class Window:
    """A strength that acts only from step `start` (counted from 0) up to, not including, step `stop`: the
    `start=`/`stop=`/`step=a-b` of sd-webui-lora-block-weight (`stop=10`: the first ten steps)."""

    strength: object
    start: int = 0
    stop: int | None = None

    def at(self, index: int, steps: int) -> float:
        inside = index >= self.start and (self.stop is None or index < self.stop)
        return value_at(self.strength, index, steps) if inside else 0.0

    def __add__(self, other):
        return Total((self, other))

    __radd__ = __add__


Strength = float | Schedule | Total | Window


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float:
    """Linear between points, the first/last value outside; at a step given twice, the later point holds."""
    steps = [s for s, _ in points]
    if x <= steps[0]:
        return points[0][1] if x < steps[0] else points[bisect.bisect_right(steps, x) - 1][1]
    if x >= steps[-1]:
        return points[-1][1]
    j = bisect.bisect_right(steps, x)
    (s0, v0), (s1, v1) = points[j - 1], points[j]
    if x == s0:
        return v0
    return v0 + (v1 - v0) * ((x - s0) / (s1 - s0))


def value_at(strength: Strength, index: int, steps: int) -> float:
    return float(strength) if isinstance(strength, (int, float)) else strength.at(index, steps)


def first(strength: Strength) -> float:
    """The value at a pass's first step (what a text encoder gets: it runs once, before sampling)."""
    return value_at(strength, 0, 1)


def is_scheduled(strength: Strength) -> bool:
    return not isinstance(strength, (int, float))


def parse_strength(text: str, tag: str = "") -> Strength:
    """A number, or a `w@step,…` schedule; AdapterError naming the tag on anything else."""
    tag = tag or text
    if not re.search(r"[@~,;]", text):
        return number(text, tag)
    points = []
    for item in re.split(r"[,;]", text):
        parts = re.split(r"[@~]", item)
        if not item.strip() or len(parts) > 2:
            what = f"entry {item.strip()!r}" if item.strip() else "an empty entry"
            raise AdapterError(None, f"malformed tag {tag}: {what} in schedule {text!r}; expected w@step,…")
        step = number(parts[1], tag, "schedule step") if len(parts) == 2 else 1.0
        points.append((step, number(parts[0], tag, "schedule weight")))
    points.sort(key=lambda p: p[0])
    if points[0][0] < 0:
        raise AdapterError(None, f"malformed tag {tag}: schedule {text!r} has a negative step")
    if len({v for _, v in points}) == 1:
        return points[0][1]  # one value throughout: a plain strength (applied exactly as one)
    return Schedule(tuple(points), all(s <= 1 for s, _ in points), text.strip())


# ---- plans over the steps ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StepEntry:
    """One adapter with strengths that may change per step (`blocks`: optional per-layer multiplier)."""

    adapter: object
    unet: Strength
    te: Strength
    blocks: object = None


class StepPlan:
    """The plan of each step for entries whose strengths may change: unit-strength operations, scaled by the step's
    values. The text encoder's strength is its value at the first step throughout (it runs once, before sampling).
    """

    def __init__(self, entries: Sequence[StepEntry] = (), layer_map=None):
        self.layer_map = layer_map
        self.entries: list[StepEntry] = []
        self.by_weight: dict[str, list[tuple[int, Operation]]] = {}
        self.unmatched: dict[str, list[str]] = {}
        self.te_values: list[float] = []
        for e in entries:
            self.add(e)

    def add(self, entry: StepEntry) -> None:
        """Add one entry (AdapterError for an adapter that does not fit the model; then nothing is added)."""
        from .naming import build_plan

        unit, unmatched = build_plan([(entry.adapter, 1.0, 1.0, entry.blocks)], self.layer_map)
        i = len(self.entries)
        self.entries.append(entry)
        self.te_values.append(first(entry.te))
        self.unmatched.update(unmatched)
        for weight, ops in unit.items():
            self.by_weight.setdefault(weight, []).extend((i, op) for op in ops)

    @property
    def scheduled(self) -> bool:
        """Whether any UNet strength can change between steps."""
        return any(is_scheduled(e.unet) for e in self.entries)

    @functools.cached_property
    def scheduled_weights(self) -> frozenset[str]:
        """The weights an operation with a changing strength lands on (read once all entries are added)."""
        return frozenset(w for w, items in self.by_weight.items()
                         if any(op.target.component == "unet" and is_scheduled(self.entries[i].unet) for i, op in items))

    def values(self, index: int, steps: int) -> list[tuple[float, float]]:
        """(unet, te) of each entry at one step."""
        return [(value_at(e.unet, index, steps), te) for e, te in zip(self.entries, self.te_values)]

    def plan(self, values: list[tuple[float, float]], keep_zero=frozenset()) -> Plan:
        """The plan at given (unet, te) values per entry. Zero strengths are left out (their layers untouched),
        except for the entries in `keep_zero` (a forward path keeps their terms at strength 0)."""
        plan: Plan = {}
        for weight, items in self.by_weight.items():
            ops = []
            for i, op in items:
                s = values[i][0] if op.target.component == "unet" else values[i][1]
                if s or i in keep_zero:
                    ops.append(op if op.strength == 1.0 and s == 1.0 else dataclasses.replace(op, strength=op.strength * s))
            if ops:
                plan[weight] = ops
        return plan

    def plan_at(self, index: int, steps: int) -> Plan:
        return self.plan(self.values(index, steps))
