"""MLflow tracking of every stage run.

Fast tests drive chatuie.tracking on a hand-made stage in a temporary store; the slow ones read
back, through MlflowClient, what one `dvc repro` of the smoke profile recorded (shared with
test_registry/test_flows via smoke_repo), and run a stage against a real `mlflow server`.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from chatuie import tracking
from chatuie.tracking import PlotFile, StageInfo, TrackingError
from tests.helpers.pipeline_repo import up_to_date
from tests.helpers.smoke_pipeline import FAKE_SECRET, VENV_BIN, clone, env, sh
from tests.helpers.smoke_pipeline import params as repo_params

SECRET = "tok-abcdefgh-12345678"


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository root with its own local store; no server, no inherited execution."""
    for name in ("MLFLOW_TRACKING_URI", tracking.ENV_EXECUTION_ID, tracking.ENV_TRACKING):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    return tmp_path


def _client(root: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking.tracking_uri(root))


def _runs(client, **tags: str) -> list:
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()) or None
    return client.search_runs([experiment.experiment_id], filter_string=where, max_results=1000)


# --------------------------------------------------------------------------------------------- unit


def test_flatten() -> None:
    params = tracking.flatten_params({"train": {"max_steps": 10, "lr": 0.001}, "datasets": ["a", "b"]}, "sft")
    assert params == {"sft.train.max_steps": "10", "sft.train.lr": "0.001", "sft.datasets": '["a", "b"]'}
    metrics = tracking.flatten_metrics(
        {"ie": {"resume": {"f1": 12.5, "label": "x"}}, "ok": True, "none": None, "list": [1, {"a": 2}]}
    )
    assert metrics == {"ie.resume.f1": 12.5, "ok": 1.0, "list.0": 1.0, "list.1.a": 2.0}


def test_secrets_are_found_and_scrubbed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_API_TOKEN", SECRET)
    monkeypatch.setenv("MY_JUDGE_KEY_VAR", "short")  # named by params: scrubbed although short
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # a name that matches, a value that is no secret
    secrets = tracking.secret_values({"judge": {"api_key_env": "MY_JUDGE_KEY_VAR"}})
    assert SECRET in secrets and "short" in secrets and "false" not in secrets
    assert tracking.scrub(f"url?key={SECRET}&x=short", secrets) == "url?key=***&x=***"


def test_execution_id_groups_by_dvc_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tracking.ENV_EXECUTION_ID, raising=False)
    fake_dvc = tmp_path / "bin" / "dvc"  # any process named dvc: its children are one execution
    fake_dvc.parent.mkdir()
    probe = "from chatuie.tracking import execution_id; print(execution_id())"
    fake_dvc.write_text(
        f"#!{sys.executable}\nimport subprocess, sys\n"
        f"for _ in range(2):\n    subprocess.run(['/bin/sh', '-c', '{sys.executable} -c \"{probe}\"'])\n"
    )
    fake_dvc.chmod(0o755)
    first = subprocess.run([str(fake_dvc)], capture_output=True, text=True, check=True).stdout.split()
    second = subprocess.run([str(fake_dvc)], capture_output=True, text=True, check=True).stdout.split()
    assert len(first) == 2 and first[0] == first[1] and first[0].startswith("dvc-")
    assert second[0] == second[1] != first[0]
    monkeypatch.setenv(tracking.ENV_EXECUTION_ID, "prefect-123")
    assert tracking.execution_id() == "prefect-123"


def _fake_stage(root: Path) -> StageInfo:
    (root / "metrics").mkdir()
    (root / "metrics" / "train.json").write_text(
        json.dumps({"final_loss": 1.5, "nested": {"f1": 40.0}, "note": f"key {SECRET}"})
    )
    (root / "metrics" / "loss.csv").write_text("step,loss\n1,3.0\n2,2.5\n3,2.0\n")
    (root / "reports").mkdir()
    (root / "reports" / "summary.txt").write_text(f"the judge said hello with {SECRET}\n")
    (root / "reports" / "big.dat").write_bytes(b"x" * (tracking.MAX_FILE_BYTES + 1))
    (root / "model").mkdir()
    (root / "model" / "model.safetensors").write_bytes(b"weights")
    (root / "data.jsonl").write_text('{"a": 1}\n')
    return StageInfo(
        name="train",
        cmd="python tasks/train.py",
        params={"train": {"steps": 3, "url": f"https://x?key={SECRET}"}, "samples.chat": {"seed": 13}},
        deps={"data.jsonl": "0123456789abcdef0123456789abcdef", "tasks/train.py": "f" * 32},
        metrics=["metrics/train.json"],
        plots=[PlotFile("metrics/loss.csv", "step", "loss")],
        outs=["reports", "model"],
    )


def test_stage_run_records_params_metrics_artifacts_inputs_tags(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOME_API_TOKEN", SECRET)
    monkeypatch.setenv(tracking.ENV_EXECUTION_ID, "exec-1")
    info = _fake_stage(store)
    with tracking.stage_run(info, store) as run_id:
        assert run_id
    with pytest.raises(RuntimeError), tracking.stage_run(StageInfo(name="second"), store):
        raise RuntimeError("stage broke")

    client = _client(store)
    (parent,) = _runs(client, **{tracking.TAG_KIND: "execution"})
    children = {r.info.run_name: r for r in _runs(client, **{tracking.TAG_KIND: "stage"})}
    assert set(children) == {"train", "second"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    assert children["second"].info.status == "FAILED" and parent.info.status == "FAILED"
    run = client.get_run(children["train"].info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "3" and run.data.params["samples.chat.seed"] == "13"
    assert run.data.params["train.url"] == "https://x?key=***"
    assert run.data.metrics["final_loss"] == 1.5 and run.data.metrics["nested.f1"] == 40.0
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (1, 3.0),
        (2, 2.5),
        (3, 2.0),
    ]
    tags = run.data.tags
    assert tags[tracking.TAG_STAGE] == "train" and tags[tracking.TAG_EXECUTION] == "exec-1"
    assert tags["chatuie.dep.data.jsonl"] == "0123456789abcdef0123456789abcdef"
    assert tags[tracking.TAG_DEPS] == tracking.deps_fingerprint(info.deps)
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert inputs["data.jsonl"].dataset.digest == "0123456789abcdef0123456789abcdef"
    assert {t.key: t.value for t in inputs["tasks/train.py"].tags}["mlflow.data.context"] == "code"

    local = Path(client.download_artifacts(run.info.run_id, ""))
    files = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert files == [
        "metrics/loss.csv",
        "metrics/train.json",
        "reports/summary.txt",
    ]  # no big file, no weights
    assert "***" in (local / "reports" / "summary.txt").read_text()
    everything = b"".join(p.read_bytes() for p in store.joinpath("mlflow").rglob("*") if p.is_file())
    assert SECRET.encode() not in everything


def test_tracking_off_touches_nothing(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tracking.ENV_TRACKING, "off")
    with tracking.stage_run(StageInfo(name="x"), store) as run_id:
        assert run_id is None
    assert not (store / "mlflow").exists()


def test_unreachable_server_is_one_clear_error(store: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    expected = rf"MLflow at http://127.0.0.1:{port}: starting the run"
    with pytest.raises(TrackingError, match=expected), tracking.stage_run(StageInfo(name="x"), store):
        pass
    from tasks import _stage

    def boom() -> None:
        raise TrackingError("MLflow at somewhere: it broke")

    with pytest.raises(SystemExit) as exit_info:
        _stage.run(boom, track=False)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip() == "error: MLflow at somewhere: it broke"


# ------------------------------------------------------------------------------------ smoke pipeline


def _lock(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]


@pytest.mark.slow
def test_smoke_repro_is_one_execution_with_a_run_per_stage(smoke_run) -> None:
    repo = smoke_run.repo
    client = _client(repo)
    parents = sorted(_runs(client, **{tracking.TAG_KIND: "execution"}), key=lambda r: r.info.start_time)
    first = parents[0]  # later tests (test_registry) may add executions of their own
    assert first.info.run_name.startswith("nightly ***")  # the execution name carried the secret
    execution = first.data.tags[tracking.TAG_EXECUTION]
    assert execution.startswith("dvc-")
    runs = {
        r.info.run_name: r
        for r in _runs(client, **{tracking.TAG_EXECUTION: execution, tracking.TAG_KIND: "stage"})
    }
    # The repo as that run left it (test_registry changes the workspace afterwards).
    snapshot = smoke_run.snapshot
    lock = yaml.safe_load((snapshot / "dvc.lock").read_text())
    dvc_yaml = yaml.safe_load((snapshot / "dvc.yaml").read_text())["stages"]
    # check_raw and check_params (they only read data/raw and params.yaml) have no MLflow run.
    stages = {n for n in lock["stages"] if n.split("@")[0] in dvc_yaml}
    assert set(runs) == stages - {"check_raw", "check_params"}
    assert {"prepare", "sft", "evaluate@sft", "evaluate@base", "register"} <= set(runs)
    for name, run in runs.items():
        assert run.info.status == "FINISHED", name
        assert run.data.tags["mlflow.parentRunId"] == first.info.run_id
        tags = run.data.tags
        assert tags[tracking.TAG_STAGE] == name
        assert tags[tracking.TAG_COMMIT] == smoke_run.commit
        # Hashes taken at stage start equal what DVC wrote to dvc.lock after the stage.
        locked = {d["path"]: d["md5"] for d in lock["stages"][name]["deps"]}
        dep_tags = {
            k.removeprefix(tracking.TAG_DEP_PREFIX): v for k, v in tags.items() if "chatuie.dep." in k
        }
        assert dep_tags == locked
        assert tags[tracking.TAG_DEPS] == tracking.deps_fingerprint(locked)
        assert {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs} == locked
        definition = dvc_yaml[name.split("@")[0]]
        sections = definition.get("params") or definition.get("do", {}).get("params") or []
        for section in sections:  # a section, or a leaf of one (prepare's evaluate.zero_shot)
            if isinstance(section, dict):  # the profile's overlay: its values are in the merged sections
                assert list(section) == ["profiles/${profile}.yaml"], (name, section)
                continue
            assert any(p == section or p.startswith(f"{section}.") for p in run.data.params), (name, section)
        if definition.get("metrics") or definition.get("do", {}).get("metrics"):
            assert run.data.metrics, name
    summary = json.loads((snapshot / "metrics" / "sft.json").read_text())["summary"]
    assert runs["evaluate@sft"].data.metrics["summary.mean_ie_f1"] == summary["mean_ie_f1"]
    loss_rows = (snapshot / "metrics" / "train" / "sft_loss.csv").read_text().split()[1:]
    history = client.get_metric_history(runs["sft"].info.run_id, "loss")
    assert [m.step for m in history] == [int(r.split(",")[0]) for r in loss_rows]
    max_steps = repo_params(snapshot)["sft"]["train"]["max_steps"]  # the smoke profile's, not params.yaml's
    assert runs["sft"].data.params["sft.train.max_steps"] == str(max_steps)

    def artifacts(stage: str, path: str = "") -> set[str]:
        found = set()
        for item in client.list_artifacts(runs[stage].info.run_id, path):
            found |= artifacts(stage, item.path) if item.is_dir else {item.path}
        return found

    assert "reports/validation.json" in artifacts("validate")
    assert "metrics/validation.json" in artifacts("validate")
    evaluated = artifacts("evaluate@sft")
    assert {
        "metrics/sft.json",
        "reports/eval/sft/per_label.csv",
        "metrics/f1_by_dataset/sft.csv",
    } <= evaluated
    assert any(p.startswith("reports/eval/sft/predictions.") for p in evaluated)
    logged = {p for s in runs for p in artifacts(s)}
    assert not any(p.startswith("models/") for p in logged)  # weights only in the registry
    assert not any(p.startswith(("data/records", "data/samples", "data/judge_cache")) for p in logged)
    assert runs["sft"].data.metrics["final_loss"] > 0
    assert {"metrics/train/sft.json", "metrics/train/sft_loss.csv"} <= artifacts("sft")


@pytest.mark.slow
def test_smoke_store_holds_no_secret(smoke_run) -> None:
    store = smoke_run.repo / "mlflow"
    assert (store / "mlflow.db").exists() and not (store / "__init__.py").exists()
    for path in store.rglob("*"):
        if path.is_file():
            assert FAKE_SECRET.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_second_repro_creates_no_run(smoke_run, tmp_path: Path) -> None:
    repo = clone(smoke_run.snapshot, tmp_path / "repo", store=True)
    client = _client(repo)
    before = len(_runs(client))
    out = sh(["dvc", "repro"], repo)
    assert up_to_date(out), out
    assert len(_runs(client)) == before


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_stage_against_a_real_mlflow_server(
    smoke_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.request

    port = _free_port()
    server = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "server.log", "w"),  # noqa: SIM115 (closed with the process)
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        repo = clone(smoke_run.snapshot, tmp_path / "repo")
        secret_env = env(
            MLFLOW_TRACKING_URI=url,
            CHATUIE_JUDGE_API_KEY=FAKE_SECRET,
            CHATUIE_EXECUTION_NAME=f"x {FAKE_SECRET}",
        )
        sh(["dvc", "repro", "-f", "-s", "register"], repo, secret_env)
        assert not (repo / "mlflow" / "mlflow.db").exists()  # everything went to the server
        from mlflow.tracking import MlflowClient

        client = MlflowClient(url, registry_uri=url)
        (parent,) = _runs(client, **{tracking.TAG_KIND: "execution"})
        (run,) = _runs(client, **{tracking.TAG_KIND: "stage"})
        assert run.info.run_name == "register" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        model = repo_params(repo)["register"]["model"]
        assert run.data.params["register.model"] == model and "promote.min_f1_gain" in run.data.params
        assert "registered.mean_ie_f1" in run.data.metrics and run.data.metrics["version"] == 1
        assert [a.path for a in client.list_artifacts(run.info.run_id, "metrics")] == [
            "metrics/register.json"
        ]
        assert {i.dataset.name for i in run.inputs.dataset_inputs} >= {
            f"models/{model}",
            f"metrics/{model}.json",
        }
        production = client.get_model_version_by_alias("chatuie", "production")
        assert production.version == "1" and production.run_id == run.info.run_id
        assert parent.info.run_name == "x ***"
        for path in tmp_path.rglob("*"):  # the server's database and artifacts
            if path.is_file() and "repo" not in path.relative_to(tmp_path).parts:
                assert FAKE_SECRET.encode() not in path.read_bytes(), path
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # proxied artifacts come back over HTTP
        model_dir = tracking.download_model("models:/chatuie@production", tmp_path / "dl")
        assert {"config.json", "tokenizer.json", "chatuie_model.json"} <= {
            p.name for p in model_dir.iterdir()
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
