"""Throughput and latency of the server's /v1/extract, with server-side batching on and off.

For each setting (batching on / off) a server runs in this process (uvicorn in a thread, a free
127.0.0.1 port); clients send ``--requests`` extraction requests at concurrency 1 and 8 (one
keep-alive HTTP connection per client thread), each with a distinct text, after an unmeasured
warm-up of both settings. Reported per run: requests/s, p50 / p95 latency, CPU time per request
(the whole process, and the model thread alone), the batches the server decoded; and the speedup
of batching at concurrency 8: requests/s on / off, and model-thread CPU per request off / on,
which holds up when other processes load the machine. Results go to
``bench/results/serve.json`` and stdout.

Model: ``--model DIR`` (a saved model directory), else ``models/sft`` if present, else a tiny
model built here (byte-level BPE trained on the benchmark texts, a random Llama): no hub.

    python -m bench.serve
    python -m bench.serve --model models/sft --requests 64
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from chatuie.data.prompts import SYSTEM_PROMPT, ie_user_prompt
from chatuie.data.schema import ExtractionSchema
from chatuie.models.modeling import TinyModelConfig, build_tiny_model, load_saved, train_tokenizer
from chatuie.serve.extractor import Extractor, ExtractSettings
from chatuie.serve.server import BackgroundServer, create_app
from chatuie.serve.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "张三,男,1975年出生,现任北京东方金钰有限公司董事长,曾在中国人民银行工作。",
    'John Smith works for IBM in New York; he said "hello" to Mary Jones in Boston.',
    "东方金钰于2019年3月5日将其持有的1000万股股份质押给中信证券,占其总股本的3.5%。",
    "The Hakawati Theatre in Arab east Jerusalem showed portraits of Palestinians.",
]
SCHEMAS = [
    {"entities": ["NAME", "ORG", "LOC", "TITLE", "EDU"]},
    {"entities": ["Peop", "Org", "Loc"], "relations": [{"type": "Work_For", "head": "Peop", "tail": "Org"}]},
    {"events": {"质押": ["质押方", "质押物", "质权方"], "投资": ["sub", "obj"]}},
    {"entities": ["Peop", "Org", "Loc", "Other"]},
]


def tiny_model() -> tuple[Any, Any, str]:
    corpus = [SYSTEM_PROMPT, "system\nuser\nassistant\n", *TEXTS]
    for text, schema in zip(TEXTS, SCHEMAS, strict=True):
        parsed = ExtractionSchema.from_dict(schema)
        corpus += [ie_user_prompt(task, text, sub) for task, sub in parsed.tasks()]
    config = TinyModelConfig(hidden_size=128, intermediate_size=352, num_layers=4, vocab_size=2000, seed=13)
    tokenizer = train_tokenizer(corpus * 5, config.vocab_size, min_frequency=2)
    model = build_tiny_model(config, tokenizer).eval()
    name = f"random Llama hidden={config.hidden_size} layers={config.num_layers} vocab={len(tokenizer)}"
    return model, tokenizer, name


def payload(i: int) -> dict[str, Any]:
    # A distinct text per request: its grammar is built afresh, as for real traffic.
    return {"text": f"{TEXTS[i % len(TEXTS)]} (case {i})", "schema": SCHEMAS[i % len(SCHEMAS)]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def drive(url: str, requests: int, concurrency: int, offset: int) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    cpu_started = time.process_time()
    lock = threading.Lock()
    counter = iter(range(requests))

    def client() -> None:
        with httpx.Client(base_url=url, timeout=300) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                started = time.perf_counter()
                response = http.post("/v1/extract", json=payload(offset + i))
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    if response.status_code != 200:
                        errors.append(f"{response.status_code}: {response.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started  # this process's CPU: robust to load from elsewhere
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[0]}")
    return {
        "requests": requests,
        "seconds": round(wall, 3),
        "requests_per_s": round(requests / wall, 2),
        "p50_ms": round(1000 * percentile(latencies, 50), 1),
        "p95_ms": round(1000 * percentile(latencies, 95), 1),
        "mean_ms": round(1000 * statistics.fmean(latencies), 1),
        "cpu_ms_per_request": round(1000 * cpu / requests, 1),
        "latencies": latencies,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", help="saved model directory (default: models/sft, else a tiny random model)"
    )
    parser.add_argument("--requests", type=int, default=24, help="requests per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting (the median is reported)")
    parser.add_argument("--warmup", type=int, default=24, help="unmeasured requests per mode and concurrency")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-window-ms", type=float, default=15.0)
    parser.add_argument("--max-batch-size", type=int, default=8)
    # One torch thread: on a small shared machine, OpenMP threads competing with other processes
    # (and with the server's own threads) make timings swing several-fold.
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    source = args.model or (str(ROOT / "models" / "sft") if (ROOT / "models" / "sft").is_dir() else None)
    if source:
        model, tokenizer = load_saved(source)
        description = f"saved model {source}"
    else:
        model, tokenizer, description = tiny_model()
    extractor = Extractor(model, tokenizer, ExtractSettings(max_new_tokens=args.max_new_tokens), name="bench")

    def settings(batching: bool) -> ServerSettings:
        return ServerSettings(
            model_name="bench",
            batching=batching,
            batch_window_ms=args.batch_window_ms,
            max_batch_size=args.max_batch_size,
        )

    # Warm-up, both modes, before anything is measured: the first requests of a process pay for
    # the token table and for torch's per-shape kernel setup (several times slower at first).
    for batching in (True, False):
        with BackgroundServer(create_app(extractor, settings(batching))) as url:
            for concurrency in (8, 1):
                drive(url, args.warmup, concurrency, offset=100_000 + 10_000 * batching + 1000 * concurrency)

    # Repeats interleave the settings, so a burst of load from elsewhere hits all of them alike;
    # a setting reports the median of its repeats (latencies pooled over them).
    measured: dict[tuple[bool, int], list[dict[str, Any]]] = {}
    offset = 0
    for _ in range(args.repeats):
        for batching in (True, False):
            app = create_app(extractor, settings(batching))
            with BackgroundServer(app) as url:
                for concurrency in (1, 8):
                    before = dict(app.state.worker.stats)
                    result = drive(url, args.requests, concurrency, offset)
                    offset += args.requests
                    after = app.state.worker.stats
                    result["batches"] = after["batches"] - before["batches"]
                    # The model thread's own CPU per request: what batching saves, untouched by
                    # the HTTP clients of this process or by load from elsewhere.
                    model_cpu = after["extract_cpu_s"] - before["extract_cpu_s"]
                    result["model_cpu_ms_per_request"] = round(1000 * model_cpu / args.requests, 1)
                    measured.setdefault((batching, concurrency), []).append(result)
                    shown = {k: v for k, v in result.items() if k != "latencies"}
                    print(json.dumps({"batching": batching, "concurrency": concurrency, **shown}))
    runs = []
    for (batching, concurrency), results in measured.items():
        latencies = [x for r in results for x in r.pop("latencies")]
        batches = sum(r["batches"] for r in results)
        runs.append(
            {
                "batching": batching,
                "concurrency": concurrency,
                "requests": sum(r["requests"] for r in results),
                "repeats": len(results),
                "requests_per_s": round(statistics.median(r["requests_per_s"] for r in results), 2),
                "requests_per_s_each": [r["requests_per_s"] for r in results],
                "p50_ms": round(1000 * percentile(latencies, 50), 1),
                "p95_ms": round(1000 * percentile(latencies, 95), 1),
                "mean_ms": round(1000 * statistics.fmean(latencies), 1),
                "cpu_ms_per_request": round(statistics.median(r["cpu_ms_per_request"] for r in results), 1),
                "model_cpu_ms_per_request": round(
                    statistics.median(r["model_cpu_ms_per_request"] for r in results), 1
                ),
                "batches": batches,
                "mean_batch_size": round(sum(r["requests"] for r in results) / batches, 2),
            }
        )

    def cpu(batching: bool, concurrency: int) -> float:
        return next(
            r["model_cpu_ms_per_request"]
            for r in runs
            if r["batching"] == batching and r["concurrency"] == concurrency
        )

    def rps(batching: bool, concurrency: int) -> float:
        return next(
            r["requests_per_s"] for r in runs if r["batching"] == batching and r["concurrency"] == concurrency
        )

    report = {
        "model": description,
        "max_new_tokens": args.max_new_tokens,
        "batch_window_ms": args.batch_window_ms,
        "max_batch_size": args.max_batch_size,
        "requests_per_run": args.requests,
        "repeats": args.repeats,
        "warmup_requests": args.warmup,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
        "machine": platform.machine(),
        "runs": runs,
        "batching_speedup_c8": round(rps(True, 8) / rps(False, 8), 2),
        "batching_speedup_c1": round(rps(True, 1) / rps(False, 1), 2),
        # The model thread's CPU time per request, off / on: the work batching saves, whatever
        # else the machine runs.
        "batching_model_cpu_saving_c8": round(cpu(False, 8) / cpu(True, 8), 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
