"""The C allocator's settings for a CPU process: freed memory kept for the next tensors of the same sizes."""

from __future__ import annotations

import ctypes
import os
import sys

# glibc's mallopt parameters: memory given back to the system above this much free at the heap's top; extra
# asked for at each growth; blocks this large and larger mapped (and unmapped when freed) on their own
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Have glibc's allocator keep freed memory for the next tensors of the same sizes, rather than give it
    back to the system and fault it in again, zeroed, page by page (by default blocks from 128 KiB to 32 MiB
    are mapped and unmapped each time, a threshold that only grows as large blocks are freed). A CPU run
    allocates and frees the same activation-sized tensors at every layer and step: the default run at 65ecefe
    took 51 million page faults, 124 of its 3,117 CPU seconds in the kernel. Process-wide, so the command
    line calls it, not the library. False where the C library is not glibc (nothing changed)."""
    if not sys.platform.startswith("linux") or not _glibc():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20)))


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError):
        return False
