"""Reading `.safetensors` files: header and metadata alone, or all tensors from one read of the file.

Pickled files (`.pt`, `.ckpt`, `.pth`, `.bin` zips or raw pickles) are refused, never unpickled.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
PICKLE_SUFFIXES = {".pt", ".ckpt", ".pth", ".bin", ".pkl"}


@dataclass(frozen=True)
class TensorEntry:
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
    """Parse and validate a safetensors header without reading tensor data."""
    path = str(path)
    try:
        size = os.path.getsize(path)
        mtime = os.path.getmtime(path)
        with open(path, "rb") as f:
            head = f.read(9)
            _refuse_pickles(path, head, size)
            head = head[:8]
            if len(head) < 8:
                raise AdapterError(path, f"truncated: the file has {size} bytes, fewer than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise AdapterError(path, f"truncated or not safetensors: header length {n} exceeds the file size {size}")
            if n > MAX_HEADER:
                raise AdapterError(path, f"not safetensors: header length {n} is implausibly large")
            f.seek(8)
            raw = f.read(n)
    except OSError as e:
        raise AdapterError(path, f"cannot be read: {e.strerror or e}") from None
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterError(path, "not a safetensors file: the header is not valid JSON") from None
    if not isinstance(doc, dict):
        raise AdapterError(path, "not a safetensors file: the header is not a JSON object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise AdapterError(path, "invalid safetensors header: __metadata__ is not an object")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    data_len = size - 8 - n
    entries = {}
    for name, info in doc.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise AdapterError(path, f"invalid safetensors header entry for tensor {name!r}") from None
        if any(d < 0 for d in shape) or not 0 <= start <= end:
            raise AdapterError(path, f"invalid shape or offsets for tensor {name!r}")
        if end > data_len:
            raise AdapterError(path, f"truncated: tensor {name!r} ends at byte {end} of a {data_len}-byte data section")
        itemsize = dtype.itemsize
        if (end - start) != math.prod(shape) * itemsize:
            raise AdapterError(path, f"invalid safetensors header: tensor {name!r} has {end - start} bytes for shape {list(shape)}")
        entries[name] = TensorEntry(dtype, shape, start, end)
    return Header(path, metadata, entries, 8 + n, size, mtime)


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
