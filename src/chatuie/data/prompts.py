"""Record -> chat messages: what the model is taught and asked.

Same record + same options -> same bytes (label shuffling is seeded by the record id).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatuie.data.answers import render
from chatuie.data.records import Record, Schema

SYSTEM_PROMPT = (
    "You are ChatUIE, an assistant that answers questions and extracts information. "
    "For extraction, copy every span exactly from the text and use only the given labels."
)

_FORMAT_HINT = {
    "ner": '{"<entity type>": ["<span>", ...], ...}',
    "re": '{"entities": {"<entity type>": ["<span>", ...]}, '
    '"relations": {"<relation type>": [{"head": "<span>", "tail": "<span>"}]}}',
    "ee": '{"<event type>": [{"trigger": "<span>", "arguments": {"<role>": ["<span>", ...]}}]}',
}
_TASK_NAME = {"ner": "named entity recognition", "re": "relation extraction", "ee": "event extraction"}


@dataclass(frozen=True)
class ChatOptions:
    """How IE instructions are built (``samples`` section of params.yaml)."""

    shuffle_labels: bool = False
    # Fraction of the labels absent from a record that still go into its schema (1.0 = all).
    absent_label_rate: float = 1.0
    # Split a schema into instructions of at most this many labels (0 = never split).
    max_labels_per_instruction: int = 0
    # A system turn and an answer-format hint help real chat models; a tiny model built here
    # learns the format from the answers, and every prompt token costs CPU time.
    system_prompt: bool = True
    format_hint: bool = True
    # List each event type's roles in the prompt. The constraint enforces roles either way; FewFC's
    # full role list is ~300 tokens a prompt, most of a tiny model's training compute.
    event_roles_in_prompt: bool = True
    seed: int = 13


def _rng(record_id: str, seed: int, salt: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{salt}:{record_id}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _schema_labels(schema: Schema, task: str) -> list[str]:
    """The labels an instruction chooses among (relation types for re, event types for ee)."""
    if task == "ner":
        return list(schema.entities)
    if task == "re":
        return list(schema.relations)
    return list(schema.events)


def _present_labels(record: Record) -> set[str]:
    if record.task == "ner":
        return {e.type for e in record.entities}
    if record.task == "re":
        return {r.type for r in record.relations}
    return {e.type for e in record.events}


def _subschema(schema: Schema, task: str, labels: list[str]) -> Schema:
    if task == "ner":
        return Schema(entities=labels)
    if task == "re":
        # Entity types always travel whole with relations: heads and tails need their types.
        return Schema(entities=list(schema.entities), relations=labels)
    return Schema(events={label: list(schema.events[label]) for label in labels})


def instruction_schemas(record: Record, options: ChatOptions, *, train: bool) -> list[Schema]:
    """The schema of each instruction made from ``record`` (several when the schema is split)."""
    labels = _schema_labels(record.schema, record.task)
    if train:
        present = _present_labels(record)
        rng = _rng(record.id, options.seed, "absent")
        labels = [lab for lab in labels if lab in present or rng.random() < options.absent_label_rate]
        if options.shuffle_labels:
            _rng(record.id, options.seed, "shuffle").shuffle(labels)
    if not labels:
        return []
    size = options.max_labels_per_instruction or len(labels)
    return [_subschema(record.schema, record.task, labels[i : i + size]) for i in range(0, len(labels), size)]


DEFAULT_OPTIONS = ChatOptions()
PROMPT_FILE = "chatuie_prompt.json"
TEXT_LINE = "Text: "  # the last line of an IE instruction starts with this, then the input text


def save_prompt_options(model_dir: str | Path, options: ChatOptions) -> Path:
    """Write how ``model_dir``'s model was taught to be asked (read back by :func:`prompt_options_for`)."""
    from dataclasses import asdict

    from chatuie.io import write_json

    path = Path(model_dir) / PROMPT_FILE
    write_json(path, asdict(options))
    return path


def prompt_options_for(model_dir: str | Path | None, params_path: str | Path = "params.yaml") -> ChatOptions:
    """How a saved model was taught to be asked: ``<model_dir>/chatuie_prompt.json`` if present,
    else the project's ``params.yaml`` (``samples.chat``) when run inside the project, else defaults.

    Asking a model in another style than it was trained on (say, with a system turn it never saw)
    costs a tiny model most of its accuracy.
    """
    from dataclasses import fields

    candidates: list[dict[str, Any]] = []
    if model_dir is not None and (Path(model_dir) / PROMPT_FILE).is_file():
        candidates.append(json.loads((Path(model_dir) / PROMPT_FILE).read_text(encoding="utf-8")))
    elif Path(params_path).is_file():
        from chatuie.config import load_params

        params = load_params(params_path)
        candidates.append(((params.get("samples") or {}).get("chat")) or {})
    known = {f.name for f in fields(ChatOptions)}
    for data in candidates:
        return ChatOptions(**{k: v for k, v in data.items() if k in known})
    return DEFAULT_OPTIONS


def ie_user_prompt(task: str, text: str, schema: Schema, options: ChatOptions = DEFAULT_OPTIONS) -> str:
    lines = [f"Task: {_TASK_NAME[task]}."]
    if task == "ner":
        lines.append(f"Entity types: {json.dumps(schema.entities, ensure_ascii=False)}")
    elif task == "re":
        lines.append(f"Entity types: {json.dumps(schema.entities, ensure_ascii=False)}")
        lines.append(f"Relation types: {json.dumps(schema.relations, ensure_ascii=False)}")
    else:
        if options.event_roles_in_prompt:
            lines.append(f"Event types and roles: {json.dumps(schema.events, ensure_ascii=False)}")
        else:
            lines.append(f"Event types: {json.dumps(list(schema.events), ensure_ascii=False)}")
    if options.format_hint:
        lines.append(f"Answer in JSON: {_FORMAT_HINT[task]}")
    lines.append(f"{TEXT_LINE}{text}")
    return "\n".join(lines)


REPEAT_TASK = "Task: repeat the text exactly."


def repeat_samples(samples: Iterable[dict[str, Any]], count: int, seed: int = 13) -> list[dict[str, Any]]:
    """``count`` chat samples "repeat this text" made from the texts of IE training samples.

    Copying is what extraction needs most (every span is copied from the input), and a model built
    from scratch learns it (induction heads) only after a few hundred steps of dense copy signal:
    the base stage teaches it before SFT has to. Texts come from training samples only.
    """
    users = (
        next(m["content"] for m in s["messages"] if m["role"] == "user")
        for s in samples
        if s.get("task") in ("ner", "re", "ee")
    )
    texts = sorted({u.partition(f"\n{TEXT_LINE}")[2] for u in users} - {""})
    rng = random.Random(seed)
    chosen = rng.sample(texts, min(count, len(texts)))
    return [
        {
            "id": f"repeat-{i:05d}",
            "dataset": "repeat",
            "task": "repeat",
            "messages": messages_for(f"{REPEAT_TASK}\n{TEXT_LINE}{text}", text, system_prompt=False),
        }
        for i, text in enumerate(chosen)
    ]


def qa_user_prompt(record: Record) -> str:
    return (
        "Read the passage and answer the question briefly.\n"
        f"Passage: {record.text}\nQuestion: {record.question}"
    )


def mcq_user_prompt(record: Record) -> str:
    options = record.options or {}
    choices = "\n".join(f"{letter}. {value}" for letter, value in options.items())
    return f"{record.question}\n{choices}\nAnswer with the letter of the correct option."


def messages_for(user: str, answer: str | None, system_prompt: bool = True) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if system_prompt else []
    messages.append({"role": "user", "content": user})
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def build_samples(record: Record, options: ChatOptions, *, train: bool) -> list[dict[str, Any]]:
    """All chat samples of one record (IE records may give several instructions)."""
    base = {"record_id": record.id, "dataset": record.dataset, "task": record.task}
    if record.task == "qa":
        return [
            {
                **base,
                "id": record.id,
                "messages": messages_for(qa_user_prompt(record), record.answer, options.system_prompt),
            }
        ]
    if record.task == "mcq":
        return [
            {
                **base,
                "id": record.id,
                "messages": messages_for(mcq_user_prompt(record), record.answer, options.system_prompt),
            }
        ]
    samples = []
    for index, schema in enumerate(instruction_schemas(record, options, train=train)):
        samples.append(
            {
                **base,
                "id": f"{record.id}#{index}",
                "schema": schema.to_dict(),
                "messages": messages_for(
                    ie_user_prompt(record.task, record.text, schema, options),
                    render(record, schema),
                    options.system_prompt,
                ),
            }
        )
    return samples
