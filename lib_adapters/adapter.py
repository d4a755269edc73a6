"""An adapter file as layers: file → keys grouped by module → one patch per module."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .algorithms import ALGORITHM_NAMES, LayerPatch, detect, incomplete, kind_name
from .errors import AdapterError, ShapeMismatch
from .files import Header, json_value, load_tensors, read_header
from .keys import group_keys, key_format
from .naming import DIT_FAMILIES
from .naming.families import detect_family
from .peft_config import apply_peft_config

SHOWN_METADATA_PREFIXES = ("ss_", "modelspec.", "sshs_", "ssmd_")
SHOWN_METADATA_KEYS = ("lora_adapter_metadata", "format")
BUNDLED_EMBEDDING_PREFIX = "bundle_emb."


@dataclass
class Adapter:
    """A loaded adapter: its layers (module key as in the file → patch), metadata and what could not be placed."""

    path: str
    metadata: dict[str, str]
    layers: dict[str, LayerPatch]
    unmatched: list[str] = field(default_factory=list)
    key_format: str = "unknown"
    family: str = "unknown"
    header: Header | None = None
    zero_layers: list[str] = field(default_factory=list)  # all-zero diffs (mixture/extracted files): no work

    @property
    def name(self) -> str:
        return Path(self.path).stem

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Adapter":
        """Read, detect and validate; raises AdapterError naming the file and the reason."""
        path = str(path)
        try:
            header, tensors = load_tensors(path, read_header(path))
            return cls.from_tensors(tensors, header.metadata, path, header)
        except AdapterError:
            raise
        except Exception as e:  # whatever a file holds, reading it fails only with an AdapterError for that file
            raise AdapterError(path, f"cannot be read as an adapter ({type(e).__name__}: {e})") from None

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                     path: str = "<memory>", header: Header | None = None) -> "Adapter":
        metadata = metadata or {}
        for name, t in tensors.items():
            # a float64 sum is NaN/Inf exactly when some element is (no finite adapter overflows it): 3-4× faster
            if t.is_floating_point() and not bool(torch.isfinite(t.sum(dtype=torch.float64))):
                raise AdapterError(path, f"tensor {name!r} contains NaN or Inf values")
        renames = {}
        for family in DIT_FAMILIES:
            if hasattr(family, "file_renames"):
                renames.update(family.file_renames(tensors))
        raw_keys = list(tensors)
        if renames:
            tensors = {renames.get(k, k): t for k, t in tensors.items()}
        groups, unmatched = group_keys(tensors)
        layers: dict[str, LayerPatch] = {}
        zero_layers = []
        for module, params in groups.items():
            try:
                patch, unused = detect(params)
            except ShapeMismatch as e:
                raise AdapterError(path, f"layer {module!r}: {e}") from None
            except (ValueError, RuntimeError, IndexError, TypeError) as e:  # malformed alpha, on_input, …
                raise AdapterError(path, f"layer {module!r}: malformed adapter tensors ({e})") from None
            if patch is None:
                broken = incomplete(params)
                if broken:
                    raise AdapterError(path, f"layer {module!r}: {broken}")
                unmatched.extend(f"{module}.{p}" for p in unused)
                continue
            if getattr(patch, "is_zero", False):
                zero_layers.append(module)
                continue
            layers[module] = patch
            unmatched.extend(f"{module}.{p}" for p in unused)
        if not layers and not zero_layers:
            what = "no tensors" if not tensors else f"{len(tensors)} tensors, none with a known adapter key signature"
            raise AdapterError(path, f"not an adapter: {what} (is it a checkpoint or an embedding?)")
        unmatched = sorted(k for k in unmatched if not k.startswith(BUNDLED_EMBEDDING_PREFIX))
        apply_peft_config(layers, metadata, path)
        family = detect_family({k: p.in_dim for k, p in layers.items()}, metadata)
        return cls(path, metadata, layers, unmatched, key_format(raw_keys), family, header, sorted(zero_layers))

    def algorithms(self) -> dict[str, int]:
        """Algorithm name → number of layers."""
        counts = Counter(kind_name(p) for p in self.layers.values())
        return {name: counts[name] for name in ALGORITHM_NAMES if counts[name]}

    def ranks(self) -> dict[str, int]:
        """Rank → number of layers with that rank."""
        counts = Counter(p.rank for p in self.layers.values() if p.rank is not None)
        return {str(r): n for r, n in sorted(counts.items())}

    def alphas(self) -> dict[str, int]:
        counts = Counter(p.alpha for p in self.layers.values() if p.alpha is not None)
        return {f"{a:g}": n for a, n in sorted(counts.items())}

    def shown_metadata(self) -> dict[str, object]:
        """The training metadata worth showing, JSON-valued entries parsed."""
        shown = {}
        for k, v in sorted(self.metadata.items()):
            if k.startswith(SHOWN_METADATA_PREFIXES) or k in SHOWN_METADATA_KEYS:
                if k == "modelspec.thumbnail":
                    v = f"<{len(v)} characters of image data>"
                elif isinstance(v, str) and v[:1] in "{[":
                    try:
                        v = json_value(v)
                    except ValueError:  # invalid, non-finite or nested too deeply: shown as the text it is
                        pass
                shown[k] = v
        return shown

    def summary(self) -> dict:
        """The `inspect --json` object (and what the adapter's family module tells about it, e.g. Flux split-qkv)."""
        ranks = self.ranks()
        notes = {}
        for family in DIT_FAMILIES:
            if family.NAME == self.family and hasattr(family, "describe"):
                notes.update(family.describe(self.layers))
        return {
            "file": self.path,
            "algorithms": self.algorithms(),
            "dora": any(p.dora for p in self.layers.values()),
            "family": self.family,
            "key_format": self.key_format,
            "layers": len(self.layers),
            "rank": {"min": min(map(int, ranks)), "max": max(map(int, ranks)), "counts": ranks} if ranks else None,
            "alpha": self.alphas() or None,
            "metadata": self.shown_metadata(),
            "unmatched": self.unmatched,
            "zero_layers": len(self.zero_layers),
            **notes,
        }
