"""Prefect flow: the DVC pipeline, one Prefect task run per DVC stage.

DVC stays the one source of truth: the stage graph is DVC's own (``Repo.index.graph``: dvc.yaml
with foreach/matrix/vars resolved) and each stage runs through ``dvc repro --single-item <stage>``,
so an up-to-date stage is skipped and dvc.lock is written as by ``dvc repro``. Stages run one at a
time in DVC's order (DVC holds one lock per repository); each task waits on its upstream tasks, so
Prefect's UI draws the same graph.

* A stage's output streams into its task run's logs.
* Stages in ``flow.flaky_stages`` (params.yaml; e.g. the judge-calling ``reward_data``) are retried
  ``flow.retries`` times.
* ``overrides`` set params like ``dvc exp run -S``: dotted keys written into params.yaml (or the
  active profile's overlay, for a key the profile sets) before the run (comments kept) and left
  there, so the workspace, dvc.lock and MLflow agree afterwards.
* ``CHATUIE_EXECUTION_ID=prefect-<flow run id>`` groups the stage runs under one MLflow parent run.
* A markdown artifact (key ``chatuie-pipeline``) lists the stages, their metrics and MLflow runs.
* Stages in ``flow.remote_stages`` (e.g. ``[sft, rm, rl]``) run as flow runs of the stage deployment
  (``chatuie-stage/<flow.stage_deployment>``, :func:`stage_flow`, registered on the work pool
  ``flow.work_pool`` by ``python -m flows.deploy deploy-stage``): a worker of that pool (a GPU
  machine) picks each up and runs ``dvc repro --single-item`` in the deployment's checkout; this
  flow waits for it (a subflow run of its task run). That checkout is the deployment's ``root``
  parameter: this repository on a shared filesystem (or the same machine), so outputs and
  dvc.lock land here; the MLflow run joins this execution's parent run (same server).

Run once: ``python -m flows.pipeline [--set key=value ...] [--target stage ...] [--force]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from chatuie import tracking
from chatuie.config import build, load_params, overlay_path, read_yaml
from chatuie.config.params import ADD, PROFILE_KEY, REMOVE
from tasks._stage import stage_address

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT_KEY = "chatuie-pipeline"
STAGE_FLOW = "chatuie-stage"  # the flow of one stage (flow.remote_stages run as its deployment's runs)


@dataclass(frozen=True)
class ScheduleConfig:
    cron: str = "0 3 * * *"
    timezone: str = "UTC"
    active: bool = True


@dataclass(frozen=True)
class FlowConfig:
    """``flow`` section of params.yaml (read by the flows; no stage depends on it)."""

    flaky_stages: list[str] = field(default_factory=lambda: ["reward_data"])
    retries: int = 2
    retry_delay_seconds: float = 30.0
    deployment: str = "nightly"
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # Stages run by a worker of a work pool (a GPU machine) instead of in this flow's process.
    remote_stages: list[str] = field(default_factory=list)
    work_pool: str = "gpu"  # the pool `flows/deploy.py deploy-stage` registers the stage deployment on
    stage_deployment: str = "stage"  # the deployment chatuie-stage/<this>

    @property
    def stage_deployment_name(self) -> str:
        return f"{STAGE_FLOW}/{self.stage_deployment}"


def flow_config(root: str | Path = ROOT) -> FlowConfig:
    params = load_params(Path(root) / "params.yaml")
    return build(FlowConfig, params.get("flow"), "params.yaml: flow")


@dataclass(frozen=True)
class StageNode:
    name: str  # DVC's address: "sft", "evaluate@sft"
    upstream: tuple[str, ...]  # stages (of this run) it depends on
    metrics: tuple[str, ...]  # its metrics files


def stage_graph(root: str | Path = ROOT, targets: list[str] | None = None) -> list[StageNode]:
    """The stages with a command, in an order DVC would run them (dvc.yaml order among equals).

    ``targets``: only these stages (a foreach group by its name: ``evaluate``) and their upstream.
    """
    import networkx as nx
    from dvc.repo import Repo

    root = Path(root)
    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges: stage -> a stage it depends on
        position = {stage: i for i, stage in enumerate(repo.index.stages)}
        selected = {s for s in graph.nodes if getattr(s, "cmd", None)}
        name = {s: stage_address(s, root) for s in selected}
        if targets:
            wanted = {
                s for s in selected if any(name[s] == t or name[s].startswith(f"{t}@") for t in targets)
            }
            missing = [
                t for t in targets if not any(name[s] == t or name[s].startswith(f"{t}@") for s in wanted)
            ]
            if missing:
                raise ValueError(f"no stage {', '.join(missing)} in {Path(root) / 'dvc.yaml'}")
            selected &= wanted.union(*(nx.descendants(graph, s) for s in wanted))
        order = nx.lexicographical_topological_sort(graph.reverse(), key=lambda s: position.get(s, -1))
        return [
            StageNode(
                name[stage],
                tuple(name[up] for up in graph.successors(stage) if up in selected),
                tuple(out.def_path for out in stage.outs if out.metric),
            )
            for stage in order
            if stage in selected
        ]


def apply_overrides(params_path: Path, overrides: Mapping[str, Any]) -> None:
    """``{"sft.train.max_steps": 1}`` into params.yaml, as ``dvc exp run -S`` (comments kept).

    A key the active profile sets (or removes with ``~key``, or adds with ``+key``) goes into the
    profile's overlay instead (profiles/<name>.yaml), where it takes effect; ``profile`` first, so
    the others go where the new profile would read them. A key below one the profile sets to a
    non-mapping or removes is refused (the merged value would not be what the same override of a
    full params file gives): override that key whole.
    """
    from dvc.utils.serialize import modify_yaml

    for dotted in sorted(overrides, key=lambda k: k != PROFILE_KEY):
        target, keys = _override_target(params_path, dotted)
        value = overrides[dotted]
        if target != params_path and not any(k.startswith(ADD) for k in keys):
            value = _whole(value, _at(read_yaml(params_path), keys))
        with modify_yaml(target) as data:
            node = data
            for key in keys[:-1]:
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
                if not isinstance(node, MutableMapping):
                    raise ValueError(f"override {dotted}: {key} is not a mapping in {target}")
            leaf = keys[-1]
            if f"{REMOVE}{leaf}" in node:  # the profile removed it: now it sets it, in the same place
                at = list(node).index(f"{REMOVE}{leaf}")
                del node[f"{REMOVE}{leaf}"]
                if hasattr(node, "insert"):
                    node.insert(at, leaf, value)
                    continue
            node[leaf] = value


def _at(params: Any, keys: list[str]) -> Any:
    for key in keys:
        params = params.get(key) if isinstance(params, Mapping) else None
    return params


def _whole(value: Any, default: Any) -> Any:
    """An override's mapping as overlay text that merges into ``default`` (params.yaml's value
    there) to the mapping itself: ``~key`` for each key it leaves out, ``+key`` for one it adds."""
    if not isinstance(value, Mapping) or not isinstance(default, Mapping):
        return value
    whole = {k if k in default else f"{ADD}{k}": _whole(v, default.get(k)) for k, v in value.items()}
    return whole | {f"{REMOVE}{k}": None for k in default if k not in value}


def _override_target(params_path: Path, dotted: str) -> tuple[Path, list[str]]:
    """Where override ``dotted`` takes effect: (params.yaml or the active overlay, its key path there)."""
    keys = dotted.split(".")
    overlay = overlay_path(params_path) if dotted != PROFILE_KEY else None
    if overlay is None:
        return params_path, keys
    node: Any = read_yaml(overlay)
    path: list[str] = []
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if f"{ADD}{key}" in node:  # added by the profile: below it, the overlay's value as written
            return overlay, [*path, f"{ADD}{key}", *keys[i + 1 :]]
        if f"{REMOVE}{key}" in node:
            if last:
                return overlay, [*path, key]
            raise ValueError(
                f"override {dotted}: {overlay} removes {'.'.join(keys[: i + 1])}: override it whole"
            )
        if key not in node:
            return params_path, keys  # the profile leaves it to params.yaml
        path.append(key)
        node = node[key]
        if not last and not isinstance(node, Mapping):
            raise ValueError(
                f"override {dotted}: {overlay} sets {'.'.join(keys[: i + 1])} to {node!r}: override it whole"
            )
    return overlay, path


class StageFailed(RuntimeError):
    pass


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(stage: str, root: str, env: dict[str, str], force: bool = False) -> dict[str, Any]:
    """``dvc repro --single-item <stage>``, its output into this task's logs; ran or skipped."""
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    started = time.monotonic()
    ran = False
    with subprocess.Popen(
        command,
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                logger.info(line)
            ran = ran or line.startswith(f"Running stage '{stage}'")
    seconds = round(time.monotonic() - started, 1)
    if proc.returncode != 0:
        raise StageFailed(f"stage {stage}: dvc repro exited {proc.returncode} after {seconds}s")
    return {"stage": stage, "status": "ran" if ran else "skipped", "seconds": seconds}


def _stage_env(execution: str, name: str) -> dict[str, str]:
    env = dict(os.environ)
    env[tracking.ENV_EXECUTION_ID] = execution
    env[tracking.ENV_EXECUTION_NAME] = name
    # `python` in stage commands must be this environment's; progress bars would flood the logs.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    return env


def _is_flaky(stage: str, config: FlowConfig) -> bool:
    return stage in config.flaky_stages or stage.split("@")[0] in config.flaky_stages


def _is_remote(stage: str, config: FlowConfig) -> bool:
    return stage in config.remote_stages or stage.split("@")[0] in config.remote_stages


@flow(name=STAGE_FLOW, flow_run_name="{stage}")
def stage_flow(
    stage: str, root: str, execution: str = "", execution_name: str = "", force: bool = False
) -> dict[str, Any]:
    """One DVC stage as a flow run of its own: what a work pool's worker runs for ``remote_stages``.

    ``root``: the checkout on the worker's machine (the deployment's parameter). ``execution``: the
    pipeline's MLflow execution id, so the stage's run joins the pipeline's parent run.
    """
    from prefect.runtime import flow_run

    env = _stage_env(execution or f"prefect-{flow_run.id}", execution_name or f"prefect {flow_run.name}")
    return run_stage(stage, str(Path(root).resolve()), env, force)


@task(name="remote-stage", task_run_name="{stage}")
def run_remote_stage(
    stage: str, deployment: str, execution: str, execution_name: str, force: bool = False
) -> dict[str, Any]:
    """Run ``stage`` as a flow run of ``deployment`` (a worker of its pool picks it up); wait for it."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    started = time.monotonic()
    parameters = {"stage": stage, "execution": execution, "execution_name": execution_name, "force": force}
    logger.info("stage %s: a run of deployment %s", stage, deployment)
    remote = run_deployment(name=deployment, parameters=parameters, timeout=None, poll_interval=2)
    seconds = round(time.monotonic() - started, 1)
    if not remote.state or not remote.state.is_completed():
        state = remote.state.name if remote.state else "unknown"
        raise StageFailed(
            f"stage {stage}: flow run {remote.name} of {deployment} ended {state} after {seconds}s"
        )
    try:
        status = remote.state.result()["status"]  # the worker's result store, where readable from here
    except Exception:
        status = "ran"
    logger.info("stage %s: flow run %s (%s) %s", stage, remote.name, remote.id, status)
    return {"stage": stage, "status": status, "seconds": seconds, "flow_run": str(remote.id)}


def _headline(flat: dict[str, float]) -> dict[str, float]:
    """The metrics worth a table row: a summary block if there is one, else shallow keys."""
    summary = {k: v for k, v in flat.items() if k.startswith("summary.")}
    return summary or dict(list({k: v for k, v in flat.items() if k.count(".") <= 1}.items())[:12])


def report_markdown(root: Path, nodes: list[StageNode], results: dict[str, dict], execution: str) -> str:
    links: dict[str, tracking.RunLink] = {}
    if tracking.tracking_enabled():
        links = {link.stage: link for link in tracking.execution_runs(execution, root)}
    lines = ["# chatuie pipeline", "", f"Execution `{execution}`"]
    if "" in links:
        lines[-1] += f" — [MLflow parent run]({links[''].url})"
    lines += ["", "| stage | status | seconds | MLflow run |", "|---|---|---|---|"]
    for node in nodes:
        result = results.get(node.name, {"status": "not run", "seconds": ""})
        link = links.get(node.name)
        cell = f"[{link.run_id[:8]}]({link.url}) ({link.status.lower()})" if link else "—"
        lines.append(f"| {node.name} | {result['status']} | {result['seconds']} | {cell} |")
    lines += ["", "## Metrics", "", "| stage | metric | value |", "|---|---|---|"]
    for node in nodes:
        for path in node.metrics:
            file = root / path
            if not file.is_file():
                continue
            try:
                flat = tracking.flatten_metrics(yaml.safe_load(file.read_text(encoding="utf-8")))
            except yaml.YAMLError:
                continue
            for key, value in _headline(flat).items():
                lines.append(f"| {node.name} | {key} | {value:g} |")
    return "\n".join(lines) + "\n"


@flow(name="chatuie-pipeline")
def pipeline(
    root: str | None = None,
    targets: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """The DVC pipeline of ``root`` (default: this repository), stage by stage."""
    from prefect.runtime import flow_run

    logger = get_run_logger()
    repo = Path(root or ROOT).resolve()
    if overrides:
        apply_overrides(repo / "params.yaml", overrides)
        logger.info("params.yaml overrides: %s", overrides)
    config = flow_config(repo)
    nodes = stage_graph(repo, targets)
    execution = f"prefect-{flow_run.id}"
    execution_name = f"prefect {flow_run.name}"
    env = _stage_env(execution, execution_name)
    futures: dict[str, Any] = {}
    results: dict[str, dict] = {}
    try:
        for node in nodes:
            upstream = [futures[u] for u in node.upstream if u in futures]
            if _is_remote(node.name, config):
                stage_task = run_remote_stage
                args: tuple = (node.name, config.stage_deployment_name, execution, execution_name, force)
            else:
                stage_task, args = run_stage, (node.name, str(repo), env, force)
            if _is_flaky(node.name, config):
                stage_task = stage_task.with_options(
                    retries=config.retries, retry_delay_seconds=config.retry_delay_seconds
                )
            future = stage_task.submit(*args, wait_for=upstream)
            futures[node.name] = future
            try:
                results[node.name] = future.result()  # one at a time: DVC locks the repository
            except Exception:
                results[node.name] = {"status": "failed", "seconds": ""}
                raise
    finally:
        create_markdown_artifact(
            markdown=report_markdown(repo, nodes, results, execution),
            key=ARTIFACT_KEY,
            description="chatuie pipeline: stages, metrics, MLflow runs",
        )
    return {"execution_id": execution, "flow_run_id": str(flow_run.id), "stages": results}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the DVC pipeline as a Prefect flow.")
    parser.add_argument("--root", default=str(ROOT))
    parser.add_argument("--target", action="append", default=None, help="stage (and its upstream) only")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as dvc exp run -S")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)  # as -S: 1 is an int, true a bool
    print(pipeline(root=args.root, targets=args.target, overrides=overrides or None, force=args.force))


if __name__ == "__main__":
    main()
