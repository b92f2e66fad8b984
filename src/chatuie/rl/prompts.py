"""RL prompts: the SFT instructions of training records (system + user turns), with their gold."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from chatuie.data.prompts import ChatOptions
from chatuie.data.records import Record
from chatuie.reward.model import PairTokenizer
from chatuie.reward.pairs import instructions, sample_records


def rl_prompts(
    records: Sequence[Record], chat: ChatOptions, max_prompts_per_dataset: int, seed: int
) -> list[dict[str, Any]]:
    """RL prompts: SFT instructions of ``records`` (a seeded sample per dataset), with their gold.

    Each row: ``id, dataset, task, text, schema`` (JSON string: Arrow wants one column type),
    ``gold`` (the answer string) and ``prompt`` (system + user messages).
    """
    by_dataset: dict[str, list[Record]] = {}
    for record in records:
        by_dataset.setdefault(record.dataset, []).append(record)
    rows = []
    for dataset, group in by_dataset.items():
        found = [
            {
                "id": inst.id,
                "dataset": dataset,
                "task": inst.record.task,
                "text": inst.record.text,
                "schema": json.dumps(inst.schema.to_dict(), ensure_ascii=False),
                "gold": inst.gold(),
                "prompt": inst.messages(),
            }
            for inst in instructions(group, chat)
        ]
        rows.extend(sample_records(found, max_prompts_per_dataset, seed, dataset))
    return rows


def prompt_lengths(tokenizer, prompts: Sequence[dict[str, Any]]) -> list[int]:
    encode = PairTokenizer(tokenizer)
    return [len(encode.prompt_ids(p["prompt"])) for p in prompts]
