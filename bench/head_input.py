"""One forward of a batch with ``logits_to_keep=1`` (C-Eval's scoring, ``generate``'s prefill) on a
model whose head needs no gradient (an SFT adapter's frozen base), with the head's input made
contiguous (chatuie.models.modeling._contiguous_head_input) and without: torch's matmul folds a
strided batch of last positions into one product only for a head that requires grad; otherwise it
multiplies per row over a copy of the whole head.

    python -m bench.head_input --model models/sft --out bench/results/head_input_zen4.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

import torch

from bench.engines import machine
from chatuie.models.modeling import load_saved, merge_lora
from chatuie.models.precision import resolve_dtype


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models/sft")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=200, help="prompt length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/head_input.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype("auto")
    model, _ = load_saved(args.model, dtype=dtype)
    model = merge_lora(model).eval()
    head = model.get_output_embeddings()
    ids = torch.randint(1000, 20000, (args.batch, args.tokens), generator=torch.Generator().manual_seed(0))
    results = {
        "machine": machine(),
        "dtype": dtype,
        "model": args.model,
        "batch": args.batch,
        "tokens": args.tokens,
        "head_requires_grad": head.weight.requires_grad,
        "runs": {},
    }
    hooks = dict(head._forward_pre_hooks)
    for name in ("contiguous input (chatuie)", "strided input (as transformers slices it)"):
        if name.startswith("strided"):
            head._forward_pre_hooks.clear()
        seconds = []
        with torch.inference_mode():
            model(input_ids=ids[:2, :16], logits_to_keep=1)  # warm-up
            for _ in range(args.repeats):
                start = time.perf_counter()
                model(input_ids=ids, logits_to_keep=1)
                seconds.append(time.perf_counter() - start)
        results["runs"][name] = {
            "seconds": [round(s, 3) for s in seconds],
            "peak_rss_gb_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        }
        print(name, results["runs"][name], flush=True)
    head._forward_pre_hooks.update(hooks)
    results["load_after"] = os.getloadavg()[0]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
