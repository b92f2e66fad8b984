"""chatuie.train.allocator: freed big tensors are reused, not page-faulted in again (glibc, Linux)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, resource, sys
import torch
from chatuie.train.allocator import keep_freed_memory
applied = keep_freed_memory()
def faulted_mib(mib):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(mib, 1024, 256)  # written, then freed
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * 4096 / 2**20
faulted_mib(512)
# A smaller one fits in the freed block (an equal one may not: posix_memalign asks a little more).
print(json.dumps({"applied": applied, "second_mib": faulted_mib(256)}))
"""


def _probe(**env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_tensor_is_reused_not_faulted_in_again():
    kept = _probe()
    default = _probe(CHATUIE_KEEP_FREED_MEMORY="0")
    assert kept["applied"] and not default["applied"]
    assert default["second_mib"] > 200  # glibc unmapped the first one: every page faults in again
    assert kept["second_mib"] < 16, kept
