"""MLflow for the project: every stage run tracked, the model registry and its promotion gate.

This is the one module that imports ``mlflow`` (lazily: a stage run with ``CHATUIE_TRACKING=off``
never imports it). It knows nothing of DVC or Prefect: callers describe a stage with
:class:`StageInfo` (``tasks/_stage.py`` builds it from DVC's own view of ``dvc.yaml``).

Where runs go: ``MLFLOW_TRACKING_URI`` if set (a server, no code change), else a sqlite store in
the repository, ``sqlite:///<root>/mlflow/mlflow.db`` with artifacts in ``<root>/mlflow/artifacts``.

What a stage run records (:func:`stage_run`):

* params: the stage's params sections (as listed under ``params:`` in dvc.yaml), flattened to
  ``section.key.subkey``;
* metrics: the stage's metrics files flattened to ``a.b.c`` (numbers only) and, from its plots
  files, one metric per y column at each x step (``metrics/train/sft_loss.csv`` -> ``loss``);
* artifacts: metrics and plots files and the stage's small outputs (reports, sample predictions);
  files over :data:`MAX_FILE_BYTES`, outputs over :data:`MAX_OUT_BYTES`, persistent outputs (caches,
  checkpoints) and any directory holding model weights are left out (the registry holds models);
* dataset inputs: one per dependency, named by its path, with its DVC md5 as digest;
* tags: git commit, DVC stage name, execution id, every dependency's md5 and one fingerprint.

Runs of one pipeline execution share ``chatuie.execution_id`` and hang under one parent run
(created by the first stage that finds none). The id is ``CHATUIE_EXECUTION_ID`` when set (the
Prefect flow sets it) or derived from the ``dvc`` process the stage runs under (its pid and start
time), so all stages of one ``dvc repro`` / ``dvc exp run`` group together.

Secrets: any value of an environment variable whose name contains KEY, TOKEN, SECRET, PASSWORD or
CREDENTIAL (8+ characters), and the judge's key (``judge.api_key_env``), is replaced by ``***`` in
params, tags and artifact files before they leave the process.
"""

from __future__ import annotations

import contextlib
import csv
import getpass
import hashlib
import json
import logging
import math
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatuie.comparison import RECORD_SCORES_FILE
from chatuie.gate import PromotionPolicy, decide
from chatuie.io import write_json
from chatuie.packaged import PACKAGED_PREFIX

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
NOTE_FILE = "chatuie_model.json"  # = chatuie.modeling.NOTE_FILE (not imported: that pulls in torch)
PROMPT_FILE = "chatuie_prompt.json"  # = chatuie.chat.PROMPT_FILE: how the model is asked

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


class TrackingError(RuntimeError):
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


# ---------------------------------------------------------------------------------------- stage info


@dataclass(frozen=True)
class PlotFile:
    """A plots output of a stage and its dvc.yaml props (``x``: step column, ``y``: value column(s))."""

    path: str
    x: str | None = None
    y: str | list[str] | None = None


@dataclass(frozen=True)
class StageInfo:
    """What tracking needs to know of a DVC stage (built by tasks/_stage.py from dvc.yaml)."""

    name: str
    cmd: str = ""
    params: dict[str, Any] = field(default_factory=dict)  # listed name ("samples.chat") -> value
    deps: dict[str, str] = field(default_factory=dict)  # path -> DVC md5 (".dir" for directories)
    metrics: list[str] = field(default_factory=list)
    plots: list[PlotFile] = field(default_factory=list)
    outs: list[str] = field(default_factory=list)  # other non-persistent outputs (artifact candidates)


def deps_fingerprint(deps: Mapping[str, str]) -> str:
    """One md5 over the sorted (path, md5) pairs: equal iff every dependency is."""
    return hashlib.md5(json.dumps(sorted(deps.items())).encode()).hexdigest()


# ------------------------------------------------------------------------------------- execution id


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time in clock ticks since boot) from /proc, None where there is no /proc."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = data[data.rindex(")") + 2 :].split()  # the command name may hold spaces and parens
    return int(fields[1]), fields[19]


def _is_dvc(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(Path(arg.decode(errors="replace")).name == "dvc" for arg in argv[:3])


def execution_id() -> str:
    """The pipeline execution this process belongs to (see the module docstring)."""
    explicit = os.environ.get(ENV_EXECUTION_ID, "").strip()
    if explicit:
        return explicit
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        boot = "noproc"
    pid = os.getppid()
    while pid > 1:
        stat = _proc_stat(pid)
        if stat is None:
            break
        if _is_dvc(pid):
            return f"dvc-{boot}-{pid}-{stat[1]}"
        pid = stat[0]
    own = _proc_stat(os.getpid())
    return f"run-{boot}-{os.getpid()}-{own[1] if own else int(time.time())}"  # not under dvc: alone


def git_commit(root: str | Path) -> str:
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


# ---------------------------------------------------------------------------------------- stage runs


def _batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


class _StageTracker:
    def __init__(self, info: StageInfo, root: Path, params_file: Mapping[str, Any] | None) -> None:
        self.info = info
        self.root = root
        self.secrets = secret_values(params_file)
        self.execution = execution_id()
        self.client: MlflowClient | None = None
        self.run_id = ""
        self.parent_id = ""

    # -- start

    def start(self) -> str:
        from mlflow.entities import Param

        import mlflow

        with _errors(f"starting the run of stage {self.info.name!r}", self.root):
            self.client = client = _client(self.root)
            experiment = _experiment_id(client, self.root)
            commit = git_commit(self.root)
            self.parent_id = self._parent(client, experiment, commit)
            tags = {
                TAG_KIND: "stage",
                TAG_STAGE: self.info.name,
                TAG_EXECUTION: self.execution,
                TAG_DEPS: deps_fingerprint(self.info.deps),
                # dvc.lock is written after the command exits: these are the hashes of the inputs
                # this run read (computed at its start), i.e. what dvc.lock will record for it.
                "chatuie.deps_hashed": "at stage start (= the dvc.lock entry written after this run)",
                "chatuie.cmd": self.info.cmd,
                "mlflow.parentRunId": self.parent_id,
                "mlflow.source.type": "LOCAL",
                "mlflow.source.name": self.info.cmd or self.info.name,
                "mlflow.user": getpass.getuser(),
                **({TAG_COMMIT: commit, "mlflow.source.git.commit": commit} if commit else {}),
                **{_key(TAG_DEP_PREFIX + path): md5 for path, md5 in self.info.deps.items()},
            }
            tags = {k: scrub(v, self.secrets)[:8000] for k, v in tags.items()}
            run = client.create_run(experiment, run_name=self.info.name, tags=tags)
            self.run_id = run.info.run_id
            params = []
            for name, value in self.info.params.items():
                flat = (
                    flatten_params(value, name)
                    if isinstance(value, Mapping)
                    else flatten_params({name: value})
                )
                params.extend(Param(k, scrub(v, self.secrets)) for k, v in flat.items())
            for chunk in _batched(params, 100):
                client.log_batch(self.run_id, params=chunk)
            self._log_inputs(client)
            # Active, so the stage itself may log more (the register stage logs its model here).
            mlflow.start_run(run_id=self.run_id)
        return self.run_id

    def _parent(self, client: MlflowClient, experiment: str, commit: str) -> str:
        found = client.search_runs(
            [experiment],
            filter_string=f"tags.`{TAG_EXECUTION}` = '{self.execution}' and tags.`{TAG_KIND}` = 'execution'",
            max_results=1,
        )
        if found:
            parent = found[0].info.run_id
            client.update_run(parent, status="RUNNING")
            return parent
        name = os.environ.get(ENV_EXECUTION_NAME) or f"execution {time.strftime('%Y-%m-%d %H:%M:%S')}"
        tags = {TAG_KIND: "execution", TAG_EXECUTION: self.execution, "mlflow.user": getpass.getuser()}
        if commit:
            tags.update({TAG_COMMIT: commit, "mlflow.source.git.commit": commit})
        run = client.create_run(experiment, run_name=scrub(name, self.secrets), tags=tags)
        return run.info.run_id

    def _log_inputs(self, client: MlflowClient) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for path, md5 in self.info.deps.items():
            local = self.root / path
            code = local.suffix == ".py" or (local.is_dir() and all(p.suffix == ".py" for p in _files(local)))
            with _quiet_warnings():  # "can be interpreted in multiple ways": all of them local files
                source = resolve_dataset_source(str(local))
            dataset = MetaDataset(source=source, name=path, digest=md5[:36])
            tags = [InputTag("mlflow.data.context", "code" if code else "data"), InputTag("dvc.md5", md5)]
            inputs.append(DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags))
        for chunk in _batched(inputs, 1000):
            client.log_inputs(self.run_id, datasets=chunk)

    # -- finish

    def finish(self, status: str) -> None:
        import mlflow

        client = self.client
        assert client is not None
        with _errors(f"finishing the run of stage {self.info.name!r}", self.root):
            try:
                self._log_metrics(client)
                self._log_artifacts(client)
            finally:
                if mlflow.active_run() and mlflow.active_run().info.run_id == self.run_id:
                    mlflow.end_run(status)
                else:
                    client.set_terminated(self.run_id, status)
                # The parent shows the state of the latest stage: FAILED if the execution stopped there.
                client.set_terminated(self.parent_id, status)

    def _log_metrics(self, client: MlflowClient) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for path in self.info.metrics:
            local = self.root / path
            if not local.is_file():
                continue
            try:
                flat = flatten_metrics(_read_structured(local))
            except (ValueError, TypeError) as err:
                log.warning("metrics file %s unreadable (%s): not logged", path, err)
                continue
            metrics.extend(Metric(_key(scrub(k, self.secrets)), v, now, 0) for k, v in flat.items())
        for plot in self.info.plots:
            metrics.extend(self._plot_metrics(plot, now))
        for chunk in _batched(metrics, 1000):
            client.log_batch(self.run_id, metrics=chunk)

    def _plot_metrics(self, plot: PlotFile, now: int) -> list:
        """Each y column at each x: numeric x is the step (a loss curve), otherwise part of the name."""
        from mlflow.entities import Metric

        local = self.root / plot.path
        if not local.is_file() or local.suffix not in (".csv", ".tsv", ".json"):
            return []
        if local.suffix == ".json":
            rows = _read_structured(local)
            rows = (
                rows
                if isinstance(rows, list)
                else next((v for v in rows.values() if isinstance(v, list)), [])
            )
        else:
            with open(local, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle, delimiter="\t" if local.suffix == ".tsv" else ","))
        if not rows or not isinstance(rows[0], dict):
            return []
        ys = [plot.y] if isinstance(plot.y, str) else list(plot.y or [])
        if not ys:
            ys = [c for c in rows[0] if c != plot.x and _number(rows[0][c]) is not None]
        out = []
        for index, row in enumerate(rows):
            x = row.get(plot.x) if plot.x else index
            step = _number(x)
            for y in ys:
                value = _number(row.get(y))
                if value is None:
                    continue
                if step is not None and float(step).is_integer():
                    out.append(Metric(_key(y), value, now, int(step)))
                else:
                    out.append(Metric(_key(scrub(f"{y}.{x}", self.secrets)), value, now, 0))
        return out

    def _log_artifacts(self, client: MlflowClient) -> None:
        chosen: list[Path] = []
        for path in [*self.info.metrics, *(p.path for p in self.info.plots)]:
            local = self.root / path
            if local.is_file() and local.stat().st_size <= MAX_FILE_BYTES:
                chosen.append(local)
        for path in self.info.outs:
            local = self.root / path
            if not local.exists():
                continue
            files = _files(local)
            total = sum(f.stat().st_size for f in files)
            if any(f.suffix in WEIGHT_SUFFIXES for f in files):
                log.info("artifacts: %s holds model weights, not logged (models go to the registry)", path)
            elif total > MAX_OUT_BYTES:
                log.info(
                    "artifacts: %s is %.1f MB, over %d MB: not logged",
                    path,
                    total / 2**20,
                    MAX_OUT_BYTES >> 20,
                )
            else:
                chosen.extend(f for f in files if f.stat().st_size <= MAX_FILE_BYTES)
        with tempfile.TemporaryDirectory(prefix="chatuie-artifacts-") as tmp:
            for local in chosen:
                rel = local.relative_to(self.root)
                data = local.read_bytes()
                if any(s.encode() in data for s in self.secrets):
                    # Redacted copy: the file is logged, the secret is not.
                    for secret in self.secrets:
                        data = data.replace(secret.encode(), b"***")
                    redacted = Path(tmp) / rel
                    redacted.parent.mkdir(parents=True, exist_ok=True)
                    redacted.write_bytes(data)
                    local = redacted
                parent = rel.parent.as_posix()
                client.log_artifact(self.run_id, str(local), None if parent == "." else parent)


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def stage_run(
    info: StageInfo, root: str | Path | None = None, params_file: Mapping[str, Any] | None = None
) -> Iterator[str | None]:
    """Track the code inside as one run of stage ``info``; yields the run id (None: tracking off).

    The run ends FINISHED, or FAILED if the code raised (``SystemExit(0)`` counts as success), and
    the error propagates unchanged. Tracking failures raise :class:`TrackingError`.
    """
    if not tracking_enabled():
        yield None
        return
    started = time.monotonic()
    tracker = _StageTracker(info, find_root(root), params_file)
    run_id = tracker.start()
    overhead = time.monotonic() - started
    try:
        yield run_id
    except BaseException as err:
        ok = isinstance(err, SystemExit) and err.code in (0, None)
        status = "FINISHED" if ok else "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        try:
            tracker.finish(status)
        except TrackingError as tracking_err:  # never hide the stage's own error behind ours
            log.error("%s", tracking_err)
        raise
    finishing = time.monotonic()
    tracker.finish("FINISHED")
    overhead += time.monotonic() - finishing
    # What tracking cost this stage (mlflow import and store included): bench/ and the docs quote it.
    log.info("MLflow run %s of stage %s: tracking took %.2f s", run_id, info.name, overhead)


# ------------------------------------------------------------------------------ runs of an execution


@dataclass(frozen=True)
class RunLink:
    stage: str  # "" for the execution's parent run
    run_id: str
    status: str
    url: str


def ui_url(root: str | Path | None = None) -> str:
    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return os.environ.get(ENV_UI_URL, "http://127.0.0.1:5000").rstrip("/")


def execution_runs(execution: str, root: str | Path | None = None) -> list[RunLink]:
    """The parent run and the stage runs of one execution (oldest first), with UI links."""
    with _errors(f"listing the runs of execution {execution!r}", root):
        client = _client(root)
        experiment = client.get_experiment_by_name(os.environ.get(ENV_EXPERIMENT, DEFAULT_EXPERIMENT))
        if experiment is None:
            return []
        runs = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{TAG_EXECUTION}` = '{execution}'",
            order_by=["attributes.start_time ASC"],
            max_results=1000,
        )
    base = ui_url(root)
    return [
        RunLink(
            stage=run.data.tags.get(TAG_STAGE, ""),
            run_id=run.info.run_id,
            status=run.info.status,
            url=f"{base}/#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}",
        )
        for run in runs
    ]


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
    """Log ``model_dir`` (a chatuie.modeling.save_model directory) and register it as a new version.

    A full model goes in with the MLflow transformers flavor (weights copied from the directory, no
    load); a LoRA adapter is logged as artifacts with its base: a local base directory is bundled
    under ``base/``, a hub id is kept as a reference. ``summary`` (metrics/<model>.json's summary)
    becomes the version's tags; the gate (:func:`promote`) compares those, and pairs
    ``record_scores`` (chatuie.comparison.record_scores, logged as the run's record_scores.json)
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
        raise TrackingError(f"{model_dir}: no {NOTE_FILE}: not a chatuie.modeling.save_model directory")
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
    from chatuie.modeling import load_saved

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
        # A packaged base (chatuie.packaged): pinned by package version and GGUF sha256, rebuilt from
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


def download_model(uri: str, dst: str | Path | None = None, *, root: str | Path | None = None) -> Path:
    """A local directory loadable with :func:`chatuie.modeling.load_saved`, e.g. for
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


def _record_scores(client: MlflowClient, name: str, version: int) -> dict[str, Any] | None:
    """The record scores a version's run logged at registration (None for older versions)."""
    import mlflow

    run_id = client.get_model_version(name, str(version)).run_id
    if not run_id:
        return None
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=RECORD_SCORES_FILE)
    except Exception:  # noqa: BLE001 - a version registered before record scores were kept
        return None
    return json.loads(Path(local).read_text(encoding="utf-8"))


def _paired(client: MlflowClient, name: str, candidate: int, production: int | None) -> dict | None:
    from chatuie.comparison import paired_gain

    if production is None:
        return None
    before, after = _record_scores(client, name, production), _record_scores(client, name, candidate)
    if before is None or after is None:
        return None
    try:
        return paired_gain(before, after)
    except ValueError as err:  # other records: the protocol check refuses these anyway
        log.warning("no paired comparison of versions %s and %s: %s", production, candidate, err)
        return None


def _metric_tags(tags: Mapping[str, str]) -> dict[str, float]:
    return {k: v for k, raw in tags.items() if (v := _number(raw)) is not None}


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


def promote(
    version: int | None = None,
    policy: PromotionPolicy | None = None,
    *,
    name: str = REGISTERED_MODEL,
    root: str | Path | None = None,
) -> Decision:
    """Gate ``version`` (default: the latest) against production; alias it production or candidate.

    Promoted: ``production`` moves to it and it is pushed on the ``production_history`` tag (what
    :func:`rollback` pops). Not promoted: it gets ``candidate``. Either way the decision and its
    reason are version tags (``promotion.decision``, ``promotion.reason``...).
    """
    policy = policy or PromotionPolicy()
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
        candidate_tags = client.get_model_version(name, str(version)).tags
        production_tags = None if current is None else client.get_model_version(name, str(current)).tags
        paired = _paired(client, name, version, current)
        promoted, reason = decide(
            _metric_tags(candidate_tags),
            None if production_tags is None else _metric_tags(production_tags),
            policy,
            protocols=(candidate_tags.get(PROTOCOL_TAG), (production_tags or {}).get(PROTOCOL_TAG)),
            paired=paired,
        )
        decision = Decision(version, promoted, PRODUCTION if promoted else CANDIDATE, reason, current)
        if paired and "mean_ie_f1" in paired:
            gain = paired["mean_ie_f1"]
            client.set_model_version_tag(name, str(version), "promotion.mean_ie_f1_gain", str(gain["delta"]))
            client.set_model_version_tag(
                name, str(version), "promotion.mean_ie_f1_gain_ci95", json.dumps(gain["ci95"])
            )
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
