"""Extraction API: schema files, long-text windows, batched constrained decoding, merged results.

* :class:`ExtractionSchema` is the user-facing schema file (``docs/schema.md``): entity types,
  relation types (optionally with head/tail entity types), event types with their roles. One file
  may ask for several tasks; it maps to the project's ``(task, Schema)`` requests: ``re`` when
  relations are asked (its answer carries the entity block too), else ``ner``; ``ee`` for events.
* Long texts are cut into overlapping windows measured in tokens, so that the whole prompt plus
  the answer budget fits the model's context; each window is asked the same instructions (schema
  split as in training), answers are grounded with :func:`chatuie.data.answers.ground`, shifted
  to whole-text offsets and merged with duplicates removed (same type, same offsets).
* :class:`Extractor` batches every (document, window, instruction) row of a call through one
  :func:`chatuie.decoding.constrained_generate` call, so the server can decode concurrent
  requests together.
* :func:`extract_file` runs a JSONL job with a progress bar and resumes an interrupted one. What
  the job was run with (model fingerprint, schema, decoding settings) is recorded beside its
  output (``<out>.job.json``); a resume with anything else is refused.
* Text and labels are checked at the boundary (:func:`text_problem`): a JSON string may hold an
  unpaired surrogate (``"\\ud800"``), which no tokenizer can encode; it is refused by name.

Results are plain JSON-ready dicts with character offsets (``text[start:end] == span``)::

    {"entities": [{"type", "start", "end", "text"}],
     "relations": [{"type", "head": {entity}, "tail": {entity}}],
     "events": [{"type", "trigger": {"start", "end", "text"},
                 "arguments": [{"role", "start", "end", "text"}]}],
     "windows": 1, "dropped": 0}
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatuie.data.answers import ground
from chatuie.data.prompts import (
    DEFAULT_OPTIONS,
    ChatOptions,
    ie_user_prompt,
    messages_for,
    prompt_options_for,
)
from chatuie.data.records import Schema
from chatuie.data.schema import ExtractionSchema
from chatuie.data.text import check_text
from chatuie.errors import ExtractError, printable
from chatuie.progress import Progress
from chatuie.serve.model_refs import load_model_dir, model_fingerprint, resolve_model_ref
from chatuie.serve.windows import (
    MIN_WINDOW_TOKENS,
    SAFETY_TOKENS,
    Window,
    apply_relation_types,
    merge_windows,
    plan_windows,
    token_spans,
)

DEFAULT_MODEL = "models/sft"


@dataclass
class ExtractSettings:
    max_new_tokens: int = 256  # answer budget per instruction (the constraint closes the JSON in time)
    # Prompt rows decoded together. Rows leave the batch as they finish, so a wider batch costs only
    # KV-cache memory: 32 read 1.44x the records/s of 8 on Resume texts (AVX2, bench/engines.py).
    batch_size: int = 32
    max_labels_per_instruction: int = 4  # as samples.chat.max_labels_per_instruction in training
    context_tokens: int | None = None  # None: the model's max_position_embeddings
    overlap_tokens: int = 32  # tokens shared by consecutive windows
    repetition_penalty: float = 1.3  # as evaluate.settings.repetition_penalty of the default params
    # How the model was taught to be asked (None: from the model directory / params.yaml).
    chat: ChatOptions | None = None

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ExtractError(f"{name} must be >= 1")
        if self.repetition_penalty <= 0:
            raise ExtractError("repetition_penalty must be > 0 (1 = none)")
        if self.max_labels_per_instruction < 0 or self.overlap_tokens < 0:
            raise ExtractError("max_labels_per_instruction and overlap_tokens must be >= 0")
        if self.context_tokens is not None and self.context_tokens < 1:
            raise ExtractError("context_tokens must be >= 1")


@dataclass
class _Job:
    doc: int
    offset: int
    task: str
    text: str
    schema: Schema


class Extractor:
    """Grounded extraction with a loaded chat model (one thread at a time: ``generate`` is not
    re-entrant)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: ExtractSettings | None = None,
        *,
        name: str = "chatuie",
        engine: str = "chatuie",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or ExtractSettings()
        self.name = name
        self.engine = engine  # constrained_generate's: "transformers" is the reference path (bench)
        self._overheads: dict[str, int] = {}
        # Where the model was loaded from (Extractor.load); else its name_or_path, if a directory.
        self.model_ref: str | None = None
        self.model_dir: Path | None = None
        self._identity: dict[str, Any] | None = None

    @classmethod
    def load(cls, model_ref: str = DEFAULT_MODEL, settings: ExtractSettings | None = None) -> Extractor:
        path, name = resolve_model_ref(model_ref)
        model, tokenizer = load_model_dir(path)
        settings = settings or ExtractSettings()
        if settings.chat is None:
            source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
            settings = dataclasses.replace(settings, chat=prompt_options_for(source))
        from chatuie.models.modeling import merge_lora

        # LoRA folded into the weights once: every decoding step then skips the adapter's matmuls.
        extractor = cls(merge_lora(model), tokenizer, settings, name=name)
        extractor.model_ref, extractor.model_dir = model_ref, path
        return extractor

    def model_identity(self) -> dict[str, Any]:
        """``{"ref", "name", "sha256"}``: what a file job records of the model (sha256 of its
        saved directory, :func:`model_fingerprint`; None for a model with no directory)."""
        if self._identity is None:
            folder = self.model_dir
            if folder is None:
                source = getattr(self.model, "name_or_path", None)
                if source and Path(source).is_dir():
                    folder = Path(source)
            self._identity = {
                "ref": self.model_ref or (str(folder) if folder else self.name),
                "name": self.name,
                "sha256": model_fingerprint(folder) if folder else None,
            }
        return self._identity

    def decoding_record(self) -> dict[str, Any]:
        """The settings a file job's results depend on (the batch size is left out: it only
        groups the same prompts differently)."""
        return {
            "max_new_tokens": self.settings.max_new_tokens,
            "max_labels_per_instruction": self.settings.max_labels_per_instruction,
            "context_tokens": self.context_tokens,
            "overlap_tokens": self.settings.overlap_tokens,
            "repetition_penalty": self.settings.repetition_penalty,
            "prompt": dataclasses.asdict(self.chat),
        }

    @property
    def chat(self) -> ChatOptions:
        return self.settings.chat or DEFAULT_OPTIONS

    # -- prompts and windows ------------------------------------------------------------------

    @property
    def context_tokens(self) -> int:
        if self.settings.context_tokens:
            return self.settings.context_tokens
        config = getattr(self.model, "config", None)
        limit = getattr(config, "max_position_embeddings", None)
        return int(limit) if limit else 2048

    def prompt(self, task: str, text: str, schema: Schema) -> str:
        return self.tokenizer.apply_chat_template(
            messages_for(ie_user_prompt(task, text, schema, self.chat), None, self.chat.system_prompt),
            tokenize=False,
            add_generation_prompt=True,
        )

    def _count(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def window_tokens(self, schema: ExtractionSchema) -> int:
        """Text tokens a window may hold so the longest instruction's prompt + answer fit."""
        key = json.dumps(schema.to_dict(), sort_keys=True, ensure_ascii=False)
        overhead = self._overheads.get(key)
        if overhead is None:
            instructions = schema.instructions(self.settings.max_labels_per_instruction)
            overhead = max(self._count(self.prompt(task, "", sub)) for task, sub in instructions)
            self._overheads[key] = overhead
        room = self.context_tokens - overhead - self.settings.max_new_tokens - SAFETY_TOKENS
        if room < MIN_WINDOW_TOKENS:
            raise ExtractError(
                f"the schema's prompt ({overhead} tokens) plus the answer budget "
                f"({self.settings.max_new_tokens} new tokens) leaves {room} tokens of the model's "
                f"{self.context_tokens}-token context for text: lower max_new_tokens or "
                f"max_labels_per_instruction, or split the schema"
            )
        return room

    def windows(self, text: str, schema: ExtractionSchema) -> list[Window]:
        room = self.window_tokens(schema)
        return plan_windows(text, token_spans(self.tokenizer, text), room, self.settings.overlap_tokens)

    # -- decoding -----------------------------------------------------------------------------

    def generate_answers(
        self, prompts: list[str], requests: list[Any], batch_size: int, progress: Progress | None = None
    ) -> list[str]:
        """Constrained answers for prompts, in batches of ``batch_size`` (the seam tests replace
        with a scripted model)."""
        from chatuie.decoding import constrained_generate

        return constrained_generate(
            self.model,
            self.tokenizer,
            prompts,
            requests,
            max_new_tokens=self.settings.max_new_tokens,
            batch_size=batch_size,
            repetition_penalty=self.settings.repetition_penalty,
            engine=self.engine,
            progress=progress,
        )

    def extract(self, text: str, schema: ExtractionSchema) -> dict[str, Any]:
        return self.extract_many([(text, schema)])[0]

    def extract_many(
        self, docs: Sequence[tuple[str, ExtractionSchema]], *, batch_size: int | None = None
    ) -> list[dict[str, Any]]:
        """Extract from several documents in one decoding pass (rows sorted by length, so a
        batch pads little; the results come back in input order)."""
        from chatuie.decoding import IERequest

        jobs: list[_Job] = []
        window_counts: list[int] = []
        for index, (text, schema) in enumerate(docs):
            if not isinstance(text, str) or not text.strip():
                raise ExtractError(f"document {index}: empty text")
            check_text(text, f"document {index}: text")
            _check_labels(schema, f"document {index}: schema")
            windows = self.windows(text, schema)
            window_counts.append(len(windows))
            instructions = schema.instructions(self.settings.max_labels_per_instruction)
            for window in windows:
                piece = text[window.start : window.end]
                jobs.extend(_Job(index, window.start, task, piece, sub) for task, sub in instructions)
        prompts = [self.prompt(job.task, job.text, job.schema) for job in jobs]
        order = sorted(range(len(jobs)), key=lambda i: len(prompts[i]))
        size = batch_size or self.settings.batch_size
        sorted_prompts = [prompts[i] for i in order]
        requests = [IERequest(task=jobs[i].task, text=jobs[i].text, schema=jobs[i].schema) for i in order]
        # A long text's windows take several batches: progress counts windows as they finish.
        mode = None if len(jobs) > size else "off"
        with Progress("extract: windows", len(jobs), unit="window", mode=mode) as shown:
            answers_sorted = self.generate_answers(sorted_prompts, requests, size, progress=shown)
        answers = [""] * len(jobs)
        for i, answer in zip(order, answers_sorted, strict=True):
            answers[i] = answer

        parts: list[list[tuple[int, dict[str, Any]]]] = [[] for _ in docs]
        for job, answer in zip(jobs, answers, strict=True):
            relation_types = {r.name: r for r in docs[job.doc][1].relations}
            try:
                grounded = ground(job.task, answer, job.text, job.schema)
            except (ValueError, TypeError, AttributeError):  # only without the constraint
                grounded = {"entities": [], "relations": [], "events": [], "dropped": 1}
            if job.task == "re":
                grounded = apply_relation_types(grounded, relation_types)
            parts[job.doc].append((job.offset, grounded))
        results = []
        for index, doc_parts in enumerate(parts):
            merged = merge_windows(doc_parts)
            merged["windows"] = window_counts[index]
            results.append(merged)
        return results


def _check_labels(schema: ExtractionSchema, where: str) -> None:
    """Every label encodable (a schema built in code skips :meth:`ExtractionSchema.from_dict`)."""
    labels = [*schema.entities, *schema.events]
    for relation in schema.relations:
        labels += [relation.name, relation.head or "", relation.tail or ""]
    for roles in schema.events.values():
        labels += roles
    for label in labels:
        check_text(label, f"{where}: label {printable(repr(label))}")
