"""What the extra-networks panel shows for one adapter file, read from its header alone (never its tensor data).

Layer types, ranks and the base family come from running key grouping and detection on meta tensors built from the
header's shapes; training facts come from the kohya/modelspec metadata; the user's own fields from `<stem>.json`.
Results are cached by (size, mtime) so a refresh of thousands of files only stats them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .algorithms import detect, incomplete, kind_name
from .errors import AdapterError, ShapeMismatch
from .files import MAX_HEADER, Header, json_value, read_header
from .keys import group_keys
from .library import walk
from .naming.families import detect_family
from .peft_config import apply_peft_config

BADGES = {
    "lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "oft": "OFT", "boft": "BOFT",
    "ia3": "IA3", "glora": "GLoRA", "full": "full", "norm": "norm",
}
FAMILY_LABELS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux", "unknown": "Unknown"}
PREVIEW_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "gif")
# Parameters whose values (not shapes) a detector reads. The card needs none of their values: alpha/scale and the
# sparse residual are left out, `on_input` (IA3's signature) stands in as a small zero tensor.
VALUE_PARAMS = ("on_input",)
SKIPPED_PARAMS = ("alpha", "scale", "bias_indices", "bias_values", "bias_size")
DATA_URL = re.compile(r"^data:image/(png|jpe?g|webp|gif);base64,[A-Za-z0-9+/=\s]+$")
TOP_TAGS = 10
# User-metadata keys: the builtin's names, plus our two preferred strengths.
USER_KEYS = ("description", "activation text", "preferred weight", "negative text", "notes", "sd version")
UNET_KEY = "preferred unet weight"
TE_KEY = "preferred te weight"
LBW_KEY = "preferred lbw"            # block weights as in `lbw=` (a preset name or a list)
SCHEDULE_KEY = "preferred schedule"  # a UNet schedule as in `unet=` (`w@step,…`)


@dataclass
class Training:
    """Facts about how the adapter was trained, from kohya `ss_*` and `modelspec.*` metadata."""

    base_model: str = ""
    resolution: str = ""
    epochs: str = ""
    steps: str = ""
    network_dim: str = ""
    network_alpha: str = ""
    tags: list[tuple[str, int]] = field(default_factory=list)
    title: str = ""
    author: str = ""
    description: str = ""


@dataclass
class CardInfo:
    """Everything host-free the card needs: type, rank, family, preview source and training facts."""

    path: str
    size: int
    mtime: float
    badge: str
    dora: bool
    rank: int | None  # the most common rank; OFT/BOFT: block size
    ranks: dict[int, int]
    algorithms: dict[str, int]
    family: str
    layers: int
    preview_file: str | None
    thumbnail: str | None  # a sanitised data: URL from modelspec.thumbnail
    training: Training
    metadata: dict[str, str]
    error: str = ""

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @property
    def family_label(self) -> str:
        return FAMILY_LABELS.get(self.family, "Unknown")

    @property
    def rank_label(self) -> str:
        """'rank 8', 'block 16' (OFT/BOFT) or ''."""
        if self.rank is None:
            return ""
        return f"{'block' if self.badge in ('OFT', 'BOFT') else 'rank'} {self.rank}"

    @property
    def type_label(self) -> str:
        """'LoRA', 'LoKr', … with '+DoRA' when any layer carries a magnitude vector."""
        return self.badge + ("+DoRA" if self.dora else "")


def meta_params(header: Header) -> dict[str, torch.Tensor]:
    """One tensor per header entry that shapes tell about: meta tensors of the stored shape, zeros where a value is read."""
    out = {}
    for key, entry in header.entries.items():
        param = key.rpartition(".")[2]
        if param in SKIPPED_PARAMS:
            continue
        if param in VALUE_PARAMS and len(entry.shape) <= 1 and sum(entry.shape) <= 1:
            out[key] = torch.zeros(entry.shape, dtype=torch.float32)
        else:
            out[key] = torch.empty(entry.shape, dtype=entry.dtype, device="meta")
    return out


def _detect_module(params: dict[str, torch.Tensor]) -> tuple | None:
    """(algorithm name, rank or block size, DoRA, input width) of one module's meta tensors, ("incomplete", why) for
    a broken adapter layer, None for a foreign key."""
    try:
        patch, _ = detect(params)
    except (ShapeMismatch, RuntimeError, ValueError, NotImplementedError):
        return None
    if patch is None:
        broken = incomplete(params)
        return ("incomplete", broken) if broken else None
    size = patch.rank if patch.rank is not None else getattr(patch, "block_size", None)
    return kind_name(patch), None if size is None else int(size), patch.dora, patch.in_dim


# Module signature (its params' names, shapes, dtypes) → what _detect_module says: the files of one trainer and rank
# repeat the same few signatures, so each is detected once per process.
_MODULES: dict[tuple, tuple | None] = {}
_UNSEEN = object()


def _modules(header: Header) -> dict[str, dict]:
    """Module → {param: header entry}, without the params whose values the card leaves out."""
    entries = {k: e for k, e in header.entries.items() if k.rpartition(".")[2] not in SKIPPED_PARAMS}
    return group_keys(entries)[0]


def _classify_table(header: Header) -> tuple[dict[str, int], Counter, bool, dict[str, int | None], str]:
    """classify() from the tensor table alone (shapes, dtypes, names): what files sharing a table share."""
    algorithms: Counter = Counter()
    ranks: Counter = Counter()
    dora = False
    in_dims: dict[str, int | None] = {}
    error = ""
    for module, params in _modules(header).items():
        signature = tuple(sorted((p, tuple(e.shape), e.dtype) for p, e in params.items()))
        found = _MODULES.get(signature, _UNSEEN)  # one lookup: another thread may clear the cache in between
        if found is _UNSEEN:
            found = _MODULES[signature] = _detect_module(meta_params(Header("", {}, params, 0, 0)))
        if found is None:
            continue
        if found[0] == "incomplete":
            error = error or f"layer {module!r}: {found[1]}"
            continue
        kind, size, is_dora, in_dim = found
        algorithms[kind] += 1
        if size is not None:
            ranks[size] += 1
        dora = dora or is_dora
        in_dims[module] = in_dim
    return dict(algorithms), ranks, dora, in_dims, error


def _peft_error(header: Header, metadata: dict[str, str]) -> str:
    """Why the PEFT config in the metadata cannot scale the layers (as Adapter.load requires), or ""."""
    if not metadata.get("lora_adapter_metadata"):
        return ""  # apply_peft_config has nothing to apply
    layers = {}
    for module, params in _modules(header).items():
        try:
            patch, _ = detect(meta_params(Header("", {}, params, 0, 0)))
        except (ShapeMismatch, RuntimeError, ValueError, NotImplementedError):
            continue
        if patch is not None:
            layers[module] = patch
    try:
        apply_peft_config(layers, metadata, header.path)
    except AdapterError as e:
        return e.reason
    return ""


def classify(header: Header, table: tuple | None = None) -> tuple[dict[str, int], Counter, bool, dict[str, int | None], str]:
    """(algorithm → layer count, rank (OFT/BOFT: block size) counts, any DoRA, module → input width, why the file
    cannot be applied or ""), from shapes; `table`: _classify_table's result for this header, when known."""
    algorithms, ranks, dora, in_dims, error = table or _classify_table(header)
    error = error or _peft_error(header, header.metadata)
    if not algorithms and not error:
        n = len(header.entries)
        error = "not an adapter: " + (f"{n} tensors, none with a known adapter key signature" if n else "no tensors")
    return algorithms, ranks, dora, in_dims, error


def badge_for(algorithms: dict[str, int]) -> str:
    """The card's type: the most common algorithm (norm patches only count alone); LoRA with conv layers is LoCon."""
    counts = {k: v for k, v in algorithms.items() if k != "norm"} or algorithms
    if not counts:
        return "?"
    if "locon" in counts and "lora" in counts:
        counts = {**counts, "locon": counts["locon"] + counts.pop("lora")}
    top = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
    return BADGES.get(top, top)


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def top_tags(metadata: dict[str, str], limit: int = TOP_TAGS) -> list[tuple[str, int]]:
    """The most frequent training tags over all dataset folders of `ss_tag_frequency`."""
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return []
    try:
        folders = json_value(raw)
    except (TypeError, ValueError):  # invalid, NaN/Infinity, or nested too deeply: no trigger words
        return []
    totals: Counter = Counter()
    if isinstance(folders, dict):
        for tags in folders.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, (int, float)) and str(tag).strip():
                        totals[str(tag).strip()] += int(n)
    return sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:limit]


def training_of(metadata: dict[str, str]) -> Training:
    """Training facts, empty strings where the metadata says nothing."""
    m = metadata
    resolution = _text(m.get("modelspec.resolution") or m.get("ss_resolution"))
    resolution = re.sub(r"^\((\d+),\s*(\d+)\)$", r"\1x\2", resolution)
    return Training(
        base_model=_text(m.get("ss_sd_model_name") or m.get("ss_base_model_version") or m.get("modelspec.architecture")),
        resolution=resolution,
        epochs=_text(m.get("ss_num_epochs") or m.get("ss_epoch")),
        steps=_text(m.get("ss_steps") or m.get("ss_max_train_steps")),
        network_dim=_text(m.get("ss_network_dim")),
        network_alpha=_text(m.get("ss_network_alpha")),
        tags=top_tags(m),
        title=_text(m.get("modelspec.title")),
        author=_text(m.get("modelspec.author")),
        description=_text(m.get("modelspec.description")),
    )


def thumbnail_of(metadata: dict[str, str]) -> str | None:
    """`modelspec.thumbnail` when it is a base64 image data URL, else None (never passes other text through)."""
    thumb = metadata.get("modelspec.thumbnail", "")
    return thumb if thumb and DATA_URL.match(thumb) else None


def find_preview_file(path: str, listing: set[str] | None = None) -> str | None:
    """`name.png`, `name.preview.png` (and the other image types) beside the file."""
    folder, stem = os.path.split(os.path.splitext(path)[0])
    names = listing if listing is not None else set(os.listdir(folder or "."))
    for ext in PREVIEW_EXTENSIONS:
        for candidate in (f"{stem}.{ext}", f"{stem}.preview.{ext}"):
            if candidate in names:
                return os.path.join(folder, candidate)
    return None


_CACHE: dict[str, tuple[int, float, CardInfo]] = {}
# (digest of a header's tensor table, data length) → (its header, _classify_table of it): a collection holds many
# files of one trainer and rank whose tables are byte for byte the same; only their metadata differs.
_TABLES: dict[tuple[bytes, int], tuple[Header, tuple]] = {}
_FAMILIES: dict[tuple, str] = {}
FAMILY_HINTS = ("ss_base_model_version", "modelspec.architecture", "ss_v2")  # the metadata detect_family reads
_JSON = json.JSONDecoder()


def _split_header(path: str, size: int) -> tuple[tuple[bytes, int], dict[str, str]] | None:
    """((digest of the header without its metadata, data length), the metadata) from the raw header; None when it
    is not a plain safetensors header with string metadata (read_header then decides and says why)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return None
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER:
            return None
        try:
            text = f.read(n).decode("utf-8")
        except UnicodeDecodeError:
            return None
    metadata: dict = {}
    at = text.find('"__metadata__"')
    if at >= 0:
        colon = text.find(":", at + 14)
        if text[:at].rstrip()[-1:] not in ("{", ",") or colon < 0 or text[at + 14:colon].strip():
            return None
        try:
            metadata, end = _JSON.raw_decode(text, len(text) - len(text[colon + 1:].lstrip()))
        except ValueError:
            return None
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            return None
        text = text[:at] + text[end:]
    return (hashlib.blake2b(text.encode("utf-8"), digest_size=20).digest(), size - 8 - n), metadata


def read_card(path: str | os.PathLike, listing: set[str] | None = None) -> CardInfo:
    """The card facts for one `.safetensors` file, from its header; cached by size and mtime."""
    path = os.path.abspath(str(path))
    st = os.stat(path)
    cached = _CACHE.get(path)
    if cached and cached[0] == st.st_size and cached[1] == st.st_mtime:
        card = cached[2]
        card.preview_file = find_preview_file(path, listing)
        return card
    try:
        split = _split_header(path, st.st_size)
        seen = _TABLES.get(split[0]) if split is not None else None
        if seen is not None:  # a table read and checked before: only the metadata is new
            known, table = seen
            header = Header(path, split[1], known.entries, known.data_start, known.file_size, st.st_mtime)
        else:
            header = read_header(path)
            table = _classify_table(header)
            if split is not None:
                _TABLES[split[0]] = (header, table)
        card = _card_of(header, path, st, listing, table, split[0] if split is not None else None)
    except AdapterError:
        raise
    except OSError as e:
        raise AdapterError(path, f"cannot be read: {e.strerror or e}") from None
    except Exception as e:  # whatever a file holds, reading it fails only with an AdapterError for that file
        raise AdapterError(path, f"cannot be read as an adapter ({type(e).__name__}: {e})") from None
    _CACHE[path] = (st.st_size, st.st_mtime, card)
    return card


def _card_of(header: Header, path: str, st: os.stat_result, listing: set[str] | None, table: tuple | None = None,
             table_key: tuple | None = None) -> CardInfo:
    algorithms, ranks, dora, in_dims, error = classify(header, table)
    family = "unknown"
    if in_dims:
        key = (table_key or path, tuple(header.metadata.get(k) for k in FAMILY_HINTS))
        family = _FAMILIES.get(key)
        if family is None:
            family = _FAMILIES[key] = detect_family(in_dims, header.metadata)
    rank = ranks.most_common(1)[0][0] if ranks else None
    return CardInfo(
        path=path, size=st.st_size, mtime=st.st_mtime,
        badge=badge_for(algorithms), dora=dora, rank=rank, ranks=dict(sorted(ranks.items())),
        algorithms=algorithms, family=family, layers=sum(algorithms.values()),
        preview_file=find_preview_file(path, listing), thumbnail=thumbnail_of(header.metadata),
        training=training_of(header.metadata), metadata=header.metadata, error=error,
    )


def error_card(error: AdapterError) -> CardInfo:
    """The card of a file that cannot be read: its name and the reason, nothing else."""
    return CardInfo(path=os.path.abspath(error.path or ""), size=0, mtime=0.0, badge="?", dora=False, rank=None,
                    ranks={}, algorithms={}, family="unknown", layers=0, preview_file=None, thumbnail=None,
                    training=Training(), metadata={}, error=error.reason)


def list_files(dirs: list[str]) -> list[str]:
    """Every `.safetensors` file under `dirs` (recursive; each real folder and file once, as `library.walk`)."""
    return [os.path.abspath(p) for p, _ in walk([d for d in dirs if d], (".safetensors",))]


def list_cards(dirs: list[str]) -> list[CardInfo | AdapterError]:
    """Cards for every file under `dirs`; an unreadable file gives its AdapterError in its place."""
    out: list[CardInfo | AdapterError] = []
    listings: dict[str, set[str]] = {}
    for path in list_files(dirs):
        folder = os.path.dirname(path)
        if folder not in listings:
            listings[folder] = set(os.listdir(folder))
        try:
            out.append(read_card(path, listings[folder]))
        except AdapterError as e:
            out.append(e)
        except OSError as e:
            out.append(AdapterError(path, f"cannot be read: {e.strerror or e}"))
        except Exception as e:  # never one file's problem for the whole listing
            out.append(AdapterError(path, f"cannot be read as an adapter ({type(e).__name__}: {e})"))
    return out


def clear_cache() -> None:
    """Forget every card and every table, module and family seen (the next listing parses every file again)."""
    for cache in (_CACHE, _TABLES, _MODULES, _FAMILIES):
        cache.clear()


# --- user metadata (`<stem>.json`, the builtin's sidecar) -------------------------------------------------------

def user_metadata_path(path: str) -> str:
    return os.path.splitext(path)[0] + ".json"


def read_user_metadata(path: str) -> dict:
    """The sidecar json as a dict; {} when absent or not a JSON object."""
    try:
        with open(user_metadata_path(path), encoding="utf8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_user_metadata(path: str, data: dict) -> None:
    """Write the sidecar atomically, in the builtin's layout (indent 4, UTF-8)."""
    target = user_metadata_path(path)
    tmp = f"{target}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf8") as f:
        json.dump(data, f, indent=4, ensure_ascii=False)
    os.replace(tmp, target)


def _strength(value, fallback: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return fallback
    return v if v == v and abs(v) != float("inf") else fallback


def preferred_strengths(user: dict, default: float = 1.0) -> tuple[float, float]:
    """(unet, te): our own keys first, then the builtin's `preferred weight` (0 there means the default)."""
    weight = _strength(user.get("preferred weight"), 0.0) or default
    unet = _strength(user.get(UNET_KEY), weight) if user.get(UNET_KEY) not in (None, "") else weight
    te = _strength(user.get(TE_KEY), weight) if user.get(TE_KEY) not in (None, "") else weight
    return unet, te


def format_strength(value: float) -> str:
    """A strength as the shortest decimal text: 1, 0.8, -0.25."""
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def preferred_extras(user: dict) -> tuple[str, str]:
    """(block weights, UNet schedule) the card's tag carries: `lbw=` and `unet=` text, "" when unset."""
    def text(key):
        value = user.get(key)
        return "".join(str(value).split()) if isinstance(value, (str, int, float)) and str(value).strip() else ""

    return text(LBW_KEY), text(SCHEDULE_KEY)


def tag_text(name: str, unet: float, te: float, order: str = "unet,te", lbw: str = "", schedule: str = "") -> str:
    """`<lora:name:w>` when both strengths agree, else `<lora:name:a:b>` in the tag order the host reads; then
    `:unet=<schedule>` and `:lbw=<block weights>` when the card has them."""
    extra = (f":unet={schedule}" if schedule else "") + (f":lbw={lbw}" if lbw else "")
    if unet == te:
        return f"<lora:{name}:{format_strength(unet)}{extra}>"
    first, second = (unet, te) if order == "unet,te" else (te, unet)
    return f"<lora:{name}:{format_strength(first)}:{format_strength(second)}{extra}>"
