"""Stage `reward_data`: preference pairs for the reward model (data/reward/).

* Confusing negatives from gold: train records of the IE datasets, each instruction's gold answer
  against one-mistake variants (label swaps weighted by the SFT model's own confusions, read from
  reports/eval/sft/predictions.*.jsonl when present).
* Judge-scored predictions: on records the SFT model did not train on (the held-out slice of the
  training splits, ``sft.heldout``, or ``reward_data.judged.split``), the SFT model samples k
  grounded answers per instruction, the judge (``judge`` section) scores them, best vs worst make
  a pair. The judge cache (data/judge_cache.jsonl) persists across runs: a rerun makes no calls
  for answers already scored.

Writes data/reward/pairs.jsonl (``split``: train / eval, by record), data/reward/judged.jsonl
(every scored answer) and metrics/reward_data.json (counts per type, judge calls, cache hits).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from chatuie.config import ConfigError
from chatuie.data.records import Record, load_records
from chatuie.data.samples import SamplesConfig
from chatuie.data.splits import HeldoutSplit, is_heldout
from chatuie.io import write_json, write_jsonl
from chatuie.reward.judge import Judge
from chatuie.reward.judge_types import JudgeConfig
from chatuie.reward.negatives import ConfusionTable
from chatuie.reward.pairs import (
    Instruction,
    RewardDataConfig,
    instructions,
    judge_items,
    judged_pairs,
    negative_pairs,
    sample_answers,
    sample_records,
)
from chatuie.train.trainer import SFTStageConfig
from tasks._stage import record_precision, run, section, set_threads

RECORDS = Path("data/records")
OUT = Path("data/reward")


def configs() -> tuple[RewardDataConfig, HeldoutSplit, JudgeConfig]:
    # The held-out slice is the sft stage's (sft.heldout): both stages must agree on it.
    heldout = section("sft", SFTStageConfig).heldout
    return section("reward_data", RewardDataConfig), heldout, section("judge", JudgeConfig)


def judged_instructions(
    config: RewardDataConfig, heldout: HeldoutSplit, chat: Any
) -> tuple[list[Instruction], dict[str, int]]:
    """The instructions the SFT model answers for the judge, per dataset a seeded sample."""
    settings = config.judged
    jobs: list[Instruction] = []
    records_used: dict[str, int] = {}
    for dataset in config.datasets:
        if settings.split == "heldout":
            records = [
                r for r in load_records(RECORDS / dataset / "train.jsonl") if is_heldout(r.id, heldout)
            ]
        else:
            path = RECORDS / dataset / f"{settings.split}.jsonl"
            if not path.exists():
                raise ConfigError(f"params.yaml: reward_data.judged.split: {path} does not exist")
            records = load_records(path)
        found = list(instructions(records, chat))
        chosen = sample_records(found, settings.max_prompts_per_dataset, settings.seed, f"judged:{dataset}")
        records_used[dataset] = len({inst.record.id for inst in chosen})
        jobs.extend(chosen)
    return jobs, records_used


def main() -> None:
    config, heldout, judge_config = configs()
    chat = section("samples", SamplesConfig).chat
    set_threads(config.threads)
    started = time.monotonic()
    confusion = ConfusionTable.from_eval_dir(config.confusions_from) if config.confusions_from else None
    metrics: dict[str, Any] = {
        "confusions": {"source": config.confusions_from or None, "pairs_observed": 0, "top": []},
    }
    if confusion:
        metrics["confusions"].update(pairs_observed=sum(confusion.counts.values()), top=confusion.top(10))

    # Confusing negatives from gold training records.
    pairs: list[dict[str, Any]] = []
    records_per_dataset: dict[str, int] = {}
    for dataset in config.datasets:
        records: list[Record] = load_records(RECORDS / dataset / "train.jsonl")
        chosen = sample_records(records, config.max_records_per_dataset, config.seed, f"negatives:{dataset}")
        records_per_dataset[dataset] = len(chosen)
        pairs.extend(
            negative_pairs(
                chosen,
                chat,
                config.negatives,
                confusion,
                eval_fraction=config.eval_fraction,
                seed=config.seed,
            )
        )
    negatives = [p for p in pairs if p["source"] == "negative"]
    metrics["negatives"] = {
        "records": records_per_dataset,
        "pairs": len(negatives),
        "by_type": dict(sorted(Counter(p["type"] for p in negatives).items())),
        "by_dataset": dict(sorted(Counter(p["dataset"] for p in negatives).items())),
    }

    # Judge-scored SFT predictions on records the SFT model did not train on.
    judged_rows: list[dict[str, Any]] = []
    metrics["judged"] = {"enabled": config.judged.enabled, "split": config.judged.split}
    if config.judged.enabled:
        jobs, records_used = judged_instructions(config, heldout, chat)
        metrics["judged"].update(records=records_used, prompts=len(jobs))
        if jobs:
            from chatuie.models.modeling import load_saved
            from chatuie.models.precision import resolve_dtype

            # Sampled in this machine's fast dtype, whatever the SFT weights were saved in.
            dtype = resolve_dtype("auto")
            metrics["judged"]["precision"] = record_precision("reward_data.dtype", "auto", dtype)
            model, tokenizer = load_saved(Path("models/sft"), dtype=dtype)
            answers = sample_answers(model, tokenizer, jobs, config.judged)
            items = judge_items(jobs, answers)
            with Judge(judge_config) as judge:
                results, stats = judge.score_all(items)
            found = judged_pairs(
                jobs,
                answers,
                results,
                config.judged.margin,
                eval_fraction=config.eval_fraction,
                seed=config.seed,
            )
            pairs.extend(found)
            judged_rows = [
                {
                    "id": item.id,
                    "task": item.task,
                    "candidate": item.candidate,
                    "score": result.score,
                    "status": result.status,
                    "reason": result.reason,
                }
                for item, result in zip(items, results, strict=True)
            ]
            metrics["judged"].update(
                answers=len(items),
                distinct_answers=len({(i.id.rsplit("/", 1)[0], i.candidate) for i in items}),
                pairs=len(found),
                judge={"provider": judge_config.provider, "model": judge_config.model, **stats.to_dict()},
            )

    write_jsonl(OUT / "pairs.jsonl", pairs)
    write_jsonl(OUT / "judged.jsonl", judged_rows)
    metrics["pairs"] = {
        "total": len(pairs),
        "train": sum(p["split"] == "train" for p in pairs),
        "eval": sum(p["split"] == "eval" for p in pairs),
        "by_source": dict(sorted(Counter(p["source"] for p in pairs).items())),
    }
    metrics["seconds"] = round(time.monotonic() - started, 1)
    write_json(Path("metrics/reward_data.json"), metrics)
    print({"pairs": metrics["pairs"], "judge": metrics["judged"].get("judge")})


if __name__ == "__main__":
    run(main)
