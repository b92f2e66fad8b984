"""Constrained decoding by engine, on one machine in one run: ``transformers``' ``generate`` with
the constraint as a logits processor, chatuie's loop (:mod:`chatuie.decoding.loop`), and llama.cpp
decoding the packaged GGUF without a constraint (the speed an existing CPU engine reaches).

Requests are seeded samples of the Resume, CoNLL04 and FewFC test splits, posed as ``evaluate``
poses them (system turn, chat template; grouped by dataset, longest first). Per engine and batch
size: records/s, answer tokens/s over the whole call, and the decode rate alone (the call's time
less a one-token call's, which is prefill and one step). ``identical`` is the share of answers
equal to the first engine's (``--engines``; ``transformers`` by default). ``--extract N``:
``Extractor.extract_many`` over the first N Resume test texts, per engine and batch size
(``--extract-runs``; ``identical`` against the first of them). ``--free N``: N records per
dataset decoded without the constraint (``evaluate``'s free ablation, its repetition penalty),
per engine at batch 16. A count of 0 skips its part. ``chatuie-cat-cache``
is chatuie's loop with ``transformers``' ``DynamicCache`` (one ``torch.cat`` per layer and step)
instead of the in-place cache (:mod:`chatuie.decoding.kv_cache`): the loop as it was before that cache.
``chatuie-batchwise`` is the loop without continuous batching (:mod:`chatuie.decoding.continuous`):
a batch is decoded until its last row ends before the next prompts start. Continuous batching only
shows where a dataset has more records than a batch holds (``--per-dataset`` above 16).

    python -m bench.engines --model models/sft --out bench/results/engines_avx2.json

llama.cpp runs where ``llama_cpp`` imports (``pip install llama-cpp-python``, built from source);
it decodes the base model's GGUF, whose dequantized weights are models/base.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from chatuie.data.prompts import SYSTEM_PROMPT, ie_user_prompt
from chatuie.data.records import Record
from chatuie.decoding import IERequest, constrained_generate, free_generate
from chatuie.io import read_jsonl
from chatuie.models.modeling import load_saved, merge_lora
from chatuie.models.precision import resolve_dtype

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("resume", "conll04", "fewfc")


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = cpuinfo.splitlines()
    flags = next((line for line in lines if line.startswith("flags")), "")
    model = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), "")
    return {
        "cpu": model or platform.processor(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "threads": torch.get_num_threads(),
        "load_before": os.getloadavg()[0],
    }


def sample(records_dir: Path, per_dataset: int, seed: int) -> dict[str, list[Record]]:
    out = {}
    for dataset in DATASETS:
        rows = [Record.from_dict(r) for r in read_jsonl(records_dir / dataset / "test.jsonl")]
        random.Random(seed).shuffle(rows)
        out[dataset] = rows[:per_dataset]
    return out


def prompts_for(tokenizer: Any, records: list[Record]) -> tuple[list[str], list[IERequest]]:
    """Prompts as evaluate renders them, longest first (its batch order)."""
    prompts = []
    for r in records:
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": ie_user_prompt(r.task, r.text, r.schema)},
        ]
        prompts.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    order = sorted(range(len(records)), key=lambda i: -len(tokenizer(prompts[i])["input_ids"]))
    return [prompts[i] for i in order], [
        IERequest(records[i].task, records[i].text, records[i].schema) for i in order
    ]


CAT_CACHE = "chatuie-cat-cache"
BATCHWISE = "chatuie-batchwise"


@contextlib.contextmanager
def engine_named(engine: str) -> Iterator[str]:
    """The ``engine=`` argument for a bench engine name (``chatuie-cat-cache``: the loop with
    ``DynamicCache`` while inside; ``chatuie-batchwise``: the loop with new prompts joining only
    an empty batch)."""
    if engine == BATCHWISE:
        from chatuie.decoding import continuous

        joining_any = continuous.decode_continuous

        def batchwise(*args: Any, **kwargs: Any) -> Any:
            return joining_any(*args, **{**kwargs, "refill": kwargs["batch_size"]})

        continuous.decode_continuous = batchwise
        try:
            yield "chatuie"
        finally:
            continuous.decode_continuous = joining_any
        return
    if engine != CAT_CACHE:
        yield engine
        return
    from transformers import DynamicCache

    from chatuie.decoding import kv_cache

    in_place = kv_cache.in_place_cache
    kv_cache.in_place_cache = lambda config: DynamicCache(config=config)
    try:
        yield "chatuie"
    finally:
        kv_cache.in_place_cache = in_place


def run_engine(model, tokenizer, jobs, engine: str, batch: int, max_new_tokens: int) -> dict[str, Any]:
    with engine_named(engine) as name:
        return _run_engine(model, tokenizer, jobs, name, batch, max_new_tokens)


def _run_engine(model, tokenizer, jobs, engine: str, batch: int, max_new_tokens: int) -> dict[str, Any]:
    answers, seconds, first_token = [], 0.0, 0.0
    for prompts, requests in jobs:
        start = time.perf_counter()
        constrained_generate(
            model, tokenizer, prompts, requests, max_new_tokens=1, batch_size=batch, engine=engine
        )
        first_token += time.perf_counter() - start
        start = time.perf_counter()
        answers += constrained_generate(
            model,
            tokenizer,
            prompts,
            requests,
            max_new_tokens=max_new_tokens,
            batch_size=batch,
            engine=engine,
        )
        seconds += time.perf_counter() - start
    tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)  # + EOS
    records = len(answers)
    return {
        "records": records,
        "seconds": round(seconds, 2),
        "records_per_s": round(records / seconds, 3),
        "answer_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 2),
        "decode_tokens_per_s": round((tokens - records) / max(seconds - first_token, 1e-9), 2),
        "answers": answers,
    }


def run_free(model, tokenizer, jobs, engine: str, batch: int, max_new_tokens: int) -> dict[str, Any]:
    answers, seconds = [], 0.0
    with engine_named(engine) as name:
        for prompts, _ in jobs:
            start = time.perf_counter()
            answers += free_generate(
                model, tokenizer, prompts, max_new_tokens, batch, repetition_penalty=1.3, engine=name
            )
            seconds += time.perf_counter() - start
    tokens = sum(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers)
    return {
        "records": len(answers),
        "seconds": round(seconds, 2),
        "records_per_s": round(len(answers) / seconds, 3),
        "answer_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 2),
        "answers": answers,
    }


def identical_shares(row: dict[str, dict[str, Any]], key: str) -> None:
    """Each run's share of ``key`` outputs equal to the first run's (the outputs dropped)."""
    reference = next(iter(row.values()))[key]
    for run in row.values():
        same = sum(a == b for a, b in zip(run[key], reference, strict=True))
        run["identical"] = f"{same}/{len(reference)}"
    for run in row.values():
        run.pop(key)


def run_llama_cpp(gguf: Path, prompts: list[str], threads: int, max_new_tokens: int) -> dict[str, Any]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_batch=512, verbose=False, seed=0)
    generated, seconds, first_token = 0, 0.0, 0.0
    for prompt in prompts:
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        for budget in (1, max_new_tokens):
            llm.reset()  # no KV reuse between calls: every call prefills its prompt
            start = time.perf_counter()
            out = llm.create_completion(ids, max_tokens=budget, temperature=0.0, top_k=1)
            elapsed = time.perf_counter() - start
            if budget == 1:
                first_token += elapsed
            else:
                seconds += elapsed
                generated += out["usage"]["completion_tokens"]
    return {
        "records": len(prompts),
        "seconds": round(seconds, 2),
        "records_per_s": round(len(prompts) / seconds, 3),
        "answer_tokens": generated,
        "tokens_per_s": round(generated / seconds, 2),
        "decode_tokens_per_s": round((generated - len(prompts)) / max(seconds - first_token, 1e-9), 2),
    }


def run_extract(model, tokenizer, texts: list[str], engine: str, batch: int) -> dict[str, Any]:
    from chatuie.data.schema import ExtractionSchema
    from chatuie.serve.extractor import Extractor

    schema = ExtractionSchema.from_dict(
        {"entities": ["NAME", "CONT", "RACE", "TITLE", "EDU", "ORG", "PRO", "LOC"]}
    )
    with engine_named(engine) as name:
        extractor = Extractor(model, tokenizer, engine=name)
        start = time.perf_counter()
        results = extractor.extract_many([(t, schema) for t in texts], batch_size=batch)
        seconds = time.perf_counter() - start
    return {
        "records": len(texts),
        "seconds": round(seconds, 2),
        "records_per_s": round(len(texts) / seconds, 3),
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="models/sft")
    parser.add_argument("--records", default="data/records")
    parser.add_argument("--per-dataset", type=int, default=16, help="records per dataset at --batch")
    parser.add_argument("--batch", type=int, default=16, help="the batch size of the larger runs")
    parser.add_argument("--batch1-per-dataset", type=int, default=4, help="records per dataset at batch 1")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--extract", type=int, default=48, help="Resume test texts for extract (0: skip)")
    parser.add_argument("--free", type=int, default=0, help="records per dataset decoded free at batch 16")
    parser.add_argument("--engines", default="transformers,chatuie")
    parser.add_argument(
        "--extract-runs",
        default="",
        help="engine:batch pairs for extract, e.g. transformers:8,chatuie:32 (default: each engine at 16)",
    )
    parser.add_argument("--llama-cpp", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", default="bench/results/engines.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dtype = resolve_dtype("auto")
    info = {"machine": machine(), "dtype": dtype, "model": args.model, "max_new_tokens": args.max_new_tokens}
    model, tokenizer = load_saved(args.model, dtype=dtype)
    model = merge_lora(model).eval()
    engines = args.engines.split(",")
    results: dict[str, Any] = {"batch": {}}
    for batch, per_dataset in ((1, args.batch1_per_dataset), (args.batch, args.per_dataset)):
        if per_dataset == 0:
            continue
        picked = sample(Path(args.records), per_dataset, args.seed)
        jobs = [prompts_for(tokenizer, picked[d]) for d in DATASETS]
        row: dict[str, Any] = {}
        for engine in engines:
            row[engine] = run_engine(model, tokenizer, jobs, engine, batch, args.max_new_tokens)
            print(
                f"batch {batch} {engine}: "
                + ", ".join(f"{k} {v}" for k, v in row[engine].items() if k != "answers"),
                flush=True,
            )
        identical_shares(row, "answers")
        results["batch"][str(batch)] = row

    if args.free:
        picked = sample(Path(args.records), args.free, args.seed)
        jobs = [prompts_for(tokenizer, picked[d]) for d in DATASETS]
        results["free_batch16"] = {}
        for engine in engines:
            run = run_free(model, tokenizer, jobs, engine, 16, args.max_new_tokens)
            results["free_batch16"][engine] = run
            print(
                f"free, batch 16, {engine}: "
                + ", ".join(f"{k} {v}" for k, v in run.items() if k != "answers")
            )
        identical_shares(results["free_batch16"], "answers")

    use_llama = args.llama_cpp == "yes"
    if args.llama_cpp == "auto":
        try:
            import llama_cpp  # noqa: F401

            use_llama = True
        except ImportError:
            print("llama.cpp: llama_cpp does not import here; skipped (pip install llama-cpp-python)")
    if use_llama:
        from chatuie.models import packaged

        picked = sample(Path(args.records), args.batch1_per_dataset, args.seed)
        prompts = [p for d in DATASETS for p in prompts_for(tokenizer, picked[d])[0]]
        with tempfile.TemporaryDirectory() as tmp:
            gguf = packaged.assemble_gguf("gemma3-270m", Path(tmp) / "model.gguf")
            results["llama_cpp_plain_batch1"] = run_llama_cpp(
                gguf, prompts, args.threads, args.max_new_tokens
            )
        print("llama.cpp plain, batch 1: " + json.dumps(results["llama_cpp_plain_batch1"]), flush=True)
        for engine in engines if "1" in results["batch"] else []:
            ours = results["batch"]["1"][engine]["decode_tokens_per_s"]
            theirs = results["llama_cpp_plain_batch1"]["decode_tokens_per_s"]
            results["batch"]["1"][engine]["decode_vs_llama_cpp"] = round(ours / theirs, 3)

    if args.extract:
        texts = [r["text"] for r in read_jsonl(Path(args.records) / "resume" / "test.jsonl")][: args.extract]
        results["extract_resume"] = {}
        outputs = {}
        runs = args.extract_runs.split(",") if args.extract_runs else [f"{e}:16" for e in engines]
        for engine, batch in (run.split(":") for run in runs):
            run = run_extract(model, tokenizer, texts, engine, int(batch))
            name = f"{engine} batch {batch}"
            outputs[name] = run.pop("results")
            results["extract_resume"][name] = run
            print(f"extract {name}: {run}", flush=True)
        first = next(iter(outputs.values()))
        for name, output in outputs.items():
            same = sum(a == b for a, b in zip(output, first, strict=True))
            results["extract_resume"][name]["identical"] = f"{same}/{len(texts)}"

    info["load_after"] = os.getloadavg()[0]
    info.update(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
