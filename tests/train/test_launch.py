"""Data-parallel stages (chatuie.train.launch): the batch split, the launch command, the GPU profile, and
2 processes over gloo on this machine for `rm` and `sft` (real `dvc repro`, real MLflow store),
compared with the 1-process smoke run, including a kill of the launcher and a resume."""

from __future__ import annotations

import csv
import importlib
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from conftest import profile_params, profiled_params

from chatuie import tracking
from chatuie.config import ConfigError, build, load_params
from chatuie.train.launch import LaunchError, LaunchSettings, launch_command, per_process_batch, relaunch
from tests.helpers.smoke_pipeline import clone, sh, stage_running_until
from tests.helpers.smoke_pipeline import params as repo_params

ROOT = Path(__file__).resolve().parents[2]
# Loss after N steps, 2 processes vs 1, same global batch: the same samples make each global
# batch (accelerate hands the one sampler's batches to the ranks in turn), the loss is averaged
# over the global batch's tokens (transformers' average_tokens_across_devices) or pairs (equal
# shards), gradients are all-reduced in float32. What differs is summation order (per-rank sums,
# gloo's all-reduce, 1 vs 2 torch threads): float32 rounding, measured 1.4e-7 relative after the
# smoke profile's 10 sft steps. 1e-4 leaves room for its growth over steps and still fails on a
# changed batch or data order (either moves the smoke losses by > 1e-3).
RTOL = 1e-4


def _losses(path: Path) -> dict[int, float]:
    with open(path, newline="") as handle:
        return {int(row["step"]): float(row["loss"]) for row in csv.DictReader(handle)}


def _assert_close(got: dict[int, float], want: dict[int, float], skip: set[int] = frozenset()) -> float:
    assert sorted(got) == sorted(want)
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in want if s not in skip)
    assert worst <= RTOL, f"2-process losses {got} vs 1-process {want}: {worst:.2e} relative"
    return worst


def _set(repo: Path, **dotted: object) -> None:
    from flows.pipeline import apply_overrides

    apply_overrides(repo / "params.yaml", dotted)


def _stage_runs(repo: Path, stage: str) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri(repo))
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    assert experiment is not None
    where = f"tags.`{tracking.TAG_STAGE}` = '{stage}' and tags.`{tracking.TAG_KIND}` = 'stage'"
    return client.search_runs([experiment.experiment_id], filter_string=where, max_results=100)


def _stage_processes(repo: Path, script: str) -> dict[int, dict[str, str]]:
    """pid -> environment of the processes running module ``script`` in ``repo`` (launcher and
    workers)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if script.encode() not in argv or Path(os.readlink(proc / "cwd")) != repo:
                continue
            environ = dict(
                item.split("=", 1) for item in (proc / "environ").read_text().split("\0") if "=" in item
            )
        except OSError:
            continue
        found[int(proc.name)] = environ
    return found


# --------------------------------------------------------------------------------------------- fast


def test_global_batch_is_split_over_processes() -> None:
    assert per_process_batch(8, 1, 1) == (8, 1)
    assert per_process_batch(8, 1, 2) == (4, 1)
    assert per_process_batch(4, 16, 8) == (4, 2)  # the gpu profile's sft: 64 = 8 GPUs x 4 x 2
    assert per_process_batch(2, 16, 8) == (2, 2)
    assert per_process_batch(3, 4, 2) == (3, 2)  # 6 per process: 3 x 2 (never above the params' 3)
    with pytest.raises(LaunchError, match="does not divide"):
        per_process_batch(3, 1, 2)


def test_launch_command_and_checks(tmp_path: Path) -> None:
    command = launch_command(LaunchSettings(processes=2), ["tasks/sft.py"], port=29555)
    assert command[-1] == "tasks/sft.py"
    assert command[command.index("--num_processes") + 1] == "2" and "--multi_gpu" in command
    assert command[command.index("--main_process_port") + 1] == "29555"
    config = tmp_path / "8gpu.yaml"
    config.write_text("distributed_type: MULTI_GPU\nnum_processes: 8\n")
    with pytest.raises(LaunchError, match="num_processes: 8"):
        launch_command(LaunchSettings(processes=2, accelerate_config=str(config)), ["tasks/sft.py"])
    command = launch_command(LaunchSettings(processes=8, accelerate_config=str(config)), ["tasks/rm.py"])
    assert command[command.index("--config_file") + 1] == str(config) and "--multi_gpu" not in command
    with pytest.raises(ConfigError, match="processes"):
        LaunchSettings(processes=0)
    assert relaunch(LaunchSettings()) is False  # one process: the stage trains itself
    with pytest.raises(LaunchError, match="does not divide"):  # before any worker starts
        relaunch(LaunchSettings(processes=2), ["tasks/sft.py"], batch=(3, 1))


def _section_readers() -> dict[str, type]:
    """Section name -> the dataclass a stage (or the flow) builds it into, found in tasks/*.py."""
    readers: dict[str, type] = {}
    for script in sorted((ROOT / "tasks").glob("*.py")):
        text = script.read_text(encoding="utf-8")
        calls = re.findall(r'section\("(\w+)", (\w+)\)', text)
        if not calls:
            continue
        module = importlib.import_module(f"tasks.{script.stem}")
        for name, cls in calls:
            readers[name] = getattr(module, cls)
    from flows.pipeline import FlowConfig

    readers["flow"] = FlowConfig
    return readers


def test_gpu_profile_sets_only_what_the_stages_read(tmp_path: Path) -> None:
    """The gpu profile cannot run here (no GPU, no hub): profiles/gpu.yaml merges over params.yaml,
    each section builds into the dataclass its stage reads (unknown keys fail), and its accelerate
    configs match its launches."""
    profile = load_params(profiled_params(tmp_path, "gpu"))
    assert profile.pop("profile") == "gpu"
    readers = _section_readers()
    assert set(profile) <= set(readers), sorted(set(profile) - set(readers))
    assert set(profile_params("default")) == set(profile)
    built = {name: build(readers[name], profile[name], f"profiles/gpu.yaml: {name}") for name in profile}
    assert built["model"].base == "Qwen/Qwen2.5-7B-Instruct" and built["model"].dtype == "bfloat16"
    assert built["model"].lora is not None and built["sft"].merge_lora
    assert built["sft"].train.device == "auto" and built["rm"].train.device == "auto"
    for stage in ("sft", "rm"):
        launch = built[stage].launch
        assert launch.processes == 8
        config = yaml.safe_load((ROOT / launch.accelerate_config).read_text())
        assert config["num_processes"] == launch.processes and config["use_cpu"] is False
        launch_command(launch, [f"tasks/{stage}.py"])  # the process counts agree
        train = built[stage].train
        per_process_batch(train.per_device_batch_size, train.gradient_accumulation, launch.processes)
    assert set(built["flow"].remote_stages) == {"sft", "rm", "rl"}
    # The defaults do not change: one process, no remote stage.
    defaults = profile_params("default")
    assert build(readers["sft"], defaults["sft"], "sft").launch.processes == 1
    assert build(readers["rm"], defaults["rm"], "rm").launch.processes == 1
    assert build(readers["flow"], defaults["flow"], "flow").remote_stages == []


# ---------------------------------------------------------------------------------------- 2 processes


@pytest.mark.slow
def test_two_processes_over_gloo_match_one_and_resume_after_a_kill(smoke_run, tmp_path: Path) -> None:
    repo = clone(smoke_run.snapshot, tmp_path / "repo")
    one = smoke_run.snapshot  # the 1-process run of the same params (same global batch)
    # sft checkpoints every 2 steps (the smoke run: 5), so 8 of its 10 steps are left at the kill:
    # with 5 left, the workers could finish and save the model before their watchdog saw the
    # launcher gone. Checkpoints change no weight: the curves still match the 1-process run's.
    _set(repo, **{"rm.launch.processes": 2, "sft.launch.processes": 2, "sft.train.save_steps": 2})

    # rm: 2 processes, each half of every global batch of pairs.
    started = time.monotonic()
    sh(["dvc", "repro", "--single-item", "rm"], repo)
    rm_seconds = time.monotonic() - started
    curve = "metrics/train/rm_loss.csv"
    worst_rm = _assert_close(_losses(repo / curve), _losses(one / curve))
    rm_metrics = yaml.safe_load((repo / "metrics/rm.json").read_text())
    assert rm_metrics["steps"] == yaml.safe_load((one / "metrics/rm.json").read_text())["steps"]
    (rm_run,) = _stage_runs(repo, "rm")  # one run for the stage, not one per process
    assert rm_run.info.status == "FINISHED"
    assert rm_run.data.params["rm.launch.processes"] == "2"
    assert rm_run.data.metrics["final_loss"] == pytest.approx(rm_metrics["final_loss"])

    # sft: 2 processes; the launcher is SIGKILLed after the first checkpoint, the rerun resumes.
    checkpoints = repo / "models/checkpoints/sft"
    shutil.rmtree(checkpoints)  # the 1-process run's (other params: the new run would drop them)
    steps = repo_params(one)["sft"]["train"]
    started = time.monotonic()
    first = checkpoints / "checkpoint-2" / "trainer_state.json"
    with stage_running_until(repo, "sft", first) as dvc:
        processes = _stage_processes(repo, "tasks.sft")
        (launcher,) = [pid for pid, environ in processes.items() if "CHATUIE_LAUNCHED" not in environ]
        workers = [pid for pid, environ in processes.items() if "LOCAL_RANK" in environ]
        assert len(workers) == 2, processes  # (and accelerate's agent between them and the launcher)
        os.kill(launcher, signal.SIGKILL)
        output = dvc.stdout.read() if dvc.stdout else ""
    killed_seconds = time.monotonic() - started
    assert dvc.returncode != 0, f"sft finished before the kill:\n{output[-2000:]}"
    assert not (repo / "models/sft").exists()
    deadline = time.monotonic() + 60  # the workers notice (watchdog) and exit: no survivors
    while _stage_processes(repo, "tasks.sft"):
        assert time.monotonic() < deadline, "workers outlived their launcher"
        time.sleep(0.5)

    started = time.monotonic()
    sh(["dvc", "repro", "--single-item", "sft"], repo)
    resumed_seconds = time.monotonic() - started
    metrics = yaml.safe_load((repo / "metrics/train/sft.json").read_text())
    assert 0 < metrics["resumed_from_step"] < steps["max_steps"] == metrics["steps"]
    # The first entry logged after the resume averages the steps since the checkpoint only (the
    # uninterrupted run's averages logging_steps steps): a logging window, not a training change.
    want = _losses(one / "metrics/train/sft_loss.csv")
    window = {min(s for s in want if s > metrics["resumed_from_step"])}
    worst_sft = _assert_close(_losses(repo / "metrics/train/sft_loss.csv"), want, window)
    assert max(want) not in window  # later steps are compared: the weights went on identically
    runs = _stage_runs(repo, "sft")  # the killed execution's and the rerun's: one run each
    by_execution = [r.data.tags[tracking.TAG_EXECUTION] for r in runs]
    assert len(runs) == 2 and len(set(by_execution)) == 2
    (finished,) = [r for r in runs if r.info.status == "FINISHED"]
    assert finished.data.metrics["resumed_from_step"] == metrics["resumed_from_step"]
    print(
        f"\n2 processes: rm {rm_seconds:.1f} s (worst loss diff {worst_rm:.1e}), sft killed after "
        f"{killed_seconds:.1f} s, resumed from step {metrics['resumed_from_step']} in "
        f"{resumed_seconds:.1f} s (worst loss diff {worst_sft:.1e})"
    )
