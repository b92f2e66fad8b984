"""bfloat16 against float32 matrix products on this machine: what ``dtype: auto`` decides on.

Times ``a @ b`` for the shapes an SFT step of Gemma 3 270M multiplies (a decoder projection, and a
slice of the 262,144-token output head), in float32 and bfloat16, and writes the ratio with the CPU
class and what ``auto`` resolves to. Each product runs at most ``--budget`` seconds per dtype
(after one warm-up call), so an emulated bfloat16 cannot stall the run.

    python -m bench.precision                                   # bench/results/precision_<class>.json
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python -m bench.precision --out /tmp/limited.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from chatuie.models.precision import current_device, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]

# (m, k, n): tokens x in x out
SHAPES = {
    "decoder_projection": (256, 640, 2048),  # an MLP projection of 256 tokens
    "head_slice": (256, 640, 16384),  # 1/16 of the output head over 256 answer tokens
}


def time_matmul(m: int, k: int, n: int, dtype: torch.dtype, budget: float) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=generator).to(dtype)
    b = torch.randn(k, n, generator=generator).to(dtype)
    started = time.perf_counter()
    a @ b  # warm-up (and oneDNN's kernel choice)
    warmup = time.perf_counter() - started
    times: list[float] = []
    deadline = time.perf_counter() + budget
    while len(times) < 20 and (not times or time.perf_counter() < deadline):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    best = min(times)
    return {
        "ms": round(1000 * best, 3),
        "gflops": round(2 * m * k * n / best / 1e9, 2),
        "repeats": len(times),
        "warmup_ms": round(1000 * warmup, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of repeats per product and dtype")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = current_device("cpu")
    results = {}
    for name, (m, k, n) in SHAPES.items():
        fp32 = time_matmul(m, k, n, torch.float32, args.budget)
        bf16 = time_matmul(m, k, n, torch.bfloat16, args.budget)
        results[name] = {
            "shape": [m, k, n],
            "float32": fp32,
            "bfloat16": bf16,
            "bfloat16_over_float32_time": round(bf16["ms"] / fp32["ms"], 2),
        }
        print(name, json.dumps(results[name]), flush=True)
    report = {
        "cpu_class": device.describe(),
        "native_bf16": device.native_bf16,
        "auto_resolves_to": resolve_dtype("auto", device),
        "cpu_name": torch.cpu.get_capabilities().get("cpu_name"),
        "isa_limits": {
            k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ
        },
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": args.threads,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "results": results,
    }
    slug = device.label.lower().replace(" ", "_").replace("-", "")
    out = args.out or ROOT / "bench" / "results" / f"precision_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"{device.describe()}: auto -> {report['auto_resolves_to']}; written {out}")


if __name__ == "__main__":
    main()
