"""Where runs and models go (a sqlite store in the repository or ``MLFLOW_TRACKING_URI``), the
names and tags chatuie uses, secret scrubbing and the flattening of params and metrics."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatuie.errors import ChatuieError

if TYPE_CHECKING:  # mlflow is imported lazily, inside the functions that need it
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


ENV_TRACKING = "CHATUIE_TRACKING"  # "off" disables tracking of stage runs
ENV_EXECUTION_ID = "CHATUIE_EXECUTION_ID"
ENV_EXECUTION_NAME = "CHATUIE_EXECUTION_NAME"  # the parent run's name (Prefect sets the flow run's)
ENV_EXPERIMENT = "CHATUIE_EXPERIMENT"
ENV_UI_URL = "CHATUIE_MLFLOW_UI_URL"  # where `mlflow ui` serves a local store (for run links)
DEFAULT_EXPERIMENT = "chatuie"
REGISTERED_MODEL = "chatuie"
STORE_DIR = "mlflow"
NOTE_FILE = "chatuie_model.json"  # = chatuie.models.modeling.NOTE_FILE (not imported: that pulls in torch)
PROMPT_FILE = "chatuie_prompt.json"  # = chatuie.data.prompts.PROMPT_FILE: how the model is asked

MAX_FILE_BYTES = 2 * 1024 * 1024  # artifact files above this are skipped
MAX_OUT_BYTES = 5 * 1024 * 1024  # an output (file or directory) above this is skipped whole
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5"})

TAG_KIND = "chatuie.kind"  # execution | stage | register
TAG_EXECUTION = "chatuie.execution_id"
TAG_STAGE = "chatuie.stage"
TAG_COMMIT = "chatuie.git_commit"
TAG_DEPS = "chatuie.deps_md5"
TAG_DEP_PREFIX = "chatuie.dep."
HISTORY_TAG = "production_history"  # registered-model tag: JSON list, the production stack
PRODUCTION, CANDIDATE = "production", "candidate"

_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.I)
_BAD_KEY_CHARS = re.compile(r"[^\w.\- :/]")  # what MLflow accepts in param and metric names


class TrackingError(ChatuieError, RuntimeError):
    """A tracking or registry operation failed; the message names the store and the operation."""


# ------------------------------------------------------------------------------------ configuration


def tracking_enabled() -> bool:
    return os.environ.get(ENV_TRACKING, "on").strip().lower() not in {"off", "0", "false", "no"}


def find_root(start: str | Path | None = None) -> Path:
    """The repository root: the nearest directory holding dvc.yaml, from ``start`` (cwd) upwards.

    A stage run by ``dvc exp run --temp`` / ``--queue`` works in a copy under
    ``<root>/.dvc/tmp/exps/``; its runs belong in the real repository's store, so that root wins.
    """
    here = Path(start or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").exists():
            return candidate
    return here


def tracking_uri(root: str | Path | None = None) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    store = find_root(root) / STORE_DIR
    return f"sqlite:///{store / 'mlflow.db'}"


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def _client(root: str | Path | None = None) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    import mlflow

    uri = tracking_uri(root)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # The fluent API (model logging, artifact downloads) reads these globals. MLflow also exports
    # them as MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI for subprocesses: undone, so a long-lived
    # process (a flow) neither sends its stages to this store nor ignores the next root.
    with _env_restored("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client: MlflowClient, root: str | Path | None = None) -> str:
    from mlflow.exceptions import MlflowException

    name = os.environ.get(ENV_EXPERIMENT, DEFAULT_EXPERIMENT)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if _is_local_store(tracking_uri(root)):
        # Artifacts beside the database, not in ./mlruns of whatever directory the process runs in.
        location = (find_root(root) / STORE_DIR / "artifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


@contextlib.contextmanager
def _errors(what: str, root: str | Path | None = None) -> Iterator[None]:
    """Turn MLflow's (and the network's) failures into one clear TrackingError line."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TrackingError(f"MLflow at {tracking_uri(root)}: {what} failed: {first}") from err


# ------------------------------------------------------------------------------------------ secrets


def secret_values(params: Mapping[str, Any] | None = None) -> list[str]:
    """Values never to record: secret-looking environment variables and the judge's API key."""
    values = {v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8}
    judge = (params or {}).get("judge") or {}
    names = {"CHATUIE_JUDGE_API_KEY", str(judge.get("api_key_env") or "CHATUIE_JUDGE_API_KEY")}
    values.update(v for n in names if len(v := os.environ.get(n, "")) >= 4)
    return sorted(values, key=len, reverse=True)  # longest first: no partial leftovers


def scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


# ------------------------------------------------------------------------------------------ flatten


def _key(name: str) -> str:
    return _BAD_KEY_CHARS.sub("_", name)[:250]


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"sft": {"train": {"max_steps": 10}}}`` -> ``{"sft.train.max_steps": "10"}``; lists as JSON."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, name))
        else:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            flat[_key(name)] = text if len(text) <= 6000 else text[:5990] + "…"
    return flat


def flatten_metrics(values: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested JSON as ``a.b.c`` (lists by index); booleans as 0/1, the rest dropped."""
    flat: dict[str, float] = {}
    items: Any = (
        values.items()
        if isinstance(values, Mapping)
        else enumerate(values)
        if isinstance(values, list)
        else ()
    )
    for key, value in items:
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, (Mapping, list)):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, bool) or isinstance(value, (int, float)) and not math.isnan(value):
            flat[_key(name)] = float(value)
    return flat


def _read_structured(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        return yaml.safe_load(text)
    if path.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    return json.loads(text)


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


@contextlib.contextmanager
def _env_restored(*keys: str) -> Iterator[None]:
    """These environment variables as they were before the block, whatever it set."""
    saved = {k: os.environ.get(k) for k in keys}
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    with _env_restored(*values):
        os.environ.update(values)
        yield
