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

import bisect
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatuie.data.answers import ground
from chatuie.data.prompts import (
    DEFAULT_OPTIONS,
    ChatOptions,
    ie_user_prompt,
    instruction_schemas,
    messages_for,
    prompt_options_for,
)
from chatuie.data.records import Record, Schema
from chatuie.models.precision import resolve_dtype
from chatuie.progress import Progress, track

log = logging.getLogger(__name__)

DEFAULT_MODEL = "models/sft"
MAX_LABEL_CHARS = 100
SCHEMA_KEYS = ("entities", "relations", "events", "description")
# Tokens kept free besides the prompt and the answer budget: tokenizing a window alone and inside
# the prompt may differ at its two edges by a token or two.
SAFETY_TOKENS = 8
MIN_WINDOW_TOKENS = 16
# Where a window preferably ends (after a sentence) or starts (after any separator).
_STRONG_BREAKS = frozenset("\n。！？；!?;")
_WEAK_BREAKS = frozenset(" \t\r，、,:：)）」』】")


class ExtractError(ValueError):
    """Bad input or configuration; the message names the file, line and field at fault.

    The message is always encodable text (an unpaired surrogate quoted from the input is written
    as a ``\\udXXX`` escape), so it can be printed or sent as JSON.
    """

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(printable(str(message)), *args)


class SchemaError(ExtractError):
    """An invalid schema (``where`` locates it: a file name or ``schema`` in a request)."""


# ----------------------------------------------------------------------------------------------
# text at the boundary


def printable(text: str) -> str:
    """``text`` with unpaired surrogates as ``\\udXXX`` escapes: always encodable as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def text_problem(value: str) -> str | None:
    """Why a tokenizer cannot take ``value``, or None when it can.

    Tokenizers take Unicode text as UTF-8; the one kind of Python string that has no UTF-8 form
    holds an unpaired surrogate (U+D800-U+DFFF), which a JSON file or request may carry as
    ``"\\ud800"`` and a command-line argument as an undecodable byte.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return (
            f"unpaired surrogate U+{ord(value[err.start]):04X} at character {err.start} "
            "(not valid Unicode text: the tokenizer cannot encode it)"
        )
    return None


def check_text(value: str, where: str) -> str:
    """``value`` if a tokenizer can encode it, else an :class:`ExtractError` naming ``where``."""
    problem = text_problem(value)
    if problem is not None:
        raise ExtractError(f"{where}: {problem}")
    return value


def _not_utf8(path: Path, data: bytes, err: UnicodeDecodeError) -> str:
    """``file:line: not UTF-8 ...`` for a decoding error at ``err.start`` of ``data``."""
    line = data.count(b"\n", 0, err.start) + 1
    column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    return f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at byte {column} of the line)"


# ----------------------------------------------------------------------------------------------
# schema files


@dataclass(frozen=True)
class RelationType:
    """A relation type; ``head`` / ``tail`` optionally name the entity type of each argument."""

    name: str
    head: str | None = None
    tail: str | None = None


@dataclass
class ExtractionSchema:
    entities: list[str] = field(default_factory=list)
    relations: list[RelationType] = field(default_factory=list)
    events: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: str = "schema") -> ExtractionSchema:
        """Validate and build; every error names ``where`` and the offending field."""
        if not isinstance(data, dict):
            raise SchemaError(f"{where}: expected a JSON object, got {type(data).__name__}")
        unknown = [key for key in data if key not in SCHEMA_KEYS]
        if unknown:
            raise SchemaError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(SCHEMA_KEYS)})")
        entities = _label_list(data.get("entities", []), f"{where}.entities")
        relations = _relations(data.get("relations", []), f"{where}.relations", entities)
        events = _events(data.get("events", {}), f"{where}.events")
        if not (entities or relations or events):
            raise SchemaError(f"{where}: asks for nothing (give entities, relations and/or events)")
        return cls(entities=entities, relations=relations, events=events)

    @classmethod
    def load(cls, path: str | Path) -> ExtractionSchema:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise SchemaError(f"{path}: cannot read schema file: {err.strerror or err}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise SchemaError(_not_utf8(path, data, err)) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SchemaError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        relations: list[Any] = [
            r.name if r.head is None and r.tail is None else {"type": r.name, "head": r.head, "tail": r.tail}
            for r in self.relations
        ]
        return {"entities": list(self.entities), "relations": relations, "events": dict(self.events)}

    def tasks(self) -> list[tuple[str, Schema]]:
        """The project's (task, schema) requests this schema asks for."""
        out: list[tuple[str, Schema]] = []
        if self.relations:
            names = [r.name for r in self.relations]
            out.append(("re", Schema(entities=list(self.entities), relations=names)))
        elif self.entities:
            out.append(("ner", Schema(entities=list(self.entities))))
        if self.events:
            out.append(("ee", Schema(events={k: list(v) for k, v in self.events.items()})))
        return out

    def instructions(self, max_labels: int) -> list[tuple[str, Schema]]:
        """Every instruction asked per window: large schemas split as the model was taught."""
        options = ChatOptions(max_labels_per_instruction=max_labels)
        out: list[tuple[str, Schema]] = []
        for task, schema in self.tasks():
            probe = Record(id="", dataset="", split="", task=task, text="", schema=schema)
            out.extend((task, sub) for sub in instruction_schemas(probe, options, train=False))
        return out


def _label(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise SchemaError(f"{where}: expected a string label, got {json.dumps(value, ensure_ascii=False)}")
    problem = text_problem(value)
    if problem is not None:
        raise SchemaError(f"{where}: label has an {problem}")
    if not value.strip():
        raise SchemaError(f"{where}: empty label")
    if value != value.strip():
        raise SchemaError(f"{where}: label {value!r} has leading/trailing spaces")
    if len(value) > MAX_LABEL_CHARS:
        raise SchemaError(f"{where}: label longer than {MAX_LABEL_CHARS} characters")
    if any(ord(c) < 0x20 for c in value):
        raise SchemaError(f"{where}: label {value!r} contains a control character")
    return value


def _label_list(value: Any, where: str) -> list[str]:
    if not isinstance(value, list):
        raise SchemaError(f"{where}: expected a list of labels")
    labels = [_label(item, f"{where}[{i}]") for i, item in enumerate(value)]
    seen: set[str] = set()
    for i, label in enumerate(labels):
        if label in seen:
            raise SchemaError(f"{where}[{i}]: duplicate label {label!r}")
        seen.add(label)
    return labels


def _relations(value: Any, where: str, entities: list[str]) -> list[RelationType]:
    """A list of names / {"type", "head", "tail"} objects, or a mapping name -> {head, tail} | null."""
    items: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for name, spec in value.items():
            at = f"{where}.{name}"
            if spec is None:
                items.append((at, name))
            elif isinstance(spec, dict) and "type" not in spec:
                items.append((at, {"type": name, **spec}))
            else:
                raise SchemaError(f"{at}: expected null or an object with head/tail entity types")
    elif isinstance(value, list):
        items = [(f"{where}[{i}]", item) for i, item in enumerate(value)]
    else:
        raise SchemaError(f"{where}: expected a list of relation types or a mapping type -> {{head, tail}}")
    out: list[RelationType] = []
    seen: set[str] = set()
    for at, item in items:
        if isinstance(item, str):
            relation = RelationType(_label(item, at))
        elif isinstance(item, dict):
            extra = sorted(set(item) - {"type", "head", "tail"})
            if extra:
                raise SchemaError(f"{at}: unknown key {extra[0]!r} (known: type, head, tail)")
            if "type" not in item:
                raise SchemaError(f"{at}: missing 'type'")
            name = _label(item["type"], f"{at}.type")
            ends = {}
            for end in ("head", "tail"):
                kind = item.get(end)
                if kind is not None:
                    kind = _label(kind, f"{at}.{end}")
                    if kind not in entities:
                        raise SchemaError(
                            f"{at}.{end}: entity type {kind!r} is not in entities "
                            f"({json.dumps(entities, ensure_ascii=False)})"
                        )
                ends[end] = kind
            relation = RelationType(name, ends["head"], ends["tail"])
        else:
            raise SchemaError(f"{at}: expected a relation type name or an object with type/head/tail")
        if relation.name in seen:
            raise SchemaError(f"{at}: duplicate relation type {relation.name!r}")
        seen.add(relation.name)
        out.append(relation)
    if out and not entities:
        # The re answer format lists the entities first; relations hang on them.
        raise SchemaError(f"{where}: relations need an 'entities' list (the entity types they connect)")
    return out


def _events(value: Any, where: str) -> dict[str, list[str]]:
    if not isinstance(value, dict):
        raise SchemaError(f"{where}: expected a mapping event type -> list of roles")
    out: dict[str, list[str]] = {}
    for name, roles in value.items():
        _label(name, f"{where}.{name}")
        out[name] = _label_list(roles, f"{where}.{name}")
    return out


# ----------------------------------------------------------------------------------------------
# windows


@dataclass(frozen=True)
class Window:
    """Characters ``[start, end)`` of a text, asked as one prompt."""

    start: int
    end: int


def token_spans(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Character span of every token of ``text`` (as tokenized alone, no special tokens).

    Tokenizers without offset mappings (slow ones) count one token per UTF-8 byte: an upper
    bound for byte-level and byte-fallback vocabularies, so windows stay inside the context.
    """
    try:
        encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
        spans = [(int(s), int(e)) for s, e in encoded["offset_mapping"]]
        if spans or not text:
            return spans
    except (NotImplementedError, ValueError, TypeError, KeyError):
        pass
    spans = []
    for index, char in enumerate(text):
        spans.extend([(index, index + 1)] * len(char.encode("utf-8", "surrogatepass")))
    return spans


def plan_windows(text: str, spans: Sequence[tuple[int, int]], max_tokens: int, overlap: int) -> list[Window]:
    """Overlapping windows of at most ``max_tokens`` tokens covering ``text``.

    A window ends preferably after a sentence (else after a separator) within its last
    ``overlap`` tokens; the next one starts ``overlap`` tokens earlier (at the first separator
    there), so a mention cut by one window's end lies whole in the next one as long as it is
    shorter than the overlap.
    """
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    n = len(spans)
    if n <= max_tokens:
        return [Window(0, len(text))]
    overlap = max(0, min(overlap, max_tokens // 4))  # keeps every step >= half a window
    starts = [s for s, _ in spans]
    windows: list[Window] = []
    i, start = 0, 0
    while True:
        j = i + max_tokens
        if j >= n:
            windows.append(Window(start, len(text)))
            return windows
        hard_end = spans[j][0]  # the first token left out starts here (a split char is left out)
        lo = max(start + 1, spans[max(i + 1, j - overlap)][0])
        end = _last_break(text, lo, hard_end) or hard_end
        if end <= start:
            end = max(hard_end, start + 1)
        windows.append(Window(start, end))
        k = bisect.bisect_left(starts, end)  # first token starting at or after the end
        next_i = max(i + 1, k - overlap)
        first = spans[next_i][0]
        start = _first_break(text, first, end) or first
        start = min(start, end)
        i = max(next_i, bisect.bisect_left(starts, start))


def _last_break(text: str, lo: int, hi: int) -> int | None:
    """The largest position p in (lo, hi] just after a strong break, else after a weak one."""
    for breaks in (_STRONG_BREAKS, _WEAK_BREAKS):
        for p in range(hi, lo, -1):
            if text[p - 1] in breaks:
                return p
    return None


def _first_break(text: str, lo: int, hi: int) -> int | None:
    """The smallest position p in [lo, hi) just after any break (a word / clause start)."""
    for p in range(max(lo, 1), hi):
        if text[p - 1] in _STRONG_BREAKS or text[p - 1] in _WEAK_BREAKS:
            return p
    return None


# ----------------------------------------------------------------------------------------------
# merging


def _entity(e: Any, offset: int) -> dict[str, Any]:
    return {"type": e.type, "start": e.start + offset, "end": e.end + offset, "text": e.text}


def _span(s: Any, offset: int, **extra: Any) -> dict[str, Any]:
    return {**extra, "start": s.start + offset, "end": s.end + offset, "text": s.text}


def merge_windows(parts: Iterable[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """Merge grounded answers (``ground()`` output) of windows starting at the given offsets.

    Offsets become relative to the whole text. Duplicates (an overlap seen twice, an entity block
    repeated by several ``re`` instructions) are removed: entities by (type, start, end),
    relations by (type, head offsets, tail offsets), events by (type, trigger offsets) with
    their arguments united by (role, start, end).
    """
    entities: dict[tuple, dict] = {}
    relations: dict[tuple, dict] = {}
    events: dict[tuple, dict] = {}
    arguments: dict[tuple, dict[tuple, dict]] = {}
    dropped = 0
    for offset, part in parts:
        dropped += int(part.get("dropped", 0))
        for e in part.get("entities", []):
            item = _entity(e, offset)
            entities.setdefault((item["type"], item["start"], item["end"]), item)
        for r in part.get("relations", []):
            head, tail = _entity(r.head, offset), _entity(r.tail, offset)
            key = (r.type, head["start"], head["end"], tail["start"], tail["end"])
            known = relations.get(key)
            if known is None:
                relations[key] = {"type": r.type, "head": head, "tail": tail}
            else:  # another window may know the argument's type: keep the typed one
                for end, value in (("head", head), ("tail", tail)):
                    if not known[end]["type"] and value["type"]:
                        known[end] = value
        for ev in part.get("events", []):
            trigger = _span(ev.trigger, offset)
            key = (ev.type, trigger["start"], trigger["end"])
            if key not in events:
                events[key] = {"type": ev.type, "trigger": trigger, "arguments": []}
                arguments[key] = {}
            for a in ev.arguments:
                arg = _span(a, offset, role=a.role)
                arguments[key].setdefault((arg["role"], arg["start"], arg["end"]), arg)
    for key, event in events.items():
        event["arguments"] = sorted(arguments[key].values(), key=lambda a: (a["start"], a["end"], a["role"]))
    return {
        "entities": sorted(entities.values(), key=lambda e: (e["start"], e["end"], e["type"])),
        "relations": [relations[k] for k in sorted(relations, key=lambda k: (k[1], k[3], k[2], k[4], k[0]))],
        "events": sorted(
            events.values(), key=lambda e: (e["trigger"]["start"], e["trigger"]["end"], e["type"])
        ),
        "dropped": dropped,
    }


def _apply_relation_types(
    grounded: dict[str, Any], relation_types: dict[str, RelationType]
) -> dict[str, Any]:
    """Enforce declared head/tail entity types: a relation whose argument was recognised as an
    entity of another type is dropped; an untyped argument takes the declared type."""
    from dataclasses import replace

    kept = []
    dropped = 0
    for rel in grounded["relations"]:
        spec = relation_types.get(rel.type)
        head, tail = rel.head, rel.tail
        ok = True
        if spec is not None:
            for end, want in (("head", spec.head), ("tail", spec.tail)):
                arg = head if end == "head" else tail
                if want is None:
                    continue
                if arg.type and arg.type != want:
                    ok = False
                elif not arg.type:
                    arg = replace(arg, type=want)
                    head, tail = (arg, tail) if end == "head" else (head, arg)
        if ok:
            kept.append(replace(rel, head=head, tail=tail))
        else:
            dropped += 1
    return {**grounded, "relations": kept, "dropped": grounded.get("dropped", 0) + dropped}


# ----------------------------------------------------------------------------------------------
# the extractor


@dataclass
class ExtractSettings:
    max_new_tokens: int = 256  # answer budget per instruction (the constraint closes the JSON in time)
    batch_size: int = 8  # prompt rows per generate() batch
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
        self, model: Any, tokenizer: Any, settings: ExtractSettings | None = None, *, name: str = "chatuie"
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings or ExtractSettings()
        self.name = name
        self._overheads: dict[str, int] = {}
        # Where the model was loaded from (Extractor.load); else its name_or_path, if a directory.
        self.model_ref: str | None = None
        self.model_dir: Path | None = None
        self._identity: dict[str, Any] | None = None

    @classmethod
    def load(cls, model_ref: str = DEFAULT_MODEL, settings: ExtractSettings | None = None) -> Extractor:
        path, name = resolve_model_ref(model_ref)
        model, tokenizer = _load_dir(path)
        settings = settings or ExtractSettings()
        if settings.chat is None:
            source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
            settings = dataclasses.replace(settings, chat=prompt_options_for(source))
        extractor = cls(model, tokenizer, settings, name=name)
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

    def generate_answers(self, prompts: list[str], requests: list[Any], batch_size: int) -> list[str]:
        """Constrained answers for prompts (the seam tests replace with a scripted model)."""
        from chatuie.decoding import constrained_generate

        return constrained_generate(
            self.model,
            self.tokenizer,
            prompts,
            requests,
            max_new_tokens=self.settings.max_new_tokens,
            batch_size=batch_size,
            repetition_penalty=self.settings.repetition_penalty,
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
        if len(jobs) <= size:
            answers_sorted = self.generate_answers(sorted_prompts, requests, size)
        else:  # several batches (a long text's windows): decoded batch by batch, with progress
            answers_sorted = []
            for start in track(
                range(0, len(jobs), size),
                "extract: windows",
                total=len(jobs),
                unit="window",
                weight=lambda s: min(size, len(jobs) - s),
            ):
                answers_sorted += self.generate_answers(
                    sorted_prompts[start : start + size], requests[start : start + size], size
                )
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
                grounded = _apply_relation_types(grounded, relation_types)
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


def load_model_ref(ref: str, dtype: str = "auto") -> tuple[Any, Any, str]:
    """(model, tokenizer, name) from a saved model directory or an MLflow ``models:/`` URI, in
    ``dtype`` (auto: this machine's fast one, chatuie.models.precision, whatever it was saved in)."""
    path, name = resolve_model_ref(ref)
    return (*_load_dir(path, dtype), name)


def _load_dir(path: Path, dtype: str = "auto") -> tuple[Any, Any]:
    from chatuie.models.modeling import load_saved

    return load_saved(path, dtype=resolve_dtype(dtype, where="--dtype"))


def resolve_model_ref(ref: str) -> tuple[Path, str]:
    """(saved model directory, name) of a directory or an MLflow ``models:/`` URI (downloaded)."""
    if ref.startswith("models:/"):
        try:
            from chatuie.tracking import download_model  # MLflow stays behind chatuie.tracking
        except ImportError as err:  # includes a missing download_model
            raise ExtractError(
                f"{ref}: registry URIs need chatuie.tracking.download_model, which is not available "
                f"({err}); pass a local model directory instead"
            ) from None
        try:
            path = Path(download_model(ref))
        except Exception as err:  # the registry's own errors vary by backend
            raise ExtractError(f"{ref}: cannot download the model: {err}") from None
        name = ref.removeprefix("models:/").replace("/", "-").replace("@", "-")
    else:
        path = Path(ref)
        if not path.is_dir():
            raise ExtractError(f"{ref}: no such model directory (train one with `dvc repro sft`)")
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ExtractError(f"{ref}: not a saved model (no config.json / adapter_config.json)")
        name = path.resolve().name
    return path, name


def model_fingerprint(folder: str | Path) -> str:
    """sha256 of a saved model directory: every file's relative path, size and bytes (weights,
    config, tokenizer, chat template). The same model wherever it lies; another after retraining.
    Reads the weights once (about 1 GB/s)."""
    root = Path(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        name = file.relative_to(root).as_posix().encode("utf-8", "surrogateescape")
        digest.update(name + f"\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# file jobs


@dataclass(frozen=True)
class InputItem:
    id: str
    text: str
    line: int


def read_inputs(path: str | Path) -> list[InputItem]:
    """Every input of a JSONL (``{"text": ..., "id"?: ...}`` per line) or plain-text file (one
    text per line), all validated before anything runs. Default ids are line numbers."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ExtractError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        raw = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ExtractError(_not_utf8(path, data, err)) from None
    plain = path.suffix == ".txt"
    items: list[InputItem] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(raw.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if plain:
            item_id, text = str(lineno), line.rstrip("\r")
        else:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ExtractError(f"{where}: invalid JSON: {err.msg} (column {err.colno})") from None
            if not isinstance(row, dict):
                raise ExtractError(f"{where}: expected a JSON object with a 'text' field")
            text = row.get("text")
            if "text" not in row:
                raise ExtractError(f"{where}: missing field 'text'")
            if not isinstance(text, str):
                raise ExtractError(f"{where}: field 'text': expected a string, got {type(text).__name__}")
            raw_id = row.get("id", lineno)
            if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
                raise ExtractError(f"{where}: field 'id': expected a string or an integer")
            item_id = str(raw_id)
            check_text(item_id, f"{where}: field 'id'")
        check_text(text, f"{where}: field 'text'")
        if not text.strip():
            raise ExtractError(f"{where}: field 'text': empty")
        if item_id in seen:
            raise ExtractError(f"{where}: field 'id': {item_id!r} repeats line {seen[item_id]}")
        seen[item_id] = lineno
        items.append(InputItem(item_id, text, lineno))
    if not items:
        raise ExtractError(f"{path}: no input lines")
    return items


def _done_ids(out_path: Path, known: set[str]) -> set[str]:
    """Ids already answered in ``out_path``; a torn last line (killed mid-write) is cut off."""
    if not out_path.exists():
        return set()
    data = out_path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        log.warning("%s: dropping an incomplete last line (interrupted write)", out_path)
        with open(out_path, "r+b") as handle:
            handle.truncate(cut)
        data = data[:cut]
    done: set[str] = set()
    for lineno, line in enumerate(data.decode("utf-8", "replace").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item_id = json.loads(line)["id"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ExtractError(
                f"{out_path}:{lineno}: not a result line of this tool: delete the file or pass --overwrite"
            ) from None
        if str(item_id) not in known:
            raise ExtractError(
                f"{out_path}:{lineno}: id {item_id!r} is not in the input: this output belongs to "
                "another job (use another -o or --overwrite)"
            )
        done.add(str(item_id))
    return done


JOB_RECORD_SUFFIX = ".job.json"
JOB_RECORD_VERSION = 1
# What a resume must match; the rest of the record (input path, chatuie version, the model's
# reference) is kept for the reader.
_JOB_KEYS = ("model", "schema", "decoding")


def job_record_path(out_path: str | Path) -> Path:
    """Where a file job records what it was run with: ``<out>.job.json`` beside its output."""
    out = Path(out_path)
    return out.with_name(out.name + JOB_RECORD_SUFFIX)


def job_record(extractor: Extractor, schema: ExtractionSchema, in_path: str | Path) -> dict[str, Any]:
    from chatuie import __version__

    return {
        "version": JOB_RECORD_VERSION,
        "model": extractor.model_identity(),
        "schema": schema.to_dict(),
        "decoding": extractor.decoding_record(),
        "input": str(in_path),
        "chatuie": __version__,
    }


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to ``path`` through a temporary file renamed over it: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _short(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _model_label(model: Any) -> str:
    if not isinstance(model, dict):
        return _short(model)
    digest = model.get("sha256")
    return f"{model.get('ref') or model.get('name')}" + (f" (sha256 {digest[:12]})" if digest else "")


def _job_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between a recorded job and this run, one phrase per thing."""
    out: list[str] = []
    old_model, new_model = old.get("model"), new["model"]
    if not isinstance(old_model, dict):
        out.append(f"model: was {_short(old_model)}, now {_model_label(new_model)}")
    elif old_model.get("sha256") or new_model.get("sha256"):
        if old_model.get("sha256") != new_model.get("sha256"):
            same_ref = old_model.get("ref") == new_model.get("ref")
            out.append(
                f"model: {new_model.get('ref')} has changed since (sha256 "
                f"{str(old_model.get('sha256'))[:12]} -> {str(new_model.get('sha256'))[:12]})"
                if same_ref
                else f"model: was {_model_label(old_model)}, now {_model_label(new_model)}"
            )
    elif old_model.get("name") != new_model.get("name"):
        out.append(f"model: was {_model_label(old_model)}, now {_model_label(new_model)}")
    if old.get("schema") != new["schema"]:
        out.append(f"schema: was {_short(old.get('schema'))}, now {_short(new['schema'])}")
    old_decoding = old.get("decoding") if isinstance(old.get("decoding"), dict) else {}
    for key, value in new["decoding"].items():
        if key not in old_decoding:
            out.append(f"{key}: not recorded, now {_short(value)}")
        elif old_decoding[key] != value:
            if isinstance(value, dict) and isinstance(old_decoding[key], dict):
                for sub, sub_value in value.items():
                    if old_decoding[key].get(sub) != sub_value:
                        was = _short(old_decoding[key].get(sub))
                        out.append(f"{key}.{sub}: was {was}, now {_short(sub_value)}")
            else:
                out.append(f"{key}: was {_short(old_decoding[key])}, now {_short(value)}")
    return out


def _check_job(out: Path, record: dict[str, Any], resumed: int) -> bool:
    """Refuse to resume ``out`` with other settings than it was written with; True when the
    record must be (re)written (a new job, or an output without results yet)."""
    path = job_record_path(out)
    if not path.exists():
        if resumed:
            raise ExtractError(
                f"{out}: {resumed} results but no job record ({path.name}) beside them: written by an "
                "older chatuie, so the model, schema and settings they came from are unknown; pass "
                "--overwrite to start over (or write to another -o)"
            )
        return True
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExtractError(
            f"{path}: unreadable job record ({err}): delete it and the output, or pass --overwrite"
        ) from None
    if not isinstance(old, dict) or any(key not in old for key in _JOB_KEYS):
        raise ExtractError(f"{path}: not a job record of this tool: pass --overwrite to start over")
    if not resumed:  # nothing written under the old record: this run's settings replace it
        return any(old.get(key) != record[key] for key in _JOB_KEYS)
    differences = _job_differences(old, record)
    if differences:
        raise ExtractError(
            f"{out}: its {resumed} results were made with other settings than this run "
            f"({path.name}): " + "; ".join(differences) + "; pass --overwrite to start over "
            "(or write to another -o)"
        )
    return False


@dataclass
class FileJobResult:
    total: int
    resumed: int  # results already in the output file, not redone
    written: int


def extract_file(
    extractor: Extractor,
    schema: ExtractionSchema,
    in_path: str | Path,
    out_path: str | Path,
    *,
    overwrite: bool = False,
    progress: bool = True,
    chunk_docs: int | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> FileJobResult:
    """Run a file job: one result line per input line, keyed by id, flushed as soon as decoded.

    Inputs are validated before anything is written. What the job is run with (model
    fingerprint, schema, decoding settings) is recorded in ``<out>.job.json`` (written atomically,
    before the first result); an existing output resumes the job, its ids skipped, only when this
    run matches that record: otherwise, or without a record (an older chatuie's output), it is
    refused unless ``overwrite``. Documents are decoded ``chunk_docs`` at a time (default: the
    batch size).
    """
    items = read_inputs(in_path)
    out = Path(out_path)
    record = job_record(extractor, schema, in_path)
    if overwrite:
        out.unlink(missing_ok=True)
        job_record_path(out).unlink(missing_ok=True)
    done = _done_ids(out, {item.id for item in items})
    if _check_job(out, record, len(done)):
        _write_atomic(job_record_path(out), record)
    todo = [item for item in items if item.id not in done]
    chunk = chunk_docs or extractor.settings.batch_size
    written = 0
    if todo:
        out.parent.mkdir(parents=True, exist_ok=True)
        bar = Progress("extract", len(items), unit="doc", initial=len(done), mode=None if progress else "off")
        try:
            with open(out, "a", encoding="utf-8", newline="\n") as handle:
                for start in range(0, len(todo), chunk):
                    batch = todo[start : start + chunk]
                    results = extractor.extract_many([(item.text, schema) for item in batch])
                    for item, result in zip(batch, results, strict=True):
                        row = {"id": item.id, "text": item.text, **result}
                        # One write per line, then flush: a kill leaves at most one torn last line.
                        handle.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
                        handle.flush()
                        written += 1
                        if on_result is not None:
                            on_result(row)
                    bar.update(len(batch))
                os.fsync(handle.fileno())
        finally:
            bar.close()
    return FileJobResult(total=len(items), resumed=len(done), written=written)
