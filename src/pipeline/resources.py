"""What this node can hold: available memory, free disk, and sizes in words for messages."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def available_memory() -> int:
    """Bytes of memory available to new allocations on this node (``MemAvailable``)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def free_disk(path: Path) -> tuple[Path, int]:
    """The nearest existing folder at or above ``path``'s folder, and its free bytes."""
    folder = Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    return folder, shutil.disk_usage(folder).free


def size_text(num_bytes: float) -> str:
    """``num_bytes`` in decimal units: "512 bytes", "1.6 MB", "1600.0 TB"."""
    for unit in ("bytes", "kB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes:.0f} {unit}" if unit == "bytes" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"


def require_room(size: int, out: Path, what: str, fix: str) -> None:
    """Refuses, before the work, ``size`` bytes of ``what`` that half the available memory or
    the disk holding ``out`` cannot hold; the message names both sizes and the ``fix``."""
    folder, free = free_disk(out)
    for room, where in (
        (available_memory() / 2, "half the available memory"),
        (free, f"free in {folder}"),
    ):
        if size > room:
            raise ValueError(
                f"{what} take {size_text(size)}, more than the {size_text(room)} {where}; {fix}"
            )
