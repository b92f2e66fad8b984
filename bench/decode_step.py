"""Where one decoding step's time goes on the default model: the decoder body against the output head.

Gemma 3 270M's output head is 262,144 x 640, about 63 % of the weights; at every decoding step the
head is computed over the whole vocabulary although the generation constraint allows only a few
tokens. This measures, after a prefill of real IE prompts (the project's chat template) and with
the KV cache, the time per step of

* the decoder body (``model.model``: embeddings, layers, final norm) for one new token per row,
* the full head (``lm_head`` over every token), and
* the head over ``--allowed`` token rows only (``h @ W[ids].T``), what a constraint-aware head costs,

at batch 1 and batch 16, in the dtype ``auto`` resolves to. The ratio (body + full head) / (body +
allowed head) bounds what computing the head for the allowed tokens alone can gain per step.
Results: ``bench/results/decode_step_<cpu class>.json``.

    python -m bench.decode_step                        # the packaged Gemma 3 270M
    python -m bench.decode_step --steps 16 --allowed 64 --records ../other-checkout/data/records
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from chatuie.config import build, load_params
from chatuie.data.prompts import DEFAULT_OPTIONS, ie_user_prompt, messages_for
from chatuie.data.records import load_records
from chatuie.models.modeling import ModelConfig, load_model
from chatuie.models.precision import current_device, resolve_dtype

ROOT = Path(__file__).resolve().parents[1]


def prompts(tokenizer: Any, count: int, records: Path) -> list[str]:
    """IE prompts of Resume test records (``records``: the data/records `dvc repro prepare` writes),
    else a fixed sentence."""
    path = records / "resume" / "test.jsonl"
    texts = []
    if path.exists():
        for record in load_records(path)[:count]:
            user = ie_user_prompt(record.task, record.text, record.schema, DEFAULT_OPTIONS)
            texts.append(
                tokenizer.apply_chat_template(
                    messages_for(user, None), tokenize=False, add_generation_prompt=True
                )
            )
    while len(texts) < count:
        texts.append(f"高勇，男，中国国籍，无境外居留权，现任公司董事长。 ({len(texts)})")
    return texts


def timed(fn: Any, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


@torch.inference_mode()
def measure(
    model: Any, tokenizer: Any, batch: int, steps: int, allowed: int, records: Path
) -> dict[str, Any]:
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts(tokenizer, batch, records), return_tensors="pt", padding=True)
    body, head = model.model, model.lm_head
    out = body(**encoded, use_cache=True)
    cache, hidden = out.past_key_values, out.last_hidden_state[:, -1:, :]
    mask = encoded["attention_mask"]
    ids = torch.randperm(head.weight.shape[0], generator=torch.Generator().manual_seed(0))[:allowed]
    rows = head.weight[ids]  # what a constraint-aware head multiplies by: the allowed tokens' rows
    next_ids = head(hidden).argmax(-1)
    body_times = []
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
        start = time.perf_counter()
        out = body(input_ids=next_ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        body_times.append(time.perf_counter() - start)
        cache, hidden = out.past_key_values, out.last_hidden_state
        next_ids = head(hidden).argmax(-1)
    full = timed(lambda: head(hidden), steps)
    restricted = timed(lambda: hidden @ rows.T, steps)
    b, f, r = (statistics.median(x) * 1000 for x in (body_times, full, restricted))
    return {
        "batch": batch,
        "prompt_tokens": int(encoded["input_ids"].shape[1]),
        "body_ms": round(b, 2),
        "full_head_ms": round(f, 2),
        "allowed_head_ms": round(r, 3),
        "head_share_of_step": round(f / (b + f), 3),
        "step_speedup_bound": round((b + f) / (b + r), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=16, help="decoding steps timed per batch size")
    parser.add_argument("--allowed", type=int, default=64, help="token rows of the constraint-aware head")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--records", type=Path, default=ROOT / "data" / "records")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as torch chooses)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = build(ModelConfig, load_params(ROOT / "params.yaml").get("model"), "params.yaml: model")
    config = dataclasses.replace(config, lora=None)  # the base alone: what decoding multiplies by
    model, tokenizer = load_model(config)
    dtype = resolve_dtype(config.dtype, where="model.dtype")
    model = model.to(getattr(torch, dtype)).eval()
    device = current_device()
    results = [
        measure(model, tokenizer, int(b), args.steps, args.allowed, args.records)
        for b in args.batches.split(",")
    ]
    report = {
        "what": "one decoding step: decoder body vs the full output head vs the head over allowed tokens",
        "model": config.base,
        "dtype": dtype,
        "cpu_class": device.label,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
        "steps": args.steps,
        "allowed_tokens": args.allowed,
        "results": results,
    }
    slug = device.label.lower().replace(" ", "_").replace("-", "")
    out = args.out or ROOT / "bench" / "results" / f"decode_step_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
