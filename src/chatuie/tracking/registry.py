"""The model registry: a registered version stores what is new in it (an adapter with its base
pinned or bundled, or a full model); aliases ``production`` and ``candidate`` move only through
:func:`gate_version`, whose rule is the caller's (chatuie.eval.promotion), and :func:`rollback`."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatuie.io import write_json
from chatuie.models.packaged import PACKAGED_PREFIX
from chatuie.tracking.store import (
    CANDIDATE,
    ENV_TRACKING,
    HISTORY_TAG,
    NOTE_FILE,
    PRODUCTION,
    PROMPT_FILE,
    REGISTERED_MODEL,
    TAG_COMMIT,
    TAG_EXECUTION,
    TAG_KIND,
    TrackingError,
    _client,
    _env,
    _errors,
    _experiment_id,
    _key,
    _number,
    tracking_enabled,
)

if TYPE_CHECKING:  # mlflow is imported lazily, inside the functions that need it
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)
RECORD_SCORES_FILE = "record_scores.json"  # a version's per-record scores (chatuie.eval.comparison)


# ------------------------------------------------------------------------------------------ registry


def pip_requirements(peft: bool = False) -> list[str]:
    """Exact pins of what loading the model needs (MLflow's default list drags in torchvision)."""
    from importlib.metadata import PackageNotFoundError, version

    names = ["torch", "transformers", "tokenizers", "safetensors", "accelerate", *(["peft"] if peft else [])]
    pins = []
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            pins.append(f"{name}=={version(name)}")
    return pins


def register_model(
    model_dir: str | Path,
    summary: Mapping[str, Any],
    *,
    name: str = REGISTERED_MODEL,
    model_key: str = "",
    record_scores: Mapping[str, Any] | None = None,
    root: str | Path | None = None,
) -> int:
    """Log ``model_dir`` (a chatuie.models.modeling.save_model directory) and register it as a new version.

    A full model goes in with the MLflow transformers flavor (weights copied from the directory, no
    load); a LoRA adapter is logged as artifacts with its base: a local base directory is bundled
    under ``base/``, a hub id is kept as a reference. ``summary`` (metrics/<model>.json's summary)
    becomes the version's tags; the gate (:func:`promote`) compares those, and pairs
    ``record_scores`` (chatuie.eval.comparison.record_scores, logged as the run's record_scores.json)
    with production's for the interval of the gain.
    Logs into the active run (the register stage's) or, outside a stage, into a run of its own.
    """
    import mlflow

    if not tracking_enabled():
        raise TrackingError(
            f"{ENV_TRACKING}=off: the model registry lives in MLflow; turn tracking on to register"
        )
    model_dir = Path(model_dir)
    note_path = model_dir / NOTE_FILE
    if not note_path.exists():
        raise TrackingError(
            f"{model_dir}: no {NOTE_FILE}: not a chatuie.models.modeling.save_model directory"
        )
    note = json.loads(note_path.read_text(encoding="utf-8"))
    with _errors(f"registering {model_dir} as {name!r}", root):
        client = _client(root)
        own_run = mlflow.active_run() is None
        if own_run:
            mlflow.start_run(experiment_id=_experiment_id(client, root), tags={TAG_KIND: "register"})
        try:
            run = mlflow.active_run()
            assert run is not None
            tags = {
                **{str(k): str(v) for k, v in summary.items() if not isinstance(v, (dict, list))},
                "chatuie.model": model_key or model_dir.name,
                "chatuie.model_kind": note.get("kind", "full"),
                "chatuie.source_run": run.info.run_id,
                TAG_EXECUTION: run.data.tags.get(TAG_EXECUTION, ""),
                TAG_COMMIT: run.data.tags.get(TAG_COMMIT, ""),
            }
            mlflow.log_metrics(
                {_key(f"registered.{k}"): float(v) for k, v in summary.items() if _number(v) is not None}
            )
            if record_scores is not None:
                mlflow.log_dict(dict(record_scores), RECORD_SCORES_FILE)
            if note.get("kind") == "lora":
                version = _register_adapter(client, model_dir, note, name, tags, run.info.run_id)
            else:
                version = _register_full(model_dir, note, name, tags)
            mlflow.set_tag("chatuie.registered_version", str(version))
        finally:
            if own_run:
                mlflow.end_run()
    return version


def _register_full(model_dir: Path, note: dict, name: str, tags: dict[str, str]) -> int:
    """The transformers flavor, from the loaded model (MLflow 3.17's logging from a checkpoint
    directory breaks on transformers 5: its pipeline registry names classes by string)."""
    import mlflow
    from chatuie.models.modeling import load_saved

    # No model card or license lookups on the hub for a local model (offline machines retry for
    # ~30 s): offline mode, and an absolute name_or_path that is no valid hub id anyway.
    prompt_path = model_dir / PROMPT_FILE
    metadata: dict[str, Any] = {"chatuie_model": note}
    if prompt_path.exists():
        metadata["chatuie_prompt"] = json.loads(prompt_path.read_text(encoding="utf-8"))
    with _env(HF_HUB_OFFLINE="1"):
        model, tokenizer = load_saved(model_dir.resolve())
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            pip_requirements=pip_requirements(),
            metadata=metadata,  # download_model writes both files back
        )
    return int(mlflow.register_model(info.model_uri, name, tags=tags).version)


def _register_adapter(
    client: MlflowClient, model_dir: Path, note: dict, name: str, tags: dict[str, str], run_id: str
) -> int:
    import mlflow

    mlflow.log_artifacts(str(model_dir), "model")
    base = str(note.get("base") or "")
    if note.get("base_pin"):
        # A packaged base (chatuie.models.packaged): pinned by package version and GGUF sha256, rebuilt from
        # the installed package where the version is loaded; only the adapter is stored.
        pin = note["base_pin"]
        tags["chatuie.base"] = f"packaged: {pin['distribution']}=={pin['version']} sha256:{pin['sha256']}"
    elif base and Path(base).is_dir():
        mlflow.log_artifacts(base, "model/base")  # self-contained: the base travels with the adapter
        tags["chatuie.base"] = "bundled: model/base"
    else:
        tags["chatuie.base"] = base  # a hub id: a reference
    with contextlib.suppress(Exception):
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    return int(client.create_model_version(name, source=source, run_id=run_id, tags=tags).version)


def download_model(uri: str, dst: str | Path | None = None, *, root: str | Path | None = None) -> Path:
    """A local directory loadable with :func:`chatuie.models.modeling.load_saved`, e.g. for
    ``models:/chatuie@production`` (an adapter's bundled base is pointed at in its note)."""
    import mlflow

    with _errors(f"downloading {uri}", root):
        _client(root)
        if dst is not None:
            Path(dst).mkdir(parents=True, exist_ok=True)
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None)
        )
    if (local / "MLmodel").exists() and (local / "model" / "config.json").exists():
        return _assemble_flavor_dir(local)
    if not (local / NOTE_FILE).exists() and not (local / "config.json").exists():
        raise TrackingError(f"{uri}: no model directory in what was downloaded ({local})")
    note_path = local / NOTE_FILE
    note = json.loads(note_path.read_text(encoding="utf-8")) if note_path.exists() else {}
    if (local / "base").is_dir():
        note["base"] = str((local / "base").resolve())  # the bundled base, wherever it landed
        write_json(note_path, note)
    elif note.get("base_pin"):
        # Not the directory it was trained on (another machine's path): the packaged model it pins.
        note["base"] = PACKAGED_PREFIX + note["base_pin"]["name"]
        write_json(note_path, note)
    return local


def _assemble_flavor_dir(local: Path) -> Path:
    """The transformers flavor keeps weights in model/ and the tokenizer in components/tokenizer/;
    load_saved wants one directory with both and the chatuie note."""
    import shutil

    import yaml

    model_dir = local / "model"
    tokenizer_dir = local / "components" / "tokenizer"
    if tokenizer_dir.is_dir():
        for file in tokenizer_dir.iterdir():
            if file.is_file() and not (model_dir / file.name).exists():
                shutil.copy2(file, model_dir / file.name)
    meta = (yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8")) or {}).get("metadata") or {}
    note = meta.get("chatuie_model") or {"kind": "full", "dtype": "float32"}
    write_json(model_dir / NOTE_FILE, note)
    if meta.get("chatuie_prompt"):
        write_json(model_dir / PROMPT_FILE, meta["chatuie_prompt"])
    return model_dir


# ----------------------------------------------------------------------------------------- promotion


@dataclass(frozen=True)
class Decision:
    version: int
    promoted: bool
    alias: str  # production | candidate
    reason: str
    compared_to: int | None = None  # the production version it was measured against


PROTOCOL_TAG = "eval_protocol"  # metrics/<model>.json summary -> version tag (evaluation.protocol_digest)


def _record_scores(run_id: str | None) -> dict[str, Any] | None:
    """The record scores a version's run logged at registration (None for older versions)."""
    import mlflow

    if not run_id:
        return None
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=RECORD_SCORES_FILE)
    except Exception:  # noqa: BLE001 - a version registered before record scores were kept
        return None
    return json.loads(Path(local).read_text(encoding="utf-8"))


@dataclass(frozen=True)
class VersionView:
    """What a gate reads of a registered version: its tags, the numbers among them, its record
    scores (None for a version registered before they were kept)."""

    version: int
    tags: Mapping[str, str]
    record_scores: dict[str, Any] | None

    @property
    def metrics(self) -> dict[str, float]:
        return {k: v for k, raw in self.tags.items() if (v := _number(raw)) is not None}


# (candidate, production or None) -> (promoted, reason, version tags to set on the candidate)
Judge = Callable[[VersionView, "VersionView | None"], tuple[bool, str, Mapping[str, str]]]


def _alias(client: MlflowClient, name: str, alias: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _history(client: MlflowClient, name: str) -> list[int]:
    raw = client.get_registered_model(name).tags.get(HISTORY_TAG, "[]")
    return [int(v) for v in json.loads(raw)]


def _record(client: MlflowClient, name: str, decision: Decision) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for key, value in {
        "promotion.decision": decision.alias,
        "promotion.reason": decision.reason,
        "promotion.compared_to": "" if decision.compared_to is None else str(decision.compared_to),
        "promotion.at": stamp,
    }.items():
        client.set_model_version_tag(name, str(decision.version), key, value[:8000])


def production_version(name: str = REGISTERED_MODEL, *, root: str | Path | None = None) -> int | None:
    with _errors(f"reading the {PRODUCTION} alias of {name!r}", root):
        return _alias(_client(root), name, PRODUCTION)


def gate_version(
    judge: Judge, version: int | None = None, *, name: str = REGISTERED_MODEL, root: str | Path | None = None
) -> Decision:
    """Gate ``version`` (default: the latest) against production with ``judge``; alias it
    production or candidate (the rule itself is the caller's: chatuie.eval.promotion).

    Promoted: ``production`` moves to it and it is pushed on the ``production_history`` tag (what
    :func:`rollback` pops). Not promoted: it gets ``candidate``. Either way the decision and its
    reason are version tags (``promotion.decision``, ``promotion.reason``...), with the tags the
    judge returned.
    """
    with _errors(f"promoting a version of {name!r}", root):
        client = _client(root)
        if version is None:
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise TrackingError(f"registered model {name!r} has no versions")
            version = max(int(v.version) for v in versions)
        current = _alias(client, name, PRODUCTION)
        if current == version:
            return Decision(version, True, PRODUCTION, "already production", current)
        candidate = _view(client, name, version)
        production = None if current is None else _view(client, name, current)
        promoted, reason, tags = judge(candidate, production)
        decision = Decision(version, promoted, PRODUCTION if promoted else CANDIDATE, reason, current)
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, value)
        if promoted:
            history = _history(client, name)
            if current is not None and (not history or history[-1] != current):
                history.append(current)  # production set by hand: keep it reachable by rollback
            client.set_registered_model_alias(name, PRODUCTION, str(version))
            client.set_registered_model_tag(name, HISTORY_TAG, json.dumps([*history, version]))
            if _alias(client, name, CANDIDATE) == version:
                client.delete_registered_model_alias(name, CANDIDATE)
        else:
            client.set_registered_model_alias(name, CANDIDATE, str(version))
        _record(client, name, decision)
    log.info("version %s of %s -> %s: %s", version, name, decision.alias, reason)
    return decision


def _view(client: MlflowClient, name: str, version: int) -> VersionView:
    entry = client.get_model_version(name, str(version))
    return VersionView(version, dict(entry.tags), _record_scores(entry.run_id))


def rollback(*, name: str = REGISTERED_MODEL, root: str | Path | None = None) -> Decision:
    """Move ``production`` back to the previous production version (the history tag's stack)."""
    with _errors(f"rolling back {name!r}", root):
        client = _client(root)
        current = _alias(client, name, PRODUCTION)
        if current is None:
            raise TrackingError(f"registered model {name!r} has no {PRODUCTION} version to roll back")
        history = _history(client, name)
        while history and history[-1] == current:
            history.pop()
        if not history:
            raise TrackingError(
                f"version {current} is the first {PRODUCTION} version of {name!r}: nothing to roll back to"
            )
        previous = history[-1]
        client.set_registered_model_alias(name, PRODUCTION, str(previous))
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
        client.set_model_version_tag(
            name, str(current), "promotion.rolled_back_at", time.strftime("%Y-%m-%dT%H:%M:%S%z")
        )
        decision = Decision(previous, True, PRODUCTION, f"rollback from version {current}", current)
        _record(client, name, decision)
    log.info("%s: %s back to version %s (from %s)", name, PRODUCTION, previous, current)
    return decision
