"""glibc's allocator, set to keep freed memory for reuse: CPU training.

Why: glibc serves every allocation above its mmap threshold (32 MiB at most) with a fresh ``mmap``
and unmaps it on free, so the next one faults all its pages in again, each zero-filled by the
kernel. An SFT step on Gemma 3 270M here faulted in ~12 GB (logits over the 262,144-token
vocabulary, activations): 5-7 s of system time in a 7-9 s step (docs/experiments.md). With mmap
off and no trimming, freed blocks stay in the heap and the next step reuses them; the price is that
a process keeps its peak memory until it exits, and where shapes keep changing (decoding grows each
KV cache a step at a time) the heap keeps growing: evaluate@sft was killed at 24.0 GB with these
settings and peaks at ~7 GB with glibc's defaults. `evaluate` and `rl` run without them.

``CHATUIE_KEEP_FREED_MEMORY=0`` leaves glibc's defaults alone. Other C libraries: nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
SETTINGS = (
    (M_MMAP_MAX, 0),  # no allocation is served by its own mmap
    (M_TRIM_THRESHOLD, 2**31 - 1),  # the heap's free top is not returned to the kernel (the int maximum)
    (M_TOP_PAD, 64 << 20),  # grow the heap 64 MiB beyond each request: fewer brk calls
)


def keep_freed_memory() -> bool:
    """Apply :data:`SETTINGS` to this process's glibc malloc; True where they took effect."""
    if os.environ.get("CHATUIE_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS)
    if not applied:  # musl's mallopt is a stub that returns 0
        logger.info("mallopt refused the allocator settings: glibc's defaults stay")
    return applied
