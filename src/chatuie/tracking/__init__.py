"""MLflow for the project: every stage run tracked, and the model registry (its aliases move
through :func:`gate_version`, with the rule of chatuie.eval.promotion).

This is the one module that imports ``mlflow`` (lazily: a stage run with ``CHATUIE_TRACKING=off``
never imports it). It knows nothing of DVC or Prefect: callers describe a stage with
:class:`StageInfo` (``tasks/_stage.py`` builds it from DVC's own view of ``dvc.yaml``).

Where runs go: ``MLFLOW_TRACKING_URI`` if set (a server, no code change), else a sqlite store in
the repository, ``sqlite:///<root>/mlflow/mlflow.db`` with artifacts in ``<root>/mlflow/artifacts``.

What a stage run records (:func:`stage_run`):

* params: the stage's params sections (as listed under ``params:`` in dvc.yaml, with the values
  the stage reads: the active profile merged in), flattened to ``section.key.subkey``;
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

from chatuie.tracking.registry import (
    CANDIDATE,
    PROTOCOL_TAG,
    Decision,
    VersionView,
    download_model,
    gate_version,
    pip_requirements,
    production_version,
    register_model,
    rollback,
)
from chatuie.tracking.runs import (
    PlotFile,
    RunLink,
    StageInfo,
    deps_fingerprint,
    execution_id,
    execution_runs,
    git_commit,
    log_run_params,
    stage_run,
    ui_url,
)
from chatuie.tracking.store import (
    DEFAULT_EXPERIMENT,
    ENV_EXECUTION_ID,
    ENV_EXECUTION_NAME,
    ENV_EXPERIMENT,
    ENV_TRACKING,
    ENV_UI_URL,
    HISTORY_TAG,
    MAX_FILE_BYTES,
    MAX_OUT_BYTES,
    NOTE_FILE,
    PRODUCTION,
    PROMPT_FILE,
    REGISTERED_MODEL,
    STORE_DIR,
    TAG_COMMIT,
    TAG_DEP_PREFIX,
    TAG_DEPS,
    TAG_EXECUTION,
    TAG_KIND,
    TAG_STAGE,
    WEIGHT_SUFFIXES,
    TrackingError,
    find_root,
    flatten_metrics,
    flatten_params,
    scrub,
    secret_values,
    tracking_enabled,
    tracking_uri,
)

__all__ = [
    "CANDIDATE",
    "DEFAULT_EXPERIMENT",
    "Decision",
    "VersionView",
    "ENV_EXECUTION_ID",
    "ENV_EXECUTION_NAME",
    "ENV_EXPERIMENT",
    "ENV_TRACKING",
    "ENV_UI_URL",
    "HISTORY_TAG",
    "MAX_FILE_BYTES",
    "MAX_OUT_BYTES",
    "NOTE_FILE",
    "PRODUCTION",
    "PROMPT_FILE",
    "PROTOCOL_TAG",
    "PlotFile",
    "REGISTERED_MODEL",
    "RunLink",
    "STORE_DIR",
    "StageInfo",
    "TAG_COMMIT",
    "TAG_DEPS",
    "TAG_DEP_PREFIX",
    "TAG_EXECUTION",
    "TAG_KIND",
    "TAG_STAGE",
    "TrackingError",
    "WEIGHT_SUFFIXES",
    "deps_fingerprint",
    "download_model",
    "execution_id",
    "execution_runs",
    "log_run_params",
    "find_root",
    "flatten_metrics",
    "flatten_params",
    "git_commit",
    "pip_requirements",
    "production_version",
    "gate_version",
    "register_model",
    "rollback",
    "scrub",
    "secret_values",
    "stage_run",
    "tracking_enabled",
    "tracking_uri",
    "ui_url",
]
