"""Prefect flows against real Prefect: the ephemeral API (temporary PREFECT_HOME) and a
`prefect server start` launched here. Both run the pipeline flow on copies of the smoke repo that
`dvc repro` already built once (smoke_repo), so only what a test changes really runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from chatuie import tracking
from flows.pipeline import apply_overrides, stage_graph
from tests.helpers.smoke_pipeline import VENV_BIN, clone, env, sh

ROOT = Path(__file__).resolve().parents[2]

# A stage that fails on its first attempt and passes on the second: the flow's retry at work.
PROBE = (
    "import pathlib, sys; p = pathlib.Path('flaky.marker'); seen = p.exists(); p.touch(); "
    "sys.exit(0 if seen else 3)"
)
FLAKY_STAGE = f"""
  flaky_probe:
    cmd: python -c "{PROBE}"
    deps:
      - metrics/register.json
"""


# Prefect 3.8.8's scheduler cannot insert flow runs with SQLAlchemy 2.1 (fine with 2.0.54): the
# server logs "Can't evaluate bulk DML statement" and no scheduled run ever appears.
SCHEDULER_BUG = "Prefect 3.8.8 scheduler vs SQLAlchemy 2.1: pin sqlalchemy==2.0.54 to get scheduled runs"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(check, what: str, timeout: float = 120.0, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """`prefect server start` on a free port with its own home; started early, it boots meanwhile."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    log = open(home / "server.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env(PREFECT_HOME=str(home), PREFECT_UI_ENABLED="false", PREFECT_SERVER_ANALYTICS_ENABLED="false"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"

    def healthy() -> bool:
        assert server.poll() is None, (home / "server.log").read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        yield {"url": url, "healthy": healthy, "home": home}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


# --------------------------------------------------------------------------------------------- fast


def test_apply_overrides_keeps_comments(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("sft:\n  train:\n    max_steps: 10   # steps\n  seed: 13\n")
    apply_overrides(params, {"sft.train.max_steps": 1, "new.section.key": "x"})
    text = params.read_text()
    assert re.search(r"max_steps: 1 +# steps", text)
    assert yaml.safe_load(text) == {
        "sft": {"train": {"max_steps": 1}, "seed": 13},
        "new": {"section": {"key": "x"}},
    }


@pytest.mark.slow
def test_stage_graph_is_dvcs(smoke_run) -> None:
    nodes = stage_graph(smoke_run.snapshot)
    names = [n.name for n in nodes]
    lock = yaml.safe_load((smoke_run.snapshot / "dvc.lock").read_text())["stages"]
    assert set(names) == set(lock)
    for node in nodes:  # every upstream stage comes first
        assert all(names.index(up) < names.index(node.name) for up in node.upstream)
    by_name = {n.name: n for n in nodes}
    assert set(by_name["sft"].upstream) == {"check_params", "base", "samples", "validate"}
    assert by_name["evaluate@sft"].metrics == ("metrics/sft.json",)
    samples = stage_graph(smoke_run.snapshot, ["samples"])
    assert [n.name for n in samples] == ["check_raw", "check_params", "prepare", "samples"]


# ---------------------------------------------------------------------------------------- ephemeral


def _read_back(flow_run_id) -> tuple:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return flow_run, {t.name: t for t in task_runs}, artifacts


@pytest.mark.slow
def test_pipeline_flow_on_the_ephemeral_api(
    smoke_run, prefect_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

    from flows.pipeline import ARTIFACT_KEY, pipeline
    from flows.promote import promote_flow

    repo = clone(smoke_run.snapshot, tmp_path / "repo")
    dvc_yaml = repo / "dvc.yaml"
    text = dvc_yaml.read_text()
    head, sep, tail = text.partition("\nplots:")
    dvc_yaml.write_text(head.rstrip("\n") + "\n" + FLAKY_STAGE + sep + tail)
    home = tmp_path / "prefect-home"
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", tracking.ENV_EXECUTION_ID):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setenv("PATH", f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}")
    with temporary_settings(
        updates={
            PREFECT_HOME: str(home),
            "server.database.connection_url": f"sqlite+aiosqlite:///{home}/prefect.db",
        },
        restore_defaults={PREFECT_API_URL},
    ):
        state = pipeline(
            root=str(repo),
            # `register` reruns (its params changed); the probe is flaky: retried once.
            overrides={"promote.min_f1_gain": 0.25, "flow.flaky_stages": ["flaky_probe"]},
            return_state=True,
        )
        assert state.is_completed(), state
        result = state.result()
        flow_run, task_runs, artifacts = _read_back(state.state_details.flow_run_id)
        promoted = promote_flow(version=1, root=str(repo))
        from prefect.server.api.server import SubprocessASGIServer

        SubprocessASGIServer().stop()  # now, not at interpreter exit (its log stream is closed by then)

    assert flow_run.state.is_completed()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert set(task_runs) == set(lock) | {"flaky_probe"}
    assert all(t.state.is_completed() for t in task_runs.values())
    assert task_runs["flaky_probe"].run_count >= 2  # failed (exit 3), retried
    assert task_runs["prepare"].run_count == 1
    stages = result["stages"]
    assert stages["register"]["status"] == "ran" and stages["prepare"]["status"] == "skipped"
    assert "min_f1_gain: 0.25" in (repo / "params.yaml").read_text()  # as dvc exp run -S leaves it

    (artifact,) = [a for a in artifacts if a.key == ARTIFACT_KEY]
    assert "| register | ran |" in artifact.data and "| prepare | skipped |" in artifact.data
    assert "summary.mean_ie_f1" in artifact.data
    # The stage runs of this flow run are one MLflow execution, linked from the artifact.
    links = tracking.execution_runs(result["execution_id"], repo)
    assert {link.stage for link in links} == {"", "register"}  # the parent and the one stage that ran
    assert all(link.url in artifact.data for link in links)
    assert promoted["alias"] == "production" and promoted["reason"] == "already production"


# ------------------------------------------------------------------------------------------- server


@pytest.mark.slow
def test_served_deployment_on_a_prefect_server(smoke_run, prefect_server, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    repo = clone(smoke_run.snapshot, tmp_path / "repo")
    _wait(prefect_server["healthy"], "the Prefect server", timeout=180)
    url = prefect_server["url"]
    served = subprocess.Popen(
        [str(VENV_BIN / "python"), "flows/deploy.py", "serve", "--root", str(repo)],
        cwd=repo,
        env=env(PREFECT_API_URL=url, PREFECT_HOME=str(prefect_server["home"])),
        stdout=open(tmp_path / "serve.log", "w"),  # noqa: SIM115 (closed with the process)
        stderr=subprocess.STDOUT,
    )
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:

            def deployment():
                assert served.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                try:
                    return client.read_deployment_by_name("chatuie-pipeline/smoke")
                except Exception:
                    return None

            found = _wait(deployment, "the served deployment", timeout=120)
            (schedule,) = found.schedules
            assert schedule.schedule.cron == "0 3 * * *" and schedule.schedule.timezone == "UTC"
            assert schedule.active and found.parameters == {"root": str(repo)}

            # A run now, executed by the serving process: the pipeline up to `samples` (up to date).
            run = client.create_flow_run_from_deployment(found.id, parameters={"targets": ["samples"]})
            done = _wait(
                lambda: (r := client.read_flow_run(run.id)).state.is_final() and r,
                "the served flow run",
                timeout=240,
                every=2,
            )
            assert done.state.is_completed(), (tmp_path / "serve.log").read_text()[-3000:]
            _, task_runs, artifacts = _read_back(run.id)
            assert set(task_runs) == {"check_raw", "check_params", "prepare", "samples"}
            assert any(a.key == "chatuie-pipeline" and "| samples | skipped |" in a.data for a in artifacts)

            # The server's scheduler fills in the schedule's next runs (03:00 UTC).
            def scheduled():
                return client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[found.id])),
                    flow_run_filter=FlowRunFilter(
                        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
                    ),
                )

            try:
                upcoming = _wait(scheduled, "scheduled runs", timeout=30, every=2)
            except AssertionError:
                server_log = (prefect_server["home"] / "server.log").read_text()
                if "Can't evaluate bulk DML statement" in server_log:
                    pytest.xfail(SCHEDULER_BUG)
                raise
            assert all(r.expected_start_time.hour == 3 for r in upcoming)
    finally:
        served.terminate()
        served.wait(timeout=30)


@pytest.mark.slow
def test_deployment_to_a_work_pool(smoke_run, prefect_server) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import deploy_to_pool

    _wait(prefect_server["healthy"], "the Prefect server", timeout=180)
    with (
        temporary_settings(updates={PREFECT_API_URL: prefect_server["url"]}),
        get_client(sync_client=True) as client,
    ):
        client.create_work_pool(WorkPoolCreate(name="chatuie-pool", type="process"))
        deployment_id = deploy_to_pool("chatuie-pool", smoke_run.snapshot, name="pooled")
        deployment = client.read_deployment(deployment_id)
    assert deployment.work_pool_name == "chatuie-pool"
    assert deployment.entrypoint == "flows/pipeline.py:pipeline"
    assert deployment.schedules[0].schedule.cron == "0 3 * * *"
    assert json.loads(json.dumps(deployment.parameters)) == {"root": str(smoke_run.snapshot.resolve())}


@pytest.mark.slow
def test_remote_stage_runs_on_a_work_pool_worker(smoke_run, prefect_server, tmp_path: Path) -> None:
    """flow.remote_stages: [sft] sends sft to the stage deployment on a process work pool; a worker
    started here runs it; the outputs and the MLflow run are those of the local smoke run."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import deploy_stage
    from flows.pipeline import pipeline

    repo = clone(smoke_run.snapshot, tmp_path / "repo")
    for out in ("models/sft", "models/checkpoints/sft"):  # same params: sft must run, as it did locally
        shutil.rmtree(repo / out)
    apply_overrides(repo / "params.yaml", {"flow.remote_stages": ["sft"], "flow.work_pool": "gpu-test"})
    _wait(prefect_server["healthy"], "the Prefect server", timeout=180)
    url = prefect_server["url"]
    worker_log = tmp_path / "worker.log"
    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="gpu-test", type="process"))
        deployment_id = deploy_stage(root=repo)  # flow.work_pool, flow.stage_deployment
        worker = subprocess.Popen(
            [str(VENV_BIN / "prefect"), "worker", "start", "--pool", "gpu-test", "--type", "process"],
            cwd=tmp_path,
            env=env(
                PREFECT_API_URL=url,
                PREFECT_HOME=str(prefect_server["home"]),
                PREFECT_WORKER_QUERY_SECONDS="2",
            ),
            stdout=open(worker_log, "w"),  # noqa: SIM115 (closed with the process)
            stderr=subprocess.STDOUT,
        )
        try:
            state = pipeline(root=str(repo), targets=["sft"], return_state=True)
        finally:
            # The remote flow run has ended by now; a graceful worker shutdown only costs time (~30 s).
            worker.kill()
            worker.wait(timeout=30)
        assert state.is_completed(), worker_log.read_text()[-3000:]
        result = state.result()
        _, task_runs, _ = _read_back(state.state_details.flow_run_id)
        (remote,) = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
        )
        deployment = client.read_deployment(deployment_id)
        link = client.read_task_run(remote.parent_task_run_id)  # run_deployment's link to the caller

    assert deployment.name == "stage"
    assert deployment.work_pool_name == "gpu-test"
    assert remote.state.is_completed() and remote.work_pool_name == "gpu-test"
    assert link.flow_run_id == state.state_details.flow_run_id  # a subflow run of the pipeline's
    assert task_runs["sft"].state.is_completed()
    assert remote.parameters["stage"] == "sft" and remote.parameters["execution"] == result["execution_id"]
    stages = result["stages"]
    assert stages["sft"]["status"] == "ran" and stages["sft"]["flow_run"] == str(remote.id)
    assert all(stages[s]["status"] == "skipped" for s in ("prepare", "samples", "validate", "base"))

    # The outputs: what the local run wrote; dvc.lock has the stage and it is up to date.
    local = smoke_run.snapshot
    for path in ("metrics/train/sft.json", "metrics/train/sft_loss.csv"):
        assert (repo / path).is_file()
    got, want = (json.loads((r / "metrics/train/sft.json").read_text()) for r in (repo, local))
    assert got["steps"] == want["steps"] and got["final_loss"] == pytest.approx(want["final_loss"], rel=1e-6)
    assert "sft" not in sh(["dvc", "status", "sft"], repo)  # "Data and pipelines are up to date."

    # The MLflow run: one run of stage sft, in this flow run's execution, as the local one.
    def sft_runs(root: Path) -> list:
        client = MlflowClient(tracking.tracking_uri(root))
        experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
        where = f"tags.`{tracking.TAG_STAGE}` = 'sft' and tags.`{tracking.TAG_KIND}` = 'stage'"
        return client.search_runs([experiment.experiment_id], filter_string=where)

    (run,) = sft_runs(repo)
    (local_run,) = sft_runs(smoke_run.repo)
    assert run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_EXECUTION] == result["execution_id"]
    assert run.data.params == local_run.data.params
    assert run.data.tags[tracking.TAG_DEPS] == local_run.data.tags[tracking.TAG_DEPS]
    assert run.data.metrics["final_loss"] == pytest.approx(local_run.data.metrics["final_loss"], rel=1e-6)
    assert run.data.metrics.keys() == local_run.data.metrics.keys()
