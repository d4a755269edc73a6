"""Reading `.safetensors` files: header and metadata alone, or all tensors from one read of the file.

Headers are validated by the `safetensors` package itself; tensor data is read in one pass into one buffer (no
mmap: a file truncated while mapped would crash the process, and `merge` edits that buffer in place). Pickled files
(`.pt`, `.ckpt`, `.pth`, `.bin` zips or raw pickles) are refused, never unpickled.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open

from .errors import AdapterError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
MAX_ELEMENTS = 2**48  # a shape beyond this (zero dimensions aside) is corrupt, not a tensor
MAX_JSON_DEPTH = 32  # metadata JSON nested deeper is shown as text, never walked
PICKLE_SUFFIXES = {".pt", ".ckpt", ".pth", ".bin", ".pkl"}


class TensorEntry(NamedTuple):
    """Where one tensor lies in the data section, and what it is."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass
class Header:
    """The parsed JSON header of a safetensors file."""

    path: str
    metadata: dict[str, str]
    entries: dict[str, TensorEntry]
    data_start: int
    file_size: int
    mtime: float = 0.0
    extra: dict = field(default_factory=dict)


def _refuse_pickles(path: str, head: bytes, size: int) -> None:
    """Refuse torch.save zips and raw pickles by their content (and pickle suffixes), never by one byte alone.

    A safetensors file starts with its header length and then `{`; its first byte may well be 0x80 (a header of
    128 + 256k bytes), so that alone never marks a pickle.
    """
    if len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return
    zipped = head[:4] == b"PK\x03\x04"
    pickled = head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    if zipped or pickled or Path(path).suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterError(
            path,
            "is a pickled PyTorch file (.pt/.ckpt); only .safetensors files are loaded, "
            "because unpickling can run arbitrary code",
        )


def read_header(path: str | os.PathLike) -> Header:
    """Parse and validate a safetensors header without reading tensor data.

    The `safetensors` package validates the header (JSON, dtypes, shapes, every byte of the data section covered
    exactly once: no duplicate, overlapping or out-of-order offsets, no holes, no trailing bytes); tensor offsets
    follow from its order and the shapes."""
    path = str(path)
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            head = f.read(9)
            size = st.st_size
            _refuse_pickles(path, head, size)
            if len(head) < 8:
                raise AdapterError(path, f"truncated: the file has {size} bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", head[:8])
            if n > size - 8:
                raise AdapterError(path, f"truncated or not safetensors: header length {n} exceeds the file size {size}")
            if n > MAX_HEADER:
                raise AdapterError(path, f"not safetensors: header length {n} is implausibly large")
            f.seek(8)
            raw = f.read(n)
    except OSError as e:
        raise AdapterError(path, f"cannot be read: {e.strerror or e}") from None
    try:
        with safe_open(path, framework="pt") as f:
            names = f.offset_keys()
            metadata = f.metadata() or {}
            layout = [(s.get_dtype(), s.get_shape()) for s in map(f.get_slice, names)]
    except SafetensorError as e:
        raise AdapterError(path, _invalid_reason(raw, str(e), size)) from None
    except OSError as e:
        raise AdapterError(path, f"cannot be read: {e.strerror or e}") from None
    except Exception as e:
        raise AdapterError(path, f"not a valid safetensors file ({type(e).__name__}: {e})") from None
    except BaseException as e:  # a panic inside the package's parser (pyo3 raises it as a BaseException)
        if type(e).__name__ != "PanicException":
            raise
        raise AdapterError(path, f"not a valid safetensors file (the safetensors parser failed: {e})") from None
    if raw.count(b'"data_offsets"') != len(names):  # the package keeps one of two identical entries silently
        duplicate = _duplicate_key(raw)
        if duplicate is not None:
            raise AdapterError(path, f"not a valid safetensors file: tensor {duplicate!r} is listed twice")
    entries = {}
    offset = 0
    for name, (dtype_name, shape) in zip(names, layout):
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise AdapterError(path, f"tensor {name!r} has dtype {dtype_name}, which adapter files do not use")
        numel = math.prod(shape)
        if not numel and math.prod(d for d in shape if d) > MAX_ELEMENTS:  # non-empty ones fit in the file
            raise AdapterError(path, f"tensor {name!r} has an implausible shape {list(shape)}")
        end = offset + numel * dtype.itemsize
        entries[name] = TensorEntry(dtype, tuple(shape), offset, end)
        offset = end
    if offset != size - 8 - n:  # safetensors has checked this; a file that changed since is caught here
        raise AdapterError(path, "truncated: the file changed while it was being read")
    return Header(path, metadata, entries, 8 + n, size, st.st_mtime)


def _invalid_reason(raw: bytes, message: str, size: int) -> str:
    """The safetensors package's refusal as one readable reason (the header is parsed here only to say which
    tensor)."""
    detail = message.split("Error while deserializing header:", 1)[-1].strip()
    detail = detail if len(detail) < 200 else detail[:200] + "…"
    if "not fully covered" in detail:
        try:
            doc = json_value(raw.decode("utf-8"), max_depth=3)
            ends = {k: int(v["data_offsets"][1]) for k, v in doc.items() if k != "__metadata__"}
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            ends = {}
        data_len = size - 8 - len(raw)
        last = max(ends, key=ends.get, default=None)
        if last is not None and ends[last] > data_len:
            return f"truncated: tensor {last!r} ends at byte {ends[last]} of a {data_len}-byte data section"
        if last is not None:
            return f"not a valid safetensors file: {data_len - ends[last]} bytes after the last tensor's data"
        return "truncated or not safetensors: the data section does not match the tensors"
    if "invalid offset" in detail:
        return f"not a valid safetensors file: tensor data overlaps, is out of order or leaves a gap ({detail})"
    if "recursion limit" in detail:
        return "not a valid safetensors file: the header JSON nests too deeply"
    if "expected struct" in detail or "invalid type: sequence" in detail:
        return "not a safetensors file: the header is not a JSON object"
    if any(w in detail for w in ("invalid type", "invalid value", "unknown variant", "missing field", "duplicate")):
        return f"invalid safetensors header: {detail.replace('invalid JSON in header: ', '')}"
    if "invalid JSON" in detail or "UTF-8" in detail:
        return f"not a safetensors file: the header is not valid JSON ({detail})"
    return f"not a valid safetensors file: {detail}"


def _duplicate_key(raw: bytes) -> str | None:
    """The first top-level key a header names twice, or None."""
    def first_duplicate(items):
        keys = [k for k, _ in items]
        return next((k for i, k in enumerate(keys) if k in keys[:i]), None) if len(set(keys)) < len(keys) else None

    try:  # the hook sees the innermost objects first and the top level last, which is what it returns
        return json.loads(raw.decode("utf-8"), object_pairs_hook=first_duplicate)
    except (ValueError, RecursionError):
        return None


def json_value(text: str, max_depth: int = MAX_JSON_DEPTH):
    """A metadata string parsed as JSON; ValueError for invalid JSON, non-finite numbers (NaN, Infinity, 1e999) or
    nesting deeper than `max_depth`."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                raise ValueError(f"nested deeper than {max_depth} levels")
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def load_tensors(path: str | os.PathLike, header: Header | None = None) -> tuple[Header, dict[str, torch.Tensor]]:
    """Read the whole data section once; every tensor is a view into that one buffer."""
    header = header or read_header(path)
    with open(header.path, "rb") as f:
        f.seek(header.data_start)
        buf = bytearray(header.file_size - header.data_start)  # read straight into it: no transient second copy
        view, got = memoryview(buf), 0
        while got < len(buf):
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        view.release()
    if got != len(buf):
        raise AdapterError(header.path, "truncated: the file changed while it was being read")
    tensors = {}
    for name, e in header.entries.items():
        numel = math.prod(e.shape)
        itemsize = e.dtype.itemsize
        if numel == 0:
            t = torch.empty(e.shape, dtype=e.dtype)
        elif e.start % itemsize:
            t = torch.frombuffer(bytearray(buf[e.start : e.end]), dtype=e.dtype).reshape(e.shape)
        else:
            t = torch.frombuffer(buf, dtype=e.dtype, count=numel, offset=e.start).reshape(e.shape)
        tensors[name] = t
    return header, tensors


def refuse_same_file(out: str | os.PathLike, inputs) -> None:
    """AdapterError when `out` is (through links, hard links or a linked folder) one of the `inputs`: writing it
    would destroy an input. Checked before anything is written."""
    out = str(out)
    if not os.path.exists(out):
        return
    for source in inputs:
        try:
            same = os.path.samefile(out, str(source))
        except OSError:
            continue
        if same:
            raise AdapterError(out, f"the output is the input file {source} (the same file on disk); "
                                    "nothing was written: choose another output path")


def _out_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """`dtype` for floating tensors (None: unchanged); other tensors always keep theirs."""
    return dtype if dtype is not None and t.is_floating_point() else t.dtype


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 dtype: torch.dtype | None = None) -> None:
    """Write a safetensors file tensor by tensor (no second copy of the model in memory), converting floating
    tensors to `dtype` on the way; atomic (temporary file, then rename)."""
    path = str(path)
    names = sorted(tensors)
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        out = _out_dtype(t, dtype)
        size = t.numel() * out.itemsize
        header[name] = {"dtype": DTYPE_NAMES[out], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in names:
                t = tensors[name]
                t = t.to(_out_dtype(t, dtype)).contiguous().reshape(-1)
                if t.numel():
                    f.write(t.view(torch.uint8).numpy().data)
        os.replace(tmp, path)
    except OSError as e:
        raise AdapterError(path, f"cannot be written: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
