"""SFT training speed: the real SFT stage's trainer against a bare forward+backward loop, per variant.

For each variant (dtype of the base weights, LoRA or full fine-tuning, LoRA on the upper layers only,
padding-free packing instead of length-grouped batches, torch.compile), one process builds TRL's
``SFTTrainer`` exactly as the ``sft`` stage does (``chatuie.train.trainer.sft_trainer`` on the samples
the stage selects, params.yaml's ``sft`` section) and measures:

* ``bare``: ``model(**batch).loss.backward()`` + AdamW step over the trainer's own batches (its
  dataloader, its collator, its chunked loss): what the hardware gives;
* ``trainer``: ``trainer.train()`` for the same number of steps, timed between step ends.

The first step of each is warm-up and not counted. Tokens are non-padding input tokens. The process
keeps freed memory for reuse as every stage does (chatuie.train.allocator); ``--glibc-default`` measures
glibc's own allocator instead. Results go to ``bench/results/train.json``; the ratio bare / trainer
tokens/s is the trainer's overhead, and samples/s is what F1 per CPU-minute follows. Other
processes on the machine slow both loops: the load average is recorded beside the numbers.

    python -m bench.train                                   # all variants on models/base
    python -m bench.train --variants lora-bf16,lora-fp32 --steps 4
    python -m bench.train --variants lora-bf16-nodropout,lora-bf16-nodropout-answerloss \
        --out bench/results/train_kept.json           # and again with --glibc-default
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from chatuie.config import build, load_params
from chatuie.io import read_jsonl
from chatuie.models.modeling import LoraSettings, ModelConfig, load_model
from chatuie.models.precision import current_device, resolve_dtype
from chatuie.train.allocator import keep_freed_memory
from chatuie.train.trainer import SFTStageConfig, fitting_samples, sft_trainer
from tasks.sft import select_samples  # the stage's own sample selection

ROOT = Path(__file__).resolve().parents[1]

ALL_LINEAR = ["all-linear"]
# name -> (base dtype, LoRA changes (None: full fine-tuning), TeachSettings changes, compile). LoRA
# changes apply to the profile's rank and targets with peft's defaults (dropout 0.05, float32
# adapters); "upper-half" puts adapters on the upper half of the layers only.
FP32_DROPOUT = {"dropout": 0.05, "dtype": "float32"}
NO_DROPOUT = {"dropout": 0.0, "dtype": "float32"}
BF16_ADAPTERS = {"dropout": 0.0, "dtype": "base"}
VARIANTS: dict[str, tuple[str, dict[str, Any] | None, dict[str, Any], bool]] = {
    "lora-bf16": ("bfloat16", FP32_DROPOUT, {}, False),
    "lora-bf16-nodropout": ("bfloat16", NO_DROPOUT, {}, False),
    "lora-bf16-nodropout-bf16adapters": ("bfloat16", BF16_ADAPTERS, {}, False),
    "lora-bf16-bf16adapters-upper-half": ("bfloat16", {**BF16_ADAPTERS, "layers": "upper-half"}, {}, False),
    "lora-bf16-bf16adapters-packing": ("bfloat16", BF16_ADAPTERS, {"packing": True}, False),
    "lora-bf16-bf16adapters-compile": ("bfloat16", BF16_ADAPTERS, {}, True),
    # chatuie.train.answer_loss instead of TRL's chunked float32 head
    "lora-bf16-nodropout-answerloss": ("bfloat16", NO_DROPOUT, {"loss_type": "answer_nll"}, False),
    "lora-bf16-bf16adapters-answerloss": ("bfloat16", BF16_ADAPTERS, {"loss_type": "answer_nll"}, False),
    "lora-fp32": ("float32", NO_DROPOUT, {}, False),
    "lora-fp32-answerloss": ("float32", NO_DROPOUT, {"loss_type": "answer_nll"}, False),
    # the default's settings in the dtype `auto` resolves to on this machine (chatuie.models.precision)
    "lora-auto-answerloss": ("auto", NO_DROPOUT, {"loss_type": "answer_nll"}, False),
    "full-fp32": ("float32", None, {}, False),
}


class StepClock(TrainerCallback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def _lora(profile: LoraSettings | None, changes: dict[str, Any] | None, num_layers: int):
    if changes is None:
        return None
    changes = dict(changes)
    if changes.pop("layers", None) == "upper-half":
        changes["layers"] = list(range(num_layers // 2, num_layers))
    reference = profile or LoraSettings(r=16, alpha=32, target_modules=ALL_LINEAR)
    return replace(reference, **{"layers": None, **changes})


def measure(name: str, model_dir: Path, base_config: ModelConfig, stage: SFTStageConfig, samples, steps: int):
    dtype, lora_changes, train_changes, compile_model = VARIANTS[name]
    num_layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    dtype = resolve_dtype(dtype, where=f"variant {name}")
    config = replace(base_config, dtype=dtype, lora=_lora(base_config.lora, lora_changes, num_layers))
    settings = replace(stage.train, max_steps=steps, save_steps=0, logging_steps=1, **train_changes)
    model, tokenizer = load_model(config, str(model_dir))
    if compile_model:
        model = torch.compile(model)
    batch = settings.per_device_batch_size * settings.gradient_accumulation
    fitting = fitting_samples(samples[: 4 * steps * batch], tokenizer, settings.max_length)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result: dict[str, Any] = {
        "variant": name,
        "dtype": config.dtype,
        "lora": None if config.lora is None else vars(config.lora),
        "packing": settings.packing,
        "compile": compile_model,
        "batch": batch,
        "trainable_parameters": trainable,
        "load_average_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        trainer = sft_trainer(model, tokenizer, fitting, settings, scratch)
        # Bare loop: the trainer's own batches and (chunked) loss, a plain AdamW step.
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        model.train()
        times, tokens, answer_tokens = [], [], []
        for index, inputs in enumerate(trainer.get_train_dataloader()):
            if index == steps:
                break
            started = time.perf_counter()
            loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
            mask = inputs.get("attention_mask")
            tokens.append(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
            answer_tokens.append(int((inputs["labels"] != -100).sum()))
        del optimizer
        bare_s, bare_tokens = sum(times[1:]), sum(tokens[1:])
        result["bare"] = {
            "step_s": [round(t, 2) for t in times],
            "tokens_per_s": round(bare_tokens / bare_s, 1),
            "tokens_per_step": round(bare_tokens / (len(times) - 1), 1),
            "answer_token_share": round(sum(answer_tokens) / max(sum(tokens), 1), 3),
        }
        clock = StepClock()
        trainer.add_callback(clock)
        started = time.perf_counter()
        trainer.train()
        log = [e for e in trainer.state.log_history if "num_tokens" in e]
        seconds = clock.ends[-1] - clock.ends[0]
        trainer_tokens = float(log[-1]["num_tokens"]) - float(log[0]["num_tokens"])
        result["trainer"] = {
            "seconds": round(time.perf_counter() - started, 1),
            "step_s": [round(b - a, 2) for a, b in zip([started, *clock.ends], clock.ends, strict=False)],
            "tokens_per_s": round(trainer_tokens / seconds, 1),
            "samples_per_s": round(batch * (len(clock.ends) - 1) / seconds, 3),
            "final_loss": log[-1].get("loss"),
        }
    result["bare_over_trainer"] = round(result["bare"]["tokens_per_s"] / result["trainer"]["tokens_per_s"], 3)
    result["load_average_after"] = os.getloadavg()
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "base")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--samples", type=Path, default=ROOT / "data" / "samples" / "train.jsonl")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=5, help="steps per loop (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train.json")
    parser.add_argument(
        "--glibc-default",
        action="store_true",
        help="leave glibc's allocator as it is (no chatuie.train.allocator)",
    )
    args = parser.parse_args()
    kept_freed_memory = False if args.glibc_default else keep_freed_memory()
    torch.set_num_threads(args.threads)
    params = load_params(args.params)
    base_config = build(ModelConfig, params.get("model"), "params.yaml: model")
    stage = build(SFTStageConfig, params.get("sft"), "params.yaml: sft")
    samples = select_samples(list(read_jsonl(args.samples)), stage)
    results = []
    for name in args.variants.split(","):
        if name not in VARIANTS:
            parser.error(f"unknown variant {name!r} (known: {', '.join(VARIANTS)})")
        try:
            results.append(measure(name, args.model, base_config, stage, samples, args.steps))
        except Exception as err:  # a variant that cannot run here (e.g. compile) is reported, not fatal
            results.append({"variant": name, "error": f"{type(err).__name__}: {err}"[:500]})
            print(json.dumps(results[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": str(args.model),
        "threads": args.threads,
        "steps": args.steps,
        "allocator": "keep freed memory (chatuie.train.allocator)" if kept_freed_memory else "glibc default",
        "machine": {
            "cpus": os.cpu_count(),
            "cpu_class": current_device("cpu").describe(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
