"""File jobs: ``chatuie extract -i in.jsonl -o out.jsonl`` over many documents, with progress,
resumed after an interruption. What the job was run with (model fingerprint, schema, decoding
settings) is recorded beside its output (``<out>.job.json``); a resume with anything else is
refused.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatuie.data.schema import ExtractionSchema
from chatuie.data.text import check_text, read_utf8
from chatuie.errors import ExtractError
from chatuie.progress import Progress
from chatuie.serve.extractor import Extractor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputItem:
    id: str
    text: str
    line: int


def read_inputs(path: str | Path) -> list[InputItem]:
    """Every input of a JSONL (``{"text": ..., "id"?: ...}`` per line) or plain-text file (one
    text per line), all validated before anything runs. Default ids are line numbers."""
    path = Path(path)
    raw = read_utf8(path, ExtractError)
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
