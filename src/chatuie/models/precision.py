"""Which floating-point dtype this machine computes fast: ``auto`` resolves to bfloat16 only there.

bfloat16 halves memory and, on hardware that multiplies it natively, doubles matmul speed. Without
that hardware PyTorch emulates it: on a 2-core AMD EPYC with AVX2 only (Zen 3) bfloat16 matmuls ran
55-166x slower than float32 (bench/results/precision_avx2.json), and the default's SFT crawled.
So ``auto`` (the default of every dtype setting) is:

* CUDA: bfloat16 where the GPU supports it (``torch.cuda.is_bf16_supported()``), else float32;
* CPU: bfloat16 with AMX-BF16 or AVX-512 BF16 (oneDNN's native bfloat16 kernels), else float32.

The CPU's own report (``torch.cpu.get_capabilities()``, cpuinfo) is narrowed by the ISA limits a
user sets for oneDNN and ATen (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``), so a run restricted
to AVX2 on an AMX machine resolves as an AVX2 machine does. An explicit ``bfloat16`` where it is
emulated still runs, with one warning naming the cost.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
CHOICES = ("auto", *DTYPES)
# The least of what was measured on the AVX2 EPYC (bench/precision.py): bfloat16 / float32 GEMM time.
EMULATED_BF16_SLOWDOWN = 55

# oneDNN's ISA names, lowest first; native bfloat16 dot products start at AVX512_CORE_BF16.
_ONEDNN_ISAS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
    "AVX512_CORE_AMX",
    "AVX512_CORE_AMX_FP16",
)
_ONEDNN_NATIVE_BF16 = _ONEDNN_ISAS.index("AVX512_CORE_BF16")


@dataclass(frozen=True)
class ComputeDevice:
    """What matters here of the device a stage computes on."""

    kind: str  # "cpu" | "cuda"
    label: str  # the CPU class or GPU name, written beside every timing: "AVX2", "AMX-BF16", ...
    native_bf16: bool
    why: str  # one phrase: why bfloat16 is (not) native here

    def describe(self) -> str:
        return f"{self.kind.upper()} {self.label}"


def cpu_device(
    capabilities: dict[str, object] | None = None, env: dict[str, str] | None = None
) -> ComputeDevice:
    """The CPU as ``auto`` sees it: its class and whether it multiplies bfloat16 natively.

    ``capabilities`` (default ``torch.cpu.get_capabilities()``: cpuinfo's flags) and ``env``
    (default ``os.environ``) are parameters so that each case can be tested on any machine.
    """
    if capabilities is None:
        import torch

        capabilities = dict(torch.cpu.get_capabilities())
    env = dict(os.environ) if env is None else env
    flag = lambda name: bool(capabilities.get(name, False))  # noqa: E731
    if flag("amx_bf16") and flag("amx_tile"):
        label = "AMX-BF16"
    elif flag("avx512_bf16"):
        label = "AVX-512 BF16"
    elif flag("avx512_f"):
        label = "AVX-512"
    elif flag("avx2"):
        label = "AVX2"
    else:
        label = str(capabilities.get("architecture") or "other")
    native = label in ("AMX-BF16", "AVX-512 BF16")
    why = f"{label} computes bfloat16 natively" if native else f"{label}: no AVX-512 BF16 or AMX"

    # A user's ISA limits: oneDNN (the matmuls) and ATen's vectorised kernels.
    onednn = env.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    if native and onednn in _ONEDNN_ISAS and _ONEDNN_ISAS.index(onednn) < _ONEDNN_NATIVE_BF16:
        label, native = f"{label} limited to {onednn}", False
        why = f"ONEDNN_MAX_CPU_ISA={onednn} leaves oneDNN no bfloat16 instructions"
    aten = env.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if native and aten in ("default", "avx2", "zvector", "vsx"):
        label, native = f"{label} limited to {aten}", False
        why = f"ATEN_CPU_CAPABILITY={aten} leaves ATen no bfloat16 vector kernels"
    return ComputeDevice("cpu", label, native, why)


def current_device(device: str | None = None) -> ComputeDevice:
    """The device a stage computes on: ``device`` ("cpu", "cuda", "auto"/None = CUDA if present)."""
    import torch

    wants_cuda = device == "cuda" or (device in (None, "auto") and torch.cuda.is_available())
    if wants_cuda and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        native = bool(torch.cuda.is_bf16_supported())
        return ComputeDevice("cuda", name, native, f"{name} {'supports' if native else 'lacks'} bfloat16")
    return cpu_device()


def resolve_dtype(requested: str, device: ComputeDevice | None = None, *, where: str = "dtype") -> str:
    """``requested`` ("auto" or a dtype name) as the dtype to compute in on ``device``.

    ``auto``: bfloat16 where native, else float32. An explicit name is kept; bfloat16 where it is
    emulated logs one warning per process (and setting) with the expected slowdown.
    """
    if requested not in CHOICES:
        raise ValueError(f"{where}: unknown dtype {requested!r} (known: {', '.join(CHOICES)})")
    device = device or current_device()
    if requested == "auto":
        return "bfloat16" if device.native_bf16 else "float32"
    if requested == "bfloat16" and not device.native_bf16 and (where, device) not in _warned:
        _warned.add((where, device))
        log.warning(
            "%s: bfloat16 on %s is emulated (%s): its matrix products run %dx slower than float32 "
            "here, or more; `auto` would choose float32",
            where,
            device.describe(),
            device.why,
            EMULATED_BF16_SLOWDOWN,
        )
    return requested


def resolve_autocast(requested: bool | str, device: ComputeDevice | None = None, *, where: str) -> bool:
    """A bfloat16 mixed-precision switch (``true`` | ``false`` | ``auto``) as a bool for this device."""
    if isinstance(requested, bool):
        if requested:
            resolve_dtype("bfloat16", device, where=where)  # the warning where emulated
        return requested
    if requested != "auto":
        raise ValueError(f"{where}: expected true, false or auto, got {requested!r}")
    return resolve_dtype("auto", device, where=where) == "bfloat16"


_warned: set[tuple[str, ComputeDevice]] = set()


def lineage(
    requested: str | bool, resolved: str | bool, device: ComputeDevice | None = None
) -> dict[str, str]:
    """What a stage writes to its log, MLflow params and metrics file about the precision it ran in."""
    device = device or current_device()
    return {
        "requested": str(requested).lower() if isinstance(requested, bool) else requested,
        "resolved": str(resolved).lower() if isinstance(resolved, bool) else resolved,
        "device": device.describe(),
        "native_bf16": str(device.native_bf16).lower(),
    }
