"""Every stage run an MLflow run: params, metrics, artifacts, dataset inputs and tags (see
:mod:`chatuie.tracking`), grouped under one parent run per pipeline execution."""

from __future__ import annotations

import contextlib
import csv
import getpass
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chatuie.tracking.store import (
    DEFAULT_EXPERIMENT,
    ENV_EXECUTION_ID,
    ENV_EXECUTION_NAME,
    ENV_EXPERIMENT,
    ENV_UI_URL,
    MAX_FILE_BYTES,
    MAX_OUT_BYTES,
    TAG_COMMIT,
    TAG_DEP_PREFIX,
    TAG_DEPS,
    TAG_EXECUTION,
    TAG_KIND,
    TAG_STAGE,
    WEIGHT_SUFFIXES,
    TrackingError,
    _client,
    _errors,
    _experiment_id,
    _key,
    _number,
    _read_structured,
    find_root,
    flatten_metrics,
    flatten_params,
    scrub,
    secret_values,
    tracking_enabled,
    tracking_uri,
)

if TYPE_CHECKING:  # mlflow is imported lazily, inside the functions that need it
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


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


def log_run_params(params: Mapping[str, Any]) -> None:
    """Params a stage settles while it runs (``model.dtype: auto`` -> ``float32`` on this machine),
    added to its active run; nothing when no stage run is active (tracking off, a plain CLI)."""
    if not tracking_enabled() or "mlflow" not in sys.modules:  # no run without mlflow imported
        return
    import mlflow

    if mlflow.active_run() is None:
        return
    mlflow.log_params({key: str(value) for key, value in params.items()})


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
