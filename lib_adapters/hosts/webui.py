"""WebUI glue shared by A1111 1.10 and Forge: settings, adapter names, the parsed-adapter cache, prompt-tag
arguments, infotext, the REST routes and the `lora`/`lyco` extra network (host-contract §2, §3, §8, §9, §10).

Host modules (`modules.*`) are imported inside functions, never at import time, so this file imports without a
host. How weights reach the model differs per host and lives in `a1111.py` (in-place patching) and `forge.py`
(Forge's own ModelPatcher); both take a Plan built here with `naming.build_plan`.

Behaviour: every activate call reconciles the model to exactly the adapters of that call (the host's deactivate
is not relied on); the same file named twice in one prompt (by stem, alias or path) is one adapter with its
strengths summed, at its first position; `<lyco:…>` is an alias of the same network; an unknown or unusable
adapter is left out with one message (gallery comments and console), the image is made without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
from collections import OrderedDict
from dataclasses import dataclass, field

from .. import tags
from ..adapter import Adapter
from ..errors import AdapterError
from ..files import read_header
from ..library import AdapterIndex
from ..naming import build_plan
from ..patching import Plan

LOG_PREFIX = "[Adapters]"
TAG_NAMES = ("lora", "lyco")
BUILTIN_LORA_EXTENSIONS = ("Lora", "sd_forge_lora")
HASHES_KEY = "Lora hashes"
ORDER_KEY = "Adapter strength order"
SECTION = ("adapters", "Adapters", "sd")

OPT_ORDER = "adapters_tag_order"
OPT_CACHE = "adapters_cache_size"
OPT_HASHES = "adapters_add_hashes_to_infotext"
OPT_WARN_UNMATCHED = "adapters_warn_unmatched"
DEFAULTS = {OPT_ORDER: "unet,te", OPT_CACHE: 8, OPT_HASHES: True, OPT_WARN_UNMATCHED: True}


def log(message: str) -> None:
    print(f"{LOG_PREFIX} {message}", file=sys.stderr if message.startswith("error") else sys.stdout, flush=True)


# ---- settings ---------------------------------------------------------------------------------------------------

def register_settings() -> None:
    """Add our options to the host's templates at import time (as the builtin does), so --nowebui has them too."""
    from modules import shared

    try:
        import gradio as gr
    except ImportError:  # tests, or a host without gradio: the options still exist, only their widgets differ
        gr = None
    if not hasattr(gr, "Radio"):
        gr = None
    info = shared.OptionInfo
    options = {
        OPT_ORDER: info(DEFAULTS[OPT_ORDER], "Two numbers in <lora:name:a:b> mean", gr.Radio if gr else None,
                        {"choices": list(tags.ORDERS)}).info(
            "unet,te: a = UNet, b = text encoder (this extension's default); te,unet: the builtin Lora's order"),
        OPT_CACHE: info(DEFAULTS[OPT_CACHE], "Parsed adapters kept in memory", gr.Slider if gr else None,
                        {"minimum": 0, "maximum": 64, "step": 1}).info(
            "re-selecting a cached adapter does not read its file again; a changed file is re-read"),
        OPT_HASHES: info(DEFAULTS[OPT_HASHES], "Add adapter hashes to infotext (\"Lora hashes\")"),
        OPT_WARN_UNMATCHED: info(DEFAULTS[OPT_WARN_UNMATCHED],
                                 "Warn when an adapter has keys that match no layer of the model"),
    }
    shared.options_templates.update(shared.options_section(SECTION, options))
    for key, option in options.items():  # options_templates is opts.data_labels in the host; keep data in step
        if key not in shared.opts.data_labels:
            shared.opts.add_option(key, option)
        elif key not in shared.opts.data:
            shared.opts.data[key] = option.default


def opt(key: str):
    """An option's value, falling back to our default where the host has none (no settings yet)."""
    try:
        from modules import shared
        value = getattr(shared.opts, key)
    except (ImportError, AttributeError):
        return DEFAULTS[key]
    return DEFAULTS[key] if value is None else value


def tag_order() -> str:
    order = str(opt(OPT_ORDER)).replace(" ", "")
    return order if order in tags.ORDERS else DEFAULTS[OPT_ORDER]


# ---- parsed-adapter cache ----------------------------------------------------------------------------------------

class AdapterCache:
    """Bounded LRU of loaded adapters keyed by (path, mtime, size): a changed file is read again."""

    def __init__(self, size_option=lambda: opt(OPT_CACHE)):
        self.size_option = size_option
        self.entries: OrderedDict[tuple, Adapter] = OrderedDict()
        self.reads = 0

    @staticmethod
    def key(path: str) -> tuple:
        st = os.stat(path)
        return os.path.abspath(path), st.st_mtime_ns, st.st_size

    def get(self, path: str, keep: int = 0) -> Adapter:
        """The adapter at `path`; `keep` adapters in use now stay cached even above the size setting."""
        try:
            key = self.key(path)
        except OSError as e:
            raise AdapterError(path, f"cannot be read: {e.strerror or e}") from None
        if key in self.entries:
            self.entries.move_to_end(key)
            self.trim(keep)
            return self.entries[key]
        adapter = Adapter.load(path)
        self.reads += 1
        for old in [k for k in self.entries if k[0] == key[0]]:  # an older version of the same file
            del self.entries[old]
        self.entries[key] = adapter
        self.trim(keep)
        return adapter

    def trim(self, keep: int = 0) -> None:
        limit = max(int(self.size_option() or 0), keep)
        while len(self.entries) > limit:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()


# ---- names ------------------------------------------------------------------------------------------------------

def adapter_dirs() -> list[str]:
    """`--lora-dir` (defined by the builtin's preload, even when it is disabled) and A1111's LyCORIS folder."""
    from modules import paths, shared

    dirs = [getattr(shared.cmd_opts, "lora_dir", None) or os.path.join(paths.models_path, "Lora"),
            getattr(shared.cmd_opts, "lyco_dir_backcompat", None)]
    out: list[str] = []
    for d in dirs:
        if d and os.path.abspath(d) not in out:
            out.append(os.path.abspath(d))
    return out


def read_metadata(path: str) -> dict:
    """A safetensors file's `__metadata__` (strings), {} for anything unreadable."""
    try:
        return read_header(path).metadata
    except AdapterError:
        return {}


class Library:
    """Adapter files by name like the builtin: stem, sub-folder path, metadata alias (`ss_output_name`) when it
    is unique, case-insensitive when unique. A missing name triggers one rescan."""

    def __init__(self, dirs=None):
        self._dirs = dirs
        self.index: AdapterIndex | None = None
        self.meta: dict[str, tuple[tuple, dict]] = {}

    def dirs(self) -> list[str]:
        return list(self._dirs) if self._dirs is not None else adapter_dirs()

    def refresh(self) -> None:
        self.index = AdapterIndex(self.dirs())
        stems = {p.stem.lower() for p in self.index.paths}
        seen: dict[str, list[str]] = {}
        for p in self.index.paths:
            alias = self.metadata(str(p)).get("ss_output_name", "").strip()
            if alias and alias.lower() != p.stem.lower():
                seen.setdefault(alias.lower(), []).append(str(p))
        for p in self.index.paths:
            alias = self.metadata(str(p)).get("ss_output_name", "").strip()
            key = alias.lower()
            if alias and len(seen.get(key, ())) == 1 and key not in stems and key != "none":
                self.index.add_alias(alias, p)

    def metadata(self, path: str) -> dict:
        """Header metadata, cached by mtime and size."""
        try:
            st = os.stat(path)
        except OSError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self.meta.get(path)
        if cached and cached[0] == stamp:
            return cached[1]
        meta = read_metadata(path) if path.lower().endswith(".safetensors") else {}
        self.meta[path] = (stamp, meta)
        return meta

    def alias(self, path: str) -> str:
        """The name the builtin would show: the metadata alias when it is usable, else the stem."""
        alias = self.index.alias_of(path) if self.index is not None else None
        return alias or os.path.splitext(os.path.basename(path))[0]

    def find(self, name: str) -> str:
        if self.index is None:
            self.refresh()
        try:
            return self.index.find(name)
        except AdapterError:
            self.refresh()
            return self.index.find(name)

    def paths(self) -> list[str]:
        if self.index is None:
            self.refresh()
        return [str(p) for p in self.index.paths]


# ---- hashes and infotext -----------------------------------------------------------------------------------------

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


def infotext_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")


def parse_hashes(text: str) -> list[tuple[str, str]]:
    """`"a: 0123456789ab, b: …"` → [(a, hash), …]."""
    pairs = []
    for part in (text or "").strip('"').split(","):
        name, sep, value = part.rpartition(":")
        if sep and name.strip():
            pairs.append((name.strip(), value.strip()))
    return pairs


_TWO_NUMBERS = re.compile(r"<(lora|lyco):([^:>]+):([-+0-9.eE]+):([-+0-9.eE]+)>")


def swap_positional(prompt: str) -> str:
    """Swap the two positional strengths of every `<lora:name:a:b>`: moves a tag between the two orders."""
    return _TWO_NUMBERS.sub(lambda m: f"<{m.group(1)}:{m.group(2)}:{m.group(4)}:{m.group(3)}>", prompt)


def on_infotext_pasted(infotext: str, params: dict) -> None:
    """Keep two-number tags meaning what they meant (order recorded in the infotext), and rename adapters whose
    hash matches a local file under another name (only hashes already known, never hashing the library)."""
    prompt = params.get("Prompt")
    if not isinstance(prompt, str):
        return
    recorded = str(params.get(ORDER_KEY, "")).replace(" ", "")
    if recorded in tags.ORDERS and recorded != tag_order():
        prompt = swap_positional(prompt)
    known = RUNTIME.known_hashes()
    for name, value in parse_hashes(params.get(HASHES_KEY, "")):
        local = known.get(value.lower())
        if local and local != name:
            prompt = re.sub(rf"<(lora|lyco):{re.escape(name)}:", lambda m: f"<{m.group(1)}:{local}:", prompt)
    params["Prompt"] = prompt


# ---- one activation ----------------------------------------------------------------------------------------------

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
        self.hashes: dict[str, tuple[tuple, str]] = {}
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
        except AdapterError as e:
            req.messages.append(f"{e}; no adapter is applied")
            req.entries.clear()
        self.write_infotext(p, req, order)
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

    def write_infotext(self, p, req: Request, order: str) -> None:
        params = getattr(p, "extra_generation_params", None)
        if params is None:
            return
        if opt(OPT_HASHES):
            found = dict(getattr(p, "adapters_hashes", {}) or {}) if getattr(p, "is_hr_pass", False) else {}
            for adapter, _, _ in req.entries:
                name = infotext_name(req.names[adapter.path])
                try:
                    value = self.hash_of(adapter.path, adapter.metadata)
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

    def hash_of(self, path: str, metadata: dict) -> str:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
        cached = self.hashes.get(path)
        if cached and cached[0] == stamp:
            return cached[1]
        value = short_hash(path, metadata)
        self.hashes[path] = (stamp, value)
        return value

    def known_hashes(self) -> dict[str, str]:
        """short hash → local name, for hashes already computed or stored in metadata."""
        out = {}
        for path, (_, value) in self.hashes.items():
            out[value.lower()] = self.library.alias(path)
        for path, (_, meta) in self.library.meta.items():
            if meta.get("sshs_model_hash"):
                out[meta["sshs_model_hash"][:12].lower()] = self.library.alias(path)
        return out

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


RUNTIME = Runtime()


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


def host_name() -> str:
    from .forge import ForgeBackend
    return "Forge" if isinstance(RUNTIME.get_backend(), ForgeBackend) else "A1111"


# ---- the extra network ---------------------------------------------------------------------------------------------

def make_network(name: str = "lora"):
    """An ExtraNetwork subclass instance for the host in use, backed by the shared RUNTIME."""
    from modules import extra_networks

    class AdapterNetwork(extra_networks.ExtraNetwork):
        """`<lora:name:w:w_clip>`: every call reconciles the model to exactly the adapters asked for."""

        def activate(self, p, params_list):
            RUNTIME.activate(p, params_list)

        def deactivate(self, p):
            # The host does not always call this (host-contract §2.3); the next activate reconciles instead.
            pass

    return AdapterNetwork(name)


def builtin_enabled() -> str | None:
    """The name of the host's own LoRA extension when it is enabled."""
    try:
        from modules import extensions
    except ImportError:
        return None
    for e in getattr(extensions, "extensions", []):
        if e.name in BUILTIN_LORA_EXTENSIONS and e.enabled:
            return e.name
    return None


NETWORK = None


def take_over() -> bool:
    """Make `lora` (and the `lyco` alias) ours in the host's registry; True when something else held it."""
    global NETWORK
    from modules import extra_networks

    if NETWORK is None or not isinstance(NETWORK, extra_networks.ExtraNetwork):  # new host modules (tests)
        NETWORK = make_network("lora")
    replaced = extra_networks.extra_network_registry.get("lora") not in (None, NETWORK)
    extra_networks.register_extra_network(NETWORK)
    extra_networks.register_extra_network_alias(NETWORK, "lyco")
    return replaced


def on_before_ui() -> None:
    """Register `lora`/`lyco`. The host runs before_ui callbacks in reverse registration order, so an enabled
    builtin registers its own `lora` after this; `on_app_started` takes it over again before any generation."""
    take_over()
    builtin = builtin_enabled()
    if builtin:
        log(f"<lora:…>/<lyco:…> tags are applied by sd-webui-adapters on {host_name()}. The builtin '{builtin}' "
            f"extension is enabled too: its tag handler is replaced, so every adapter is applied once (by us). "
            f"Disable '{builtin}' to remove its duplicate page and API routes.")
    else:
        log(f"<lora:…>/<lyco:…> tags are applied by sd-webui-adapters on {host_name()} "
            f"(two numbers mean {tag_order().replace(',', ', ')}).")


# ---- REST API ----------------------------------------------------------------------------------------------------

def _http_error(status: int, detail: str):
    try:
        from fastapi import HTTPException
    except ImportError:
        return LookupError(detail)
    return HTTPException(status_code=status, detail=detail)


def list_items() -> list[dict]:
    """The builtin's /sdapi/v1/loras items (name, alias, path, metadata) plus type, rank and family."""
    from .. import cards

    RUNTIME.library.refresh()
    out = []
    for path in RUNTIME.library.paths():
        item = {"name": os.path.splitext(os.path.basename(path))[0], "alias": RUNTIME.library.alias(path),
                "path": path, "metadata": {}, "type": None, "rank": None, "family": "unknown"}
        meta = RUNTIME.library.metadata(path)
        item["metadata"] = {k: (_json_or_text(v)) for k, v in meta.items()}
        try:
            card = cards.read_card(path)
            item.update(type=card.type_label, rank=card.rank, family=card.family)
        except (AdapterError, OSError) as e:
            item["error"] = str(e)
        out.append(item)
    return out


def _json_or_text(v):
    if isinstance(v, str) and v[:1] == "{":
        try:
            return json.loads(v)
        except ValueError:
            return v
    return v


def inspect(name: str) -> dict:
    try:
        path = RUNTIME.library.find(name)
        return RUNTIME.cache.get(path).summary()
    except AdapterError as e:
        raise _http_error(404, str(e)) from None


def on_app_started(demo, app) -> None:
    """Take `lora` over from a builtin that registered after us; add our routes (/sdapi/v1/loras and
    refresh-loras only when the builtin, which owns them, is disabled). Runs after before_ui, also on reloads."""
    if take_over():
        log("took over the <lora:…> tag from the builtin handler registered after ours")
    def get_loras():
        return list_items()

    def post_refresh():
        RUNTIME.refresh()
        return None

    def get_inspect(name: str):
        return inspect(name)

    if not builtin_enabled():
        app.get("/sdapi/v1/loras")(get_loras)
        app.post("/sdapi/v1/refresh-loras")(post_refresh)
    app.get("/sdapi/v1/adapters")(get_loras)
    app.post("/sdapi/v1/adapters/refresh")(post_refresh)
    app.get("/sdapi/v1/adapters/inspect")(get_inspect)


def on_model_loaded(sd_model) -> None:
    RUNTIME.on_model_loaded(sd_model)


def on_script_unloaded() -> None:
    """Reload UI: nothing global is patched; the model keeps its adapters until the next activate."""


def register(script_callbacks) -> None:
    """Everything the entry script registers with the host, in one call."""
    register_settings()
    script_callbacks.on_before_ui(on_before_ui, name="adapters_before_ui")
    script_callbacks.on_model_loaded(on_model_loaded, name="adapters_model_loaded")
    script_callbacks.on_infotext_pasted(on_infotext_pasted, name="adapters_infotext_pasted")
    script_callbacks.on_app_started(on_app_started, name="adapters_app_started")
    script_callbacks.on_script_unloaded(on_script_unloaded, name="adapters_script_unloaded")
