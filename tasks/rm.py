"""Stage `rm`: the reward model (models/rm/), TRL RewardTrainer on data/reward/pairs.jsonl.

A one-logit sequence-classification head on the SFT model, trained on the ``train`` pairs;
pairwise accuracy (chosen scored above rejected) on the held-out ``eval`` pairs, before and after
training, overall, per negative type and per dataset, goes to metrics/rm.json; the loss curve to
metrics/train/rm_loss.csv.
"""

from __future__ import annotations

import time
from pathlib import Path

from chatuie.config import ConfigError
from chatuie.io import atomic_open, read_jsonl, write_json
from chatuie.models.precision import resolve_autocast
from chatuie.reward.model import (
    RMStageConfig,
    load_reward_base,
    pairwise_accuracy,
    save_reward_model,
    train_reward_model,
)
from chatuie.reward.pairs import sample_records
from chatuie.train.launch import is_main_process, relaunch
from tasks._stage import record_precision, run, section, set_threads

OUT = Path("models/rm")


def main() -> None:
    config = section("rm", RMStageConfig)
    set_threads(config.threads)
    batch = (config.train.per_device_batch_size, config.train.gradient_accumulation)
    if relaunch(config.launch, batch=batch):  # processes > 1: the workers trained, rank 0 wrote outputs
        return
    settings = config.train
    started = time.monotonic()
    autocast = resolve_autocast(settings.bf16, where="params.yaml: rm.train.bf16")
    precision = record_precision("rm.train.bf16", settings.bf16, autocast)
    pairs = list(read_jsonl(Path("data/reward/pairs.jsonl")))
    train = [p for p in pairs if p["split"] == "train"]
    held = [p for p in pairs if p["split"] == "eval"]
    if not train:
        raise ConfigError("data/reward/pairs.jsonl has no training pairs: raise reward_data sizes")
    try:
        model, tokenizer = load_reward_base(Path("models/sft"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    main = is_main_process()  # data-parallel: rank 0 alone measures and writes
    before = {}
    if main:
        zero_head = not any(bool(p.any()) for p in model.score.parameters())
        # A zero score head ties every pair: 50 % by construction, no pass over the pairs needed.
        before = (
            {"accuracy": 50.0}
            if zero_head
            else pairwise_accuracy(model, tokenizer, held, settings.eval_batch_size, settings.max_length)
        )
    result = train_reward_model(model, tokenizer, train, settings)
    if not main:
        return
    model = result.model
    after = pairwise_accuracy(model, tokenizer, held, settings.eval_batch_size, settings.max_length)
    fit = sample_records(train, config.train_accuracy_pairs, settings.seed, "rm-fit")
    train_accuracy = (
        pairwise_accuracy(model, tokenizer, fit, settings.eval_batch_size, settings.max_length)["accuracy"]
        if fit
        else None
    )
    save_reward_model(model, tokenizer, OUT)
    with atomic_open(Path("metrics/train/rm_loss.csv")) as handle:
        handle.write("step,loss\n")
        for entry in result.loss_log:
            handle.write(f"{entry['step']},{entry['loss']:.6f}\n")
    metrics = {
        "pairs": {"train": len(train), "eval": len(held), "too_long": result.too_long},
        "steps": result.global_step,
        "final_loss": result.loss_log[-1]["loss"] if result.loss_log else None,
        "accuracy": after["accuracy"],
        "accuracy_before": before["accuracy"],
        "train_accuracy": train_accuracy,
        "eval": after,
        "seconds": round(time.monotonic() - started, 1),
        "precision": precision,
    }
    write_json(Path("metrics/rm.json"), metrics)
    print({k: metrics[k] for k in ("pairs", "steps", "accuracy", "accuracy_before", "train_accuracy")})


if __name__ == "__main__":
    run(main)
