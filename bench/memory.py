"""Resident memory of this process: current, and the peak since the last reset (Linux /proc; CUDA when used)."""

from __future__ import annotations

import os
import resource

import torch

_CAN_RESET: bool | None = None


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss() -> int:
    value = _status("VmRSS")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def trim() -> None:
    """Give freed heap memory back to the OS (glibc malloc_trim), so that the next baseline is honest."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak(device: str = "cpu") -> bool:
    """Restart the high-water mark (Linux ≥ 4.0 `clear_refs` 5); False where the kernel refuses."""
    global _CAN_RESET
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if _CAN_RESET is False:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _CAN_RESET = True
    except OSError:
        _CAN_RESET = False
    return _CAN_RESET


def peak() -> int:
    value = _status("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak(device: str) -> int | None:
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def drop_page_cache(paths) -> None:
    """Ask the kernel to forget the cached pages of `paths` (for cold reads); silently best-effort."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            pass
