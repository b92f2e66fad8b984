"""chatuie.env: the process settings chatuie applies on import."""

from __future__ import annotations

import subprocess
import sys

import pytest

# After a 20 MB block is freed, is a new 8 MB block carved from the heap ([heap] in the maps)
# rather than mmap'd (returned to the system on free)? The decoding loop's logits are such blocks.
_PROBE = """
import ctypes, sys
if sys.argv[1] == "chatuie":
    import chatuie  # noqa: F401
big = bytearray(20 << 20)
del big
block = bytearray(8 << 20)
address = ctypes.addressof((ctypes.c_char * len(block)).from_buffer(block))
for line in open("/proc/self/maps"):
    span, *rest = line.split()
    low, high = (int(x, 16) for x in span.split("-"))
    if low <= address < high:
        print("heap" if line.rstrip().endswith("[heap]") else "mmap")
"""


def _where(mode: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_blocks_stay_mmapped_after_large_frees():
    if _where("plain") != "heap":
        pytest.skip("this libc does not move large blocks to the heap (no glibc dynamic threshold)")
    assert _where("chatuie") == "mmap"
