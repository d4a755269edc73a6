"""One activation: prompt-tag arguments → files → adapters → one Plan, applied by the host's backend
(host-contract §2, §3, §10).

Every activate call reconciles the model to exactly the adapters of that call (the host's deactivate is not relied
on); the same file named twice in one prompt (by stem, alias or path) is one adapter with its strengths summed, at
its first position; an unknown or unusable adapter is left out with one message (gallery comments and console),
the image is made without it. How weights reach the model differs per host: `a1111.py` (in-place patching) and
`forge.py` (Forge's own ModelPatcher)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import tags
from ..adapter import Adapter
from ..errors import AdapterError
from ..naming import build_plan
from ..patching import Plan
from . import infotext
from .cache import AdapterCache
from .index import Library
from .settings import OPT_WARN_UNMATCHED, log, opt, tag_order


@dataclass
class Request:
    """What one activate call asks for, after names and files are resolved."""

    entries: list[tuple[Adapter, float, float]] = field(default_factory=list)
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

    # backend ------------------------------------------------------------------------------------------------
    def get_backend(self):
        if self.backend is None:
            self.backend = make_backend()
        return self.backend

    # requests -----------------------------------------------------------------------------------------------
    def request(self, params_list, order: str) -> Request:
        req = Request()
        strengths: dict[str, list[float]] = {}
        for params in params_list:
            items = [str(x) for x in param_items(params)]
            if not items or not items[0].strip():
                req.messages.append("a tag without an adapter name is ignored")
                continue
            name = items[0].strip()
            try:
                unet, te, positional, notices = tags.strengths(items[1:], order, 1.0, f"<lora:{':'.join(items)}>")
                req.messages.extend(notices)
                path = self.library.find(name)
            except AdapterError as e:
                req.messages.append(f"{name}: {e.reason}; the image is made without it")
                continue
            req.two_numbers |= positional == 2
            if path in strengths:  # the same file twice: one adapter, strengths summed
                strengths[path][0] += unet
                strengths[path][1] += te
            else:
                strengths[path] = [unet, te]
                req.names[path] = name
        for path, (unet, te) in strengths.items():
            try:
                adapter = self.cache.get(path, keep=len(strengths))
            except AdapterError as e:
                req.messages.append(f"{req.names[path]}: {e}; the image is made without it")
                req.names.pop(path)
                continue
            req.entries.append((adapter, unet, te))
        return req

    def plan(self, req: Request, layer_map) -> Plan:
        """One plan for every usable entry, in prompt order; an adapter that does not fit is left out."""
        plan: Plan = {}
        warn = bool(opt(OPT_WARN_UNMATCHED))
        for entry in list(req.entries):
            adapter = entry[0]
            name = req.names[adapter.path]
            try:
                part, unmatched = build_plan([entry], layer_map)
            except AdapterError as e:
                req.messages.append(f"{name}: {e.reason}; the image is made without it")
                req.entries.remove(entry)
                req.names.pop(adapter.path)
                continue
            for weight, ops in part.items():
                plan.setdefault(weight, []).extend(ops)
            missing = unmatched.get(adapter.path, []) + list(adapter.unmatched)
            if warn and missing:
                shown = ", ".join(missing[:3]) + (" …" if len(missing) > 3 else "")
                req.messages.append(f"{name}: {len(missing)} keys match no layer of this model ({shown})")
        return plan

    def activate(self, p, params_list) -> None:
        backend = self.get_backend()
        order = tag_order()
        req = self.request(params_list, order)
        try:
            plan = self.plan(req, backend.layer_map(p)) if req.entries else {}
            self.last_stats = backend.apply(p, plan)
            self.last_plan_size = len(plan)
            req.messages.extend(left_out_messages(req, self.last_stats.pop("left_out", [])))
        except AdapterError as e:
            req.messages.append(f"{e}; no adapter is applied")
            req.entries.clear()
        infotext.write(p, req, order, self.hashes)
        self.report(p, req.messages)
        self.log_applied(req)

    def log_applied(self, req: Request) -> None:
        """One console line whenever the applied set changes (not at every batch)."""
        if req.entries:
            names = ", ".join(f"{req.names[a.path]} (unet {u:g}, te {t:g})" for a, u, t in req.entries)
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
