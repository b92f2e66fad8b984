"""Stage `rl`: RL from the SFT model under a KL penalty (models/rl/); `rl.algorithm`: ppo | grpo.

``python -m tasks.rl`` trains on instructions of the IE datasets' training records and saves the
policy with ``save_model`` (so ``tasks/evaluate.py rl`` works unchanged); metrics/rl_train.json
has the algorithm, steps, reward at the start and end, KL and seconds.

Checkpoints go to models/checkpoints/rl every ``rl.save_steps`` updates (kept across runs: a killed
run resumes from the last one; a run with other params, prompts, SFT or reward model starts afresh).

What RL changed over SFT is stage `rl_compare` (tasks/rl_compare.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from chatuie.config import ConfigError
from chatuie.data.prompts import save_prompt_options
from chatuie.data.records import load_records
from chatuie.data.samples import SamplesConfig
from chatuie.io import write_json
from chatuie.models.modeling import full_weights, load_saved, merge_lora, save_model
from chatuie.reward.model import load_reward_model
from chatuie.rl.config import RLConfig
from chatuie.rl.grpo import train_grpo
from chatuie.rl.ppo import train_ppo
from chatuie.rl.prompts import prompt_lengths, rl_prompts
from chatuie.rl.trainer import summarize
from chatuie.train.trainer import TrainingProgress, claim_checkpoints, file_digest
from tasks._stage import run, section, set_threads

SFT = Path("models/sft")
RM = Path("models/rm")
OUT = Path("models/rl")
CHECKPOINTS = Path("models/checkpoints/rl")


def train() -> None:
    config = section("rl", RLConfig)
    chat = section("samples", SamplesConfig).chat
    set_threads(config.threads)
    started = time.monotonic()
    records = [r for d in config.datasets for r in load_records(Path("data/records") / d / "train.jsonl")]
    prompts = rl_prompts(records, chat, config.max_prompts_per_dataset, config.seed)
    policy, tokenizer = load_saved(SFT, trainable=True, dtype="float32")
    lengths = prompt_lengths(tokenizer, prompts)
    fitting = [p for p, n in zip(prompts, lengths, strict=True) if n <= config.max_prompt_length]
    if not fitting:
        raise ConfigError(f"no RL prompt fits rl.max_prompt_length={config.max_prompt_length}")
    reward_model, _ = load_reward_model(RM)
    identity = {
        "rl": config,
        "chat": chat,
        "prompts": [p["id"] for p in fitting],
        "sft": file_digest(SFT),
        "rm": file_digest(RM),
    }
    resume = claim_checkpoints(CHECKPOINTS, identity)
    try:
        if config.algorithm == "ppo":
            # PPO trains every weight: a LoRA SFT model is merged first (policy and reference alike).
            policy = full_weights(policy)
            ref_policy = merge_lora(load_saved(SFT, dtype="float32")[0])
            value_model, _ = load_reward_model(RM)  # the critic starts from the reward model
            models = (policy, ref_policy, reward_model, value_model, tokenizer)
            progress = [TrainingProgress("rl", unit="update")]
            result = train_ppo(*models, fitting, config, CHECKPOINTS, resume=resume, callbacks=progress)
        else:
            progress = [TrainingProgress("rl")]
            models = (policy, tokenizer, reward_model)
            result = train_grpo(*models, fitting, config, CHECKPOINTS, resume=resume, callbacks=progress)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    save_model(result.model, tokenizer, OUT)
    save_prompt_options(OUT, chat)
    metrics = {
        **summarize(result, config),
        "prompts": len(fitting),
        "prompts_too_long": len(prompts) - len(fitting),
        "seconds_total": round(time.monotonic() - started, 1),
    }
    write_json(Path("metrics/rl_train.json"), metrics)
    print({k: v for k, v in metrics.items() if k != "log"})


if __name__ == "__main__":
    # glibc's allocator as it is: PPO holds its models and full-vocabulary logits at once, and kept
    # freed memory raised its peak from 21.1 to 23.7 GB on this 24 GB machine (3:58 instead of 4:37).
    run(train, reuse_freed_memory=False)
