"""Stage `evaluate <model>`: IE F1 with the constraint on and off, chat ability; foreach model.

Writes metrics/<model>.json (DVC metrics), reports/eval/<model>/per_label.csv, predictions (per
IE record and per chat question), and rows of metrics/f1_by_dataset/<model>.csv for the
F1-per-dataset plot.
"""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import replace
from pathlib import Path

from chatuie.config import ConfigError
from chatuie.data.prompts import ChatOptions
from chatuie.data.records import load_records
from chatuie.data.samples import SamplesConfig
from chatuie.eval.evaluation import (
    EvaluateStageConfig,
    _subsample,
    evaluate_ceval,
    evaluate_dataset,
    evaluate_webqa,
    protocol_digest,
)
from chatuie.io import atomic_open, write_json, write_jsonl
from chatuie.models.modeling import load_saved, merge_lora
from chatuie.models.precision import resolve_dtype
from tasks._stage import record_precision, run, section, set_threads

IE_TEST = {"resume": "test", "conll04": "test", "fewfc": "test"}


def main() -> None:
    name = sys.argv[1]
    config = section("evaluate", EvaluateStageConfig)
    chat: ChatOptions = section("samples", SamplesConfig).chat
    set_threads(config.threads)
    # auto decodes in this machine's fast dtype; the resolved name goes into the protocol digest,
    # so metrics decoded in bfloat16 and in float32 are never compared as one protocol.
    dtype = resolve_dtype(config.settings.dtype, where="params.yaml: evaluate.settings.dtype")
    precision = record_precision("evaluate.settings.dtype", config.settings.dtype, dtype)
    settings = replace(config.settings, dtype=dtype)
    modes = config.modes_for(name)
    started = time.monotonic()
    # A LoRA adapter is folded into its base: one matmul per layer instead of three at every step.
    model, tokenizer = load_saved(Path("models") / name, dtype=settings.dtype)
    model = merge_lora(model)
    out_dir = Path("reports/eval") / name
    metrics: dict = {"ie": {}, "chat": {}}
    label_rows: list[dict] = []
    plot_rows: list[dict] = []
    if config.zero_shot:
        metrics["zero_shot"] = {}
    for key, datasets in (("ie", config.datasets), ("zero_shot", config.zero_shot)):
        for dataset in datasets:
            path = Path("data/records") / dataset / f"{IE_TEST.get(dataset, 'test')}.jsonl"
            if not path.exists():
                raise ConfigError(f"params.yaml: evaluate.{key}: {dataset!r} has no test records ({path})")
            records = load_records(path)
            results = {}
            for mode in modes:  # full split or seeded sample, per mode (evaluate.full_split_modes)
                mode_settings = replace(config.settings_for(name, mode), dtype=dtype)
                results.update(evaluate_dataset(model, tokenizer, records, chat, mode_settings, [mode]))
            for mode, (result, rows, predictions) in results.items():
                metrics[key].setdefault(dataset, {})[mode] = result
                label_rows.extend({"dataset": dataset, "mode": mode, **row} for row in rows)
                write_jsonl(out_dir / f"predictions.{dataset}.{mode}.jsonl", predictions)
                plot_rows.append({"model": name, "dataset": f"{dataset}/{mode}", "f1": result["f1"]})
    # Per-question rows too: what rl_compare and the gate resample for chat-metric intervals.
    chat_sets = (("webqa", "test", evaluate_webqa), ("ceval", "val", evaluate_ceval))
    for dataset, split, evaluate_chat in chat_sets:
        questions = load_records(Path("data/records") / dataset / f"{split}.jsonl")
        chosen = _subsample(questions, settings.max_chat_examples, settings.seed)
        metrics["chat"][dataset], rows = evaluate_chat(model, tokenizer, chosen, chat, settings)
        write_jsonl(out_dir / f"predictions.{dataset}.jsonl", rows)
    metrics["summary"] = {
        **{f"f1_{d}_{m}": metrics["ie"][d][m]["f1"] for d in config.datasets for m in modes},
        "mean_ie_f1": round(
            sum(metrics["ie"][d][modes[0]]["f1"] for d in config.datasets) / len(config.datasets), 2
        ),
        "webqa_rouge1": metrics["chat"]["webqa"]["rouge1_char_f1"],
        "ceval_accuracy": metrics["chat"]["ceval"]["accuracy"],
        "eval_protocol": protocol_digest(config.datasets, modes, settings, config.full_split_modes.get(name)),
    }
    for dataset in config.zero_shot:
        for mode in modes:
            metrics["summary"][f"zero_shot_f1_{dataset}_{mode}"] = metrics["zero_shot"][dataset][mode]["f1"]
    metrics["seconds"] = round(time.monotonic() - started, 1)
    metrics["precision"] = precision
    with atomic_open(out_dir / "per_label.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(label_rows[0]))
        writer.writeheader()
        writer.writerows(label_rows)
    with atomic_open(Path("metrics/f1_by_dataset") / f"{name}.csv") as handle:
        writer = csv.DictWriter(handle, fieldnames=["model", "dataset", "f1"])
        writer.writeheader()
        writer.writerows(plot_rows)
    write_json(Path("metrics") / f"{name}.json", metrics)
    print(metrics["summary"])


if __name__ == "__main__":
    # glibc's allocator as it is: decoding grows each KV cache a step at a time, and with freed memory
    # kept (no mmap, no trim) every larger buffer extended the heap; evaluate@sft was killed at 24.0 GB
    # (C-Eval, its last part), while with glibc's defaults it peaks at ~7 GB, ~25 % slower to decode.
    run(main, reuse_freed_memory=False)
