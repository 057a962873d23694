"""Zero-initialised host arrays reserved as virtual memory: an anonymous mapping with no swap reserved
(MAP_NORESERVE), so a large KV reservation is neither charged against the machine's commit limit nor resident until
written, and pages can be handed back to the OS. (np.zeros maps its memory too, but charges all of it: adjacent
such mappings merge, and one merged region larger than RAM makes every later fork of the process fail.)"""

from __future__ import annotations

import mmap
import os
import sys

import numpy as np

PAGE = mmap.PAGESIZE
_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


def physical_memory_bytes() -> int:
    """The machine's RAM (what a memory fraction is a fraction of)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class VirtualArray:
    """A zero-initialised numpy array over an anonymous mapping whose pages can be handed back."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self._map = mmap.mmap(-1, max(nbytes, PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _NORESERVE)
        self.array = np.frombuffer(self._map, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def release(self, start: int, length: int) -> None:
        """Give the pages of bytes [start, start + length) back to the OS (they read as zeros afterwards)."""
        first, last = -(-start // PAGE) * PAGE, (start + length) // PAGE * PAGE
        if last > first and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)
