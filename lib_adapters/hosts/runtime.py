"""One activation: prompt-tag arguments → files → adapters → one Plan, applied by the host's backend
(host-contract §2, §3, §10).

Every activate call reconciles the model to exactly the adapters of that call (the host's deactivate is not relied
on); the same file named twice in one prompt (by stem, alias or path) is one adapter with its strengths summed, at
its first position; an unknown or unusable adapter is left out with one message (gallery comments and console),
the image is made without it. How weights reach the model differs per host: `a1111.py` (in-place patching) and
`forge.py` (Forge's own ModelPatcher)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from ..adapter import Adapter
from ..errors import AdapterError
from ..patching import out_of_memory
from ..naming.blocks import parse_block_weights
from ..schedules import StepEntry, StepPlan, Strength
from ..tag_options import tag_options, te_notice
from . import infotext, steps
from .cache import AdapterCache
from .index import Library
from .presets import PresetCache
from .settings import OPT_SCHEDULES, OPT_WARN_UNMATCHED, log, opt, tag_order


@dataclass
class Wanted:
    """One adapter as the prompt asks for it in this pass: strengths (numbers or schedules), block weights as
    written (`lbw=`, `x=`), the tag as first written."""

    adapter: Adapter
    unet: Strength
    te: Strength
    lbw: str | None = None
    x: float = 1.0
    tag: str = ""


@dataclass
class Request:
    """What one activate call asks for, after names and files are resolved."""

    entries: list[Wanted] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)  # path → name as first written in the prompt
    messages: list[str] = field(default_factory=list)
    two_numbers: bool = False


def param_items(params) -> list:
    """The raw tag arguments: ExtraNetworkParams.items (name first), or a plain list in tests."""
    return list(getattr(params, "items", params))


class Runtime:
    """The state shared by the `lora` and `lyco` networks: library, cache, host backend, what is applied."""

    def __init__(self):
        self.library = Library()
        self.cache = AdapterCache()
        self.backend = None
        self.hashes = infotext.Hashes()
        self.last_stats: dict = {}
        self.last_plan_size = 0
        self.last_line = ""
        self.presets = PresetCache()
        self.lock = threading.RLock()
        self.stepping: steps.Stepping | None = None

    # backend ------------------------------------------------------------------------------------------------
    def get_backend(self):
        if self.backend is None:
            self.backend = make_backend()
        return self.backend

    # requests -----------------------------------------------------------------------------------------------
    def request(self, params_list, order: str, hires: bool = False) -> Request:
        """Tags → files → adapters. The same file twice with the same block weights is one adapter with its
        strengths summed (schedules too), at its first position."""
        req = Request()
        groups: dict[tuple, list] = {}
        for params in params_list:
            items = [str(x) for x in param_items(params)]
            if not items or not items[0].strip():
                req.messages.append("a tag without an adapter name is ignored")
                continue
            name = items[0].strip()
            tag = f"<lora:{':'.join(items)}>"
            try:
                options = tag_options(items[1:], order, 1.0, tag)
                req.messages.extend(options.notices)
                path = self.library.find(name)
            except AdapterError as e:
                req.messages.append(f"{name}: {e.reason}; the image is made without it")
                continue
            notice = te_notice(tag, options, hires)
            if notice:
                req.messages.append(notice)
            req.two_numbers |= options.positional == 2
            unet, te = options.strengths(hires)
            key = (path, options.lbw, options.x if options.lbw else None)
            if key in groups:
                groups[key][0] += unet
                groups[key][1] += te
            else:
                groups[key] = [unet, te, options.lbw, options.x, tag]
                req.names.setdefault(path, name)
        for (path, _, _), (unet, te, lbw, x, tag) in groups.items():
            if path not in req.names:
                continue
            try:
                adapter = self.cache.get(path, keep=len(groups))
            except AdapterError as e:
                req.messages.append(f"{req.names[path]}: {e}; the image is made without it")
                req.names.pop(path)
                continue
            req.entries.append(Wanted(adapter, unet, te, lbw, x, tag))
        return req

    def plan(self, req: Request, layer_map) -> StepPlan:
        """One step plan for every usable entry, in prompt order; an adapter that does not fit, or whose block
        weights do not fit the model, is left out with a message."""
        plan = StepPlan(layer_map=layer_map)
        warn = bool(opt(OPT_WARN_UNMATCHED))
        for wanted in list(req.entries):
            adapter = wanted.adapter
            name = req.names[adapter.path]
            try:
                blocks = None
                if wanted.lbw is not None:
                    blocks = parse_block_weights(wanted.lbw, layer_map.family, self.presets.get(), wanted.x,
                                                 wanted.tag)
                plan.add(StepEntry(adapter, wanted.unet, wanted.te, blocks))
            except AdapterError as e:
                req.messages.append(f"{name}: {e.reason}; the image is made without it")
                req.entries.remove(wanted)
                if not any(w.adapter.path == adapter.path for w in req.entries):
                    req.names.pop(adapter.path)
                continue
            missing = plan.unmatched.get(adapter.path, []) + list(adapter.unmatched)
            if warn and missing:
                shown = ", ".join(missing[:3]) + (" …" if len(missing) > 3 else "")
                req.messages.append(f"{name}: {len(missing)} keys match no layer of this model ({shown})")
        return plan

    def activate(self, p, params_list) -> None:
        with self.lock:  # the host runs one generation at a time; API threads never apply
            self._activate(p, params_list)

    def _activate(self, p, params_list) -> None:
        backend = self.get_backend()
        order = tag_order()
        req = self.request(params_list, order, bool(getattr(p, "is_hr_pass", False)))
        self.stepping = None
        try:
            plan = self.plan(req, backend.layer_map(p)) if req.entries else StepPlan()
            mode = steps.choose(plan, steps.expected_steps(p), backend.device(p), opt(OPT_SCHEDULES))
            merged, forward = steps.parts(plan, plan.values(0, 1), mode, backend.takes(p))
            stepping = steps.Stepping(plan, mode, backend, backend.model_of(p)) if mode != "fixed" else None
            self.last_stats = backend.apply(p, merged, forward, stepping.held() if stepping else frozenset())
            self.last_plan_size = len(merged) + len(forward)
            req.messages.extend(left_out_messages(req, self.last_stats.pop("left_out", [])))
            self.stepping = stepping
        except AdapterError as e:
            req.messages.append(f"{e}; no adapter is applied")
            req.entries.clear()
        except Exception as e:  # the backend put the model back at its originals: the image is made without adapters
            what = "out of memory" if out_of_memory(e) else f"{type(e).__name__}: {e}"
            req.messages.append(f"error: applying the adapters failed ({what}); no adapter is applied")
            req.entries.clear()
        infotext.write(p, req, order, self.hashes)
        self.report(p, req.messages)
        self.log_applied(req)

    def on_cfg_denoiser(self, params) -> None:
        """The host's per-call sampler callback: scheduled strengths move to their value at this step."""
        if self.stepping is not None and not self.stepping.step(params):
            self.stepping = None

    def log_applied(self, req: Request) -> None:
        """One console line whenever the applied set changes (not at every batch)."""
        if req.entries:
            names = ", ".join(f"{req.names[w.adapter.path]} (unet {_shown(w.unet)}, te {_shown(w.te)}"
                              f"{', lbw=' + w.lbw if w.lbw else ''})" for w in req.entries)
            line = f"applied {names}: {self.last_plan_size} weights"
        else:
            line = "no adapters applied"
        if line != self.last_line and (req.entries or self.last_line):
            log(line)
        self.last_line = line

    def known_hashes(self) -> dict[str, str]:
        """short hash → local name, for hashes already computed or stored in metadata."""
        return self.hashes.known(self.library)

    @staticmethod
    def report(p, messages: list[str]) -> None:
        """Each message once per generation, in the UI's comments under the gallery and on the console."""
        shown = getattr(p, "adapters_reported", None)
        if shown is None:
            shown = set()
            try:
                p.adapters_reported = shown
            except AttributeError:
                pass
        for message in messages:
            if message in shown:
                continue
            shown.add(message)
            log(message)
            if hasattr(p, "comment"):
                p.comment(f"Adapters: {message}")

    # lifecycle --------------------------------------------------------------------------------------------------
    def on_model_loaded(self, sd_model) -> None:
        with self.lock:
            if self.backend is not None:
                self.backend.forget(sd_model)

    def refresh(self) -> None:
        self.library.refresh()


def left_out_messages(req: Request, left_out: list[tuple[str, str]]) -> list[str]:
    """One line per adapter and reason for layers the backend could not patch (the rest of the adapter applies)."""
    counts: dict[tuple[str, str], int] = {}
    for path, reason in left_out:
        counts[(path, reason)] = counts.get((path, reason), 0) + 1
    return [f"{req.names.get(path, path)}: {n} layer{'s' if n > 1 else ''} left out: {reason}; the rest is applied"
            for (path, reason), n in counts.items()]


def _shown(strength) -> str:
    return f"{strength:g}" if isinstance(strength, (int, float)) else getattr(strength, "text", "") or "scheduled"


def make_backend():
    """A1111 or Forge, by what the host has (host-contract §7.3)."""
    import importlib.util

    try:
        forge = importlib.util.find_spec("backend.patcher.base") is not None
    except (ImportError, ValueError):
        forge = False
    if forge:
        from .forge import ForgeBackend
        return ForgeBackend()
    from .a1111 import A1111Backend
    return A1111Backend()


RUNTIME = Runtime()


def host_name() -> str:
    from .forge import ForgeBackend
    return "Forge" if isinstance(RUNTIME.get_backend(), ForgeBackend) else "A1111"
