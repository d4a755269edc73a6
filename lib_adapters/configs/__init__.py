"""Shipped diffusers-format configs (sd1, sd2, sdxl, demo) and CLIP tokenizers built without a model hub.

The real CLIP BPE vocabulary is not shipped here: it is read from a package that ships it (open_clip_torch's
`bpe_simple_vocab_16e6.txt.gz`, installable with `pip install --no-deps open_clip_torch`), from the file named by
$LIB_ADAPTERS_CLIP_BPE, or from a folder holding `vocab.json` + `merges.txt`. The demo uses a byte-level tokenizer.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

from ..errors import AdapterError

CONFIG_ROOT = Path(__file__).parent
FAMILIES = ("sd1", "sd2", "sdxl")
BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
BPE_ENV = "LIB_ADAPTERS_CLIP_BPE"
START, END = "<|startoftext|>", "<|endoftext|>"
# How many merges CLIP uses from the file (OpenAI's tokenizer and transformers' CLIPTokenizer agree).
N_MERGES = 49152 - 256 - 2


def config_dir(family: str) -> Path:
    """The diffusers model folder (model_index.json + component configs) for a family or "demo"."""
    path = CONFIG_ROOT / family
    if not path.is_dir():
        raise AdapterError(None, f"no shipped config for model family {family!r} (known: {', '.join(FAMILIES)}, demo)")
    return path


def load_config(family: str, component: str) -> dict:
    folder = config_dir(family) / component
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((folder / name).read_text())


def byte_symbols() -> list[str]:
    """CLIP's printable stand-ins for the 256 byte values, in vocabulary order (GPT-2's byte-to-unicode table:
    the printable bytes as themselves first, then the others as chr(256 + n))."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


def find_clip_bpe() -> Path | None:
    """Where a CLIP BPE vocabulary lies on this machine, without importing the package that ships it."""
    env = os.environ.get(BPE_ENV)
    if env:
        return Path(env)
    for package in ("open_clip", "clip"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = Path(folder) / BPE_NAME
            if path.is_file():
                return path
    return None


def vocab_from_bpe(bpe_path: Path) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) as transformers' CLIPTokenizer files hold them, from OpenAI's gzip BPE list."""
    try:
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    except OSError as e:
        raise AdapterError(bpe_path, f"cannot read the CLIP BPE vocabulary: {e}") from None
    merges = lines[1 : N_MERGES + 1]
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [START, END]
    return {t: i for i, t in enumerate(tokens)}, merges


def _tokenizer_from_files(vocab: dict[str, int], merges: list[str], pad_token: str):
    from transformers import CLIPTokenizer

    folder = Path(tempfile.mkdtemp(prefix="lib_adapters_tok_"))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + ("\n" if merges else ""), encoding="utf-8")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token, model_max_length=77)
    return tok


@lru_cache(maxsize=4)
def clip_tokenizer(pad_token: str = END):
    """The real CLIP tokenizer (49408 tokens). SD1 and SDXL's first encoder pad with <|endoftext|>, SD2/SDXL-G with "!"."""
    bpe = find_clip_bpe()
    if bpe is None:
        raise AdapterError(
            None,
            f"the CLIP tokenizer vocabulary ({BPE_NAME}) was not found: install a package that ships it "
            f"without its dependencies (`pip install --no-deps open_clip_torch`) or set {BPE_ENV} to the file",
        )
    vocab, merges = vocab_from_bpe(bpe)
    return _tokenizer_from_files(vocab, merges, pad_token)


def tiny_tokenizer():
    """A byte-level CLIP tokenizer with no merges (514 tokens: bytes, bytes</w>, start, end) for the demo model."""
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [START, END]
    return _tokenizer_from_files({t: i for i, t in enumerate(tokens)}, [], END)


def folder_tokenizers(folder: str | os.PathLike) -> dict:
    """Tokenizers kept in a diffusers model folder (`tokenizer/`, `tokenizer_2/`: vocab.json + merges.txt or
    tokenizer.json)."""
    from transformers import CLIPTokenizer

    found = {}
    for name in ("tokenizer", "tokenizer_2"):
        if any((Path(folder) / name / f).is_file() for f in ("vocab.json", "tokenizer.json")):
            found[name] = CLIPTokenizer.from_pretrained(str(Path(folder) / name), local_files_only=True)
    return found


def family_tokenizers(family: str, folder: str | os.PathLike | None = None) -> dict:
    """The pipeline's tokenizer components for a family (those in `folder` first, when it has them)."""
    if folder is not None:
        found = folder_tokenizers(folder)
        if found:
            return found
    if family == "demo":
        return {"tokenizer": tiny_tokenizer()}
    if family == "sd1":
        return {"tokenizer": clip_tokenizer(END)}
    if family == "sd2":
        return {"tokenizer": clip_tokenizer("!")}
    if family == "sdxl":
        return {"tokenizer": clip_tokenizer(END), "tokenizer_2": clip_tokenizer("!")}
    raise AdapterError(None, f"no tokenizer for model family {family!r}")
