"""Decoding speed with and without the generation constraint (greedy, batch 1 and batch 16).

Same prompts, same ``max_new_tokens``, all runs in one process; reports generated tokens/s per
run, the time the constraint itself takes per step, and the constrained/unconstrained ratio of
time per generated token. Results go to ``bench/results/decoding.json`` (and stdout).

Without ``--model`` it builds everything locally (no hub): a byte-level BPE trained on the
project's record texts and gold answers (so JSON punctuation merges into words, as in real
vocabularies) and a randomly initialised Llama. ``--model DIR`` loads a saved model directory.

    python -m bench.decoding                       # tiny random model
    python -m bench.decoding --model models/sft    # a real checkpoint (LoRA merged)
    python -m bench.decoding --model models/sft --dtype bfloat16 --out bench/results/decoding_gemma_bf16.json
    python -m bench.decoding --profile bench/results/decoding.prof
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedTokenizerFast,
)

from chatuie.data.answers import render
from chatuie.data.prompts import SYSTEM_PROMPT, ie_user_prompt
from chatuie.data.records import Record, Schema
from chatuie.decoding import IEConstraintProcessor, IERequest, clear_caches, token_table
from chatuie.io import read_jsonl
from chatuie.models.modeling import load_saved, merge_lora
from chatuie.models.precision import current_device, resolve_dtype
from chatuie.train.allocator import keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "data" / "records"
# (dataset dir, task) whose test split gives the benchmark requests.
SOURCES = [("resume", "ner"), ("conll04", "re"), ("fewfc", "ee")]

SYNTHETIC_TEXTS = [
    "张三,男,1975年出生,现任北京东方金钰有限公司董事长,曾在中国人民银行工作。",
    'John Smith works for IBM in New York; he said "hello" to Mary Jones in Boston.',
    "东方金钰于2019年3月5日将其持有的1000万股股份质押给中信证券,占其总股本的3.5%。",
    "The Hakawati Theatre in Arab east Jerusalem showed portraits of Palestinians.",
]
SYNTHETIC_SCHEMAS = {
    "ner": Schema(entities=["NAME", "ORG", "LOC", "TITLE", "EDU"]),
    "re": Schema(entities=["Loc", "Org", "Peop", "Other"], relations=["Work_For", "Live_In", "Kill"]),
    "ee": Schema(events={"质押": ["sub-org", "obj-org", "date", "number"], "收购": ["sub-org", "obj-org"]}),
}


def load_records(split: str, limit: int) -> list[Record]:
    records: list[Record] = []
    for dataset, task in SOURCES:
        path = RECORDS / dataset / f"{split}.jsonl"
        if not path.exists():
            continue
        count = 0
        for row in read_jsonl(path):
            if row.get("task") == task:
                records.append(Record.from_dict(row))
                count += 1
                if count >= limit:
                    break
    return records


def benchmark_requests(n: int, seed: int) -> tuple[list[IERequest], list[str | None]]:
    """``n`` requests mixing the tasks, with their gold answers where records exist."""
    records = load_records("test", 200)
    rng = random.Random(seed)
    if records:
        by_task: dict[str, list[Record]] = {}
        for record in records:
            by_task.setdefault(record.task, []).append(record)
        tasks = sorted(by_task)
        picked = [rng.choice(by_task[tasks[i % len(tasks)]]) for i in range(n)]
        return [IERequest(r.task, r.text, r.schema) for r in picked], [render(r, r.schema) for r in picked]
    tasks = ["ner", "re", "ee"]
    requests = [
        IERequest(tasks[i % 3], SYNTHETIC_TEXTS[i % len(SYNTHETIC_TEXTS)], SYNTHETIC_SCHEMAS[tasks[i % 3]])
        for i in range(n)
    ]
    return requests, [None] * n


def training_corpus() -> list[str]:
    """Record texts and their gold answers (the answers teach the BPE JSON-ish merges)."""
    corpus: list[str] = []
    for record in load_records("train", 4000):
        corpus.append(record.text)
        if record.task in ("ner", "re", "ee"):
            corpus.append(render(record, record.schema))
    if not corpus:
        corpus = SYNTHETIC_TEXTS * 50
    return corpus


def local_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


def local_model(tokenizer: Any, hidden: int, layers: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def render_prompt(tokenizer: Any, request: IERequest) -> str:
    user = ie_user_prompt(request.task, request.text, request.schema)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"System: {SYSTEM_PROMPT}\nUser: {user}\nAssistant: "


class TimedProcessor(IEConstraintProcessor):
    """The constraint, timing its own calls (the overhead independent of the model)."""

    seconds = 0.0
    calls = 0

    def __call__(self, input_ids, scores):  # type: ignore[override]
        start = time.perf_counter()
        out = super().__call__(input_ids, scores)
        if out.device.type == "cuda":
            torch.cuda.synchronize()
        TimedProcessor.seconds += time.perf_counter() - start
        TimedProcessor.calls += 1
        return out


class GoldBias(LogitsProcessor):
    """Stands in for a trained model: pushes each row towards its gold answer (then EOS) while
    the row still follows it, so answers have realistic lengths, spans and labels, and the
    constrained and unconstrained runs decode the very same tokens."""

    def __init__(self, gold: list[list[int]], prompt_length: int, pad_id: int) -> None:
        width = max(map(len, gold))
        self.gold = torch.tensor([g + [pad_id] * (width - len(g)) for g in gold])
        self.lengths = torch.tensor([len(g) for g in gold])
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):  # type: ignore[override]
        step = input_ids.shape[1] - self.prompt_length
        if step >= self.gold.shape[1]:
            return scores
        gold = self.gold.to(scores.device)
        on_track = (input_ids[:, self.prompt_length :] == gold[:, :step]).all(dim=1)
        rows = (on_track & (self.lengths.to(scores.device) > step)).nonzero().flatten()
        scores = scores.clone()
        scores[rows, gold[rows, step]] += 1000.0
        return scores


def run(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    requests: list[IERequest],
    gold: list[str | None] | None,
    *,
    batch_size: int,
    max_new_tokens: int,
    constrained: bool,
    profiler: cProfile.Profile | None,
) -> dict[str, Any]:
    device = next(model.parameters()).device
    eos = list(token_table(tokenizer).eos_ids)
    tokenizer.padding_side = "left"
    steps = generated = 0
    TimedProcessor.seconds, TimedProcessor.calls = 0.0, 0
    valid = gold_equal = 0
    if constrained:
        clear_caches(token_tables=False)  # cold grammar caches: every request is new
    start = time.perf_counter()
    for begin in range(0, len(prompts), batch_size):
        chunk = prompts[begin : begin + batch_size]
        encoded = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        prompt_length = encoded["input_ids"].shape[1]
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "do_sample": False,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": eos,
        }
        processors: list[LogitsProcessor] = []
        if gold is not None:
            eos_id = eos[0]
            gold_ids = [
                (tokenizer.encode(g, add_special_tokens=False) if g else []) + [eos_id]
                for g in gold[begin : begin + batch_size]
            ]
            processors.append(GoldBias(gold_ids, prompt_length, tokenizer.pad_token_id))
        processor = None
        if constrained:
            processor = TimedProcessor(
                tokenizer,
                requests[begin : begin + batch_size],
                prompt_length=prompt_length,
                max_new_tokens=max_new_tokens,
            )
            processors.append(processor)
        if processors:
            kwargs["logits_processor"] = LogitsProcessorList(processors)
        if profiler is not None and constrained:
            profiler.enable()
        with torch.no_grad():
            sequences = model.generate(**encoded, **kwargs)
        if profiler is not None and constrained:
            profiler.disable()
        new = sequences[:, prompt_length:]
        steps += new.shape[1]
        for row in new.tolist():
            count = 0
            for token in row:
                count += 1
                if token in eos:
                    break
            generated += count
        if processor is not None:
            batch_gold = gold[begin : begin + batch_size] if gold is not None else []
            for index, answer in enumerate(processor.finalize(sequences)):
                json.loads(answer)
                valid += 1
                gold_equal += bool(batch_gold) and answer == batch_gold[index]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "scenario": "gold-biased" if gold is not None else "free",
        "mode": "constrained" if constrained else "unconstrained",
        "batch_size": batch_size,
        "seconds": round(seconds, 4),
        "decoding_steps": steps,
        "generated_tokens": generated,
        "tokens_per_s": round(generated / seconds, 2),
        "ms_per_generated_token": round(1000 * seconds / max(generated, 1), 4),
        "ms_per_step": round(1000 * seconds / max(steps, 1), 4),
        "batches": -(-len(prompts) // batch_size),
    }
    if constrained:
        result["constraint_ms_per_step"] = round(
            1000 * TimedProcessor.seconds / max(TimedProcessor.calls, 1), 4
        )
        result["constraint_share_of_time"] = round(TimedProcessor.seconds / seconds, 4)
        result["valid_json_answers"] = valid
        if gold is not None:
            result["answers_equal_to_gold"] = gold_equal
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, help="a saved model directory (default: random local model)")
    parser.add_argument(
        "--dtype", default="auto", help="weights: auto (this machine's fast one) | float32 | bfloat16"
    )
    parser.add_argument("--vocab-size", type=int, default=16000)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=320)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration (best)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "decoding.json")
    parser.add_argument("--profile", type=Path, help="write a cProfile of the constrained runs here")
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="leave glibc's allocator as it is (no chatuie.train.allocator)",
    )
    args = parser.parse_args()
    # As the evaluate stage runs: freed memory kept for reuse (chatuie.train.allocator), unless asked not to.
    kept_freed_memory = False if args.glibc_default else keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)

    start = time.perf_counter()
    if args.model:
        # As the evaluate stage loads it: a LoRA adapter merged into its base, in --dtype.
        args.dtype = resolve_dtype(args.dtype, where="--dtype")
        model, tokenizer = load_saved(args.model, dtype=args.dtype)
        model = merge_lora(model).eval()
        if torch.cuda.is_available():
            model = model.cuda()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model_desc = f"{args.model} ({args.dtype})"
    else:
        tokenizer = local_tokenizer(args.vocab_size)
        model = local_model(tokenizer, args.hidden, args.layers, args.seed)
        model_desc = f"random Llama hidden={args.hidden} layers={args.layers}"
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    table = token_table(tokenizer)
    table_s = time.perf_counter() - start

    requests, gold = benchmark_requests(args.prompts, args.seed)
    prompts = [render_prompt(tokenizer, r) for r in requests]
    profiler = cProfile.Profile() if args.profile else None
    # Warm up torch (first calls allocate), then measure every configuration in this process.
    run(
        model,
        tokenizer,
        prompts[:2],
        requests[:2],
        None,
        batch_size=2,
        max_new_tokens=4,
        constrained=False,
        profiler=None,
    )
    # Prompt prefill (one generated token): short constrained answers amortise it over fewer
    # steps, so per-step ratios are also given for the decode steps alone.
    prefill = {
        batch_size: min(
            run(
                model,
                tokenizer,
                prompts,
                requests,
                None,
                batch_size=batch_size,
                max_new_tokens=1,
                constrained=False,
                profiler=None,
            )["seconds"]
            for _ in range(args.repeats)
        )
        for batch_size in (1, 16)
    }

    def decode_ms_per_step(result: dict[str, Any]) -> float | None:
        seconds = result["seconds"] - prefill[result["batch_size"]]
        steps = result["decoding_steps"] - result["batches"]
        if seconds < 0.5 * result["seconds"]:  # mostly prefill: the difference is noise
            return None
        return round(1000 * seconds / max(steps, 1), 4)

    scenarios = {"gold-biased": gold, "free": None} if any(gold) else {"free": None}
    runs = []
    ratios: dict[str, dict[str, float]] = {}
    for scenario, scenario_gold in scenarios.items():
        for batch_size in (1, 16):
            # Interleaved repeats, best of each: other processes share the cores, and the
            # fastest run is the least disturbed one.
            repeats: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
            for _ in range(args.repeats):
                for mode in (False, True):
                    repeats[mode].append(
                        run(
                            model,
                            tokenizer,
                            prompts,
                            requests,
                            scenario_gold,
                            batch_size=batch_size,
                            max_new_tokens=args.max_new_tokens,
                            constrained=mode,
                            profiler=None,
                        )
                    )
            plain, constrained = (min(repeats[mode], key=lambda r: r["seconds"]) for mode in (False, True))
            for mode, result in ((False, plain), (True, constrained)):
                result["seconds_of_repeats"] = [r["seconds"] for r in repeats[mode]]
            for result in (plain, constrained):
                result["prefill_s"] = prefill[batch_size]
                result["decode_ms_per_step"] = decode_ms_per_step(result)
            runs += [plain, constrained]
            ratios[f"{scenario}/batch_{batch_size}"] = {
                "decode_time_per_step": (
                    round(constrained["decode_ms_per_step"] / plain["decode_ms_per_step"], 3)
                    if constrained["decode_ms_per_step"] and plain["decode_ms_per_step"]
                    else None
                ),
                "time_per_generated_token": round(
                    constrained["ms_per_generated_token"] / plain["ms_per_generated_token"], 3
                ),
                "time_per_step": round(constrained["ms_per_step"] / plain["ms_per_step"], 3),
            }
    if profiler is not None:  # a separate pass: profiling slows Python code down unevenly
        for scenario_gold in scenarios.values():
            for batch_size in (1, 16):
                run(
                    model,
                    tokenizer,
                    prompts,
                    requests,
                    scenario_gold,
                    batch_size=batch_size,
                    max_new_tokens=args.max_new_tokens,
                    constrained=True,
                    profiler=profiler,
                )
    result = {
        "model": model_desc,
        "tokenizer_vocab": len(tokenizer),
        "token_table_build_s": round(table_s, 3),
        "token_trie_nodes": len(table.children),
        "setup_s": round(setup_s, 2),
        "prompts": len(prompts),
        "tasks": {t: sum(r.task == t for r in requests) for t in ("ner", "re", "ee")},
        "max_new_tokens": args.max_new_tokens,
        "decoding": "greedy",
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "allocator": "keep freed memory (chatuie.train.allocator)" if kept_freed_memory else "glibc default",
        "device": "cuda" if next(model.parameters()).is_cuda else "cpu",
        "machine": platform.machine(),
        "cpu_class": current_device("cpu").describe(),
        # Other processes compete for the cores: read the timings with this in mind.
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "runs": runs,
        "ratio_constrained_over_unconstrained": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, ensure_ascii=False, indent=2))
    if profiler is not None:
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(args.profile)


if __name__ == "__main__":
    main()
