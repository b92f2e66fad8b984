"""Stage `sft`: supervised fine-tuning on IE instructions plus a replay share of QA samples.

Checkpoints go to models/checkpoints/sft (kept across runs: a killed run resumes from the last
one); the final model to models/sft/, the loss curve to metrics/train/sft_loss.csv (dvc plots).
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

from chatuie.data.prompts import save_prompt_options
from chatuie.data.samples import SamplesConfig
from chatuie.data.splits import is_heldout
from chatuie.io import read_jsonl, write_json
from chatuie.models.modeling import ModelConfig, load_model, merge_lora, save_model
from chatuie.models.precision import resolve_dtype
from chatuie.train.launch import decided_by_main, is_main_process, relaunch
from chatuie.train.trainer import SFTStageConfig, claim_checkpoints, file_digest, train_sft
from tasks._stage import record_precision, run, section, set_threads
from tasks.base import write_loss_curve


def select_samples(samples: list[dict], config: SFTStageConfig) -> list[dict]:
    rng = random.Random(config.seed)
    chosen: list[dict] = []
    for dataset in config.datasets:
        rows = [
            s for s in samples if s["dataset"] == dataset and not is_heldout(s["record_id"], config.heldout)
        ]
        if config.max_samples_per_dataset and len(rows) > config.max_samples_per_dataset:
            rows = rng.sample(rows, config.max_samples_per_dataset)
        chosen.extend(rows * config.repeats.get(dataset, 1))
    qa = [s for s in samples if s["dataset"] in config.qa_datasets]
    replay = min(len(qa), round(config.qa_replay_fraction * len(chosen)))
    chosen.extend(rng.sample(qa, replay))
    rng.shuffle(chosen)
    return chosen


def main() -> None:
    model_config = section("model", ModelConfig)
    config = section("sft", SFTStageConfig)
    set_threads(config.threads)
    batch = (config.train.per_device_batch_size, config.train.gradient_accumulation)
    if relaunch(config.launch, batch=batch):  # processes > 1: the workers trained, rank 0 wrote outputs
        return
    started = time.monotonic()
    dtype = resolve_dtype(model_config.dtype, where="params.yaml: model.dtype")
    precision = record_precision("model.dtype", model_config.dtype, dtype)
    model_config = dataclasses.replace(model_config, dtype=dtype)
    samples = select_samples(list(read_jsonl(Path("data/samples/train.jsonl"))), config)
    # LoRA (if configured) wraps the saved base; the tiny default trains all weights.
    model, tokenizer = load_model(model_config, "models/base")
    checkpoints = Path("models/checkpoints/sft")
    identity = {
        "model": model_config,
        "sft": config,
        "samples": [s["id"] for s in samples],
        "base": file_digest("models/base"),
    }
    resume = decided_by_main(claim_checkpoints, checkpoints, identity, cpu=config.train.device == "cpu")
    result = train_sft(model, tokenizer, samples, config.train, checkpoints, resume=resume)
    if not is_main_process():
        return
    model = result.model
    if config.merge_lora:
        model = merge_lora(model)
    save_model(model, tokenizer, Path("models/sft"))
    # The prompt style the model learnt travels with it (chatuie extract / serve / the registry).
    save_prompt_options(Path("models/sft"), section("samples", SamplesConfig).chat)
    write_loss_curve(Path("metrics/train/sft_loss.csv"), result.loss_log)
    metrics = {
        "samples": len(samples),
        "too_long": result.too_long,
        "steps": result.global_step,
        "resumed_from_step": int(result.resumed_from.rsplit("-", 1)[1]) if result.resumed_from else 0,
        "final_loss": result.loss_log[-1]["loss"] if result.loss_log else None,
        "seconds": round(time.monotonic() - started, 1),
        "seconds_per_step": result.seconds_per_step,
        "precision": precision,
    }
    write_json(Path("metrics/train/sft.json"), metrics)
    print(metrics)


if __name__ == "__main__":
    run(main)
