"""Data-parallel training stages: a stage re-launches itself under ``accelerate launch``.

A training stage's section has a ``launch`` block (:class:`LaunchSettings`). With
``processes: 1`` (the default) nothing changes: the stage trains in its own process. With
``processes: N > 1`` the stage process becomes the *launcher*: :func:`relaunch` runs the same
command line under ``accelerate launch`` (torch.distributed.run underneath; DeepSpeed ZeRO or FSDP
through an ``accelerate_config`` file) in N worker processes, waits for them and returns True, so
the stage's ``main`` returns at once. The workers run the stage's code again (``relaunch`` returns
False in them) and train data-parallel: gloo on CPU (``device: cpu``), NCCL on GPUs.

Who writes what:

* The launcher owns the stage's MLflow run (``tasks/_stage.py`` opened it before ``main``; the
  workers run with ``CHATUIE_TRACKING=off``), so a stage has one run, whatever its process count;
  its metrics and plots are read from the files rank 0 wrote, after the workers exited.
* Rank 0 alone writes outputs, metrics files and the checkpoint fingerprint
  (:func:`decided_by_main`: rank 0 decides whether checkpoints resume, every rank follows).
  The trainers save checkpoints themselves (weights and optimizer from rank 0, one RNG state per
  rank).

The global batch is the params' ``per_device_batch_size × gradient_accumulation``, i.e. what one
process would run: :func:`per_process_batch` splits it over the processes (the per-device batch
first, then the accumulation), so a run's meaning does not change with its process count.

A killed launcher takes its workers with it: SIGTERM/SIGINT are forwarded to them, and a worker
whose launcher is gone (SIGKILL) exits on its own (a watchdog thread), so a rerun never races
survivors over the checkpoint folder.

Multi-node (untested here: one machine): an ``accelerate_config`` with ``num_machines > 1``,
``main_process_ip`` and ``main_process_port``; run the stage on every machine, the others with
``CHATUIE_MACHINE_RANK=<i>`` and ``CHATUIE_TRACKING=off``. ``processes`` counts all processes of
all machines (accelerate's ``num_processes``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from chatuie.config import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

ENV_LAUNCHED = "CHATUIE_LAUNCHED"  # set in the workers: they train, they do not relaunch
ENV_LAUNCHER_PID = "CHATUIE_LAUNCHER_PID"  # "pid:start ticks" of the launcher (the watchdog's)
ENV_MACHINE_RANK = "CHATUIE_MACHINE_RANK"  # multi-node: this machine's rank (default 0)


class LaunchError(ConfigError):
    """A launch setting that cannot work (a stage reports it in one line, as any params error)."""


@dataclass(frozen=True)
class LaunchSettings:
    """``<stage>.launch``: how many processes train the stage, and how they are started."""

    processes: int = 1  # data-parallel processes (all machines); 1 = train in the stage's own process
    accelerate_config: str | None = None  # an `accelerate config` file (multi-node, DeepSpeed, FSDP)
    threads_per_process: int = 0  # torch threads per worker; 0 = this machine's cores / its processes
    main_process_port: int = 0  # 0 = a free port (one machine) or the accelerate config's

    def __post_init__(self) -> None:
        if not isinstance(self.processes, int) or self.processes < 1:
            raise LaunchError(f"launch.processes: expected an integer >= 1, got {self.processes!r}")
        if self.threads_per_process < 0:
            raise LaunchError("launch.threads_per_process: expected >= 0")


# ------------------------------------------------------------------------------------- this process


def world_size() -> int:
    """Processes of the running data-parallel job (1 outside one); torch.distributed's WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 (or a plain single process): the one that writes outputs."""
    return rank() == 0


def is_worker() -> bool:
    """Whether this process is one of a launched job's workers (it trains; it does not relaunch)."""
    return ENV_LAUNCHED in os.environ or "LOCAL_RANK" in os.environ


# ------------------------------------------------------------------------------------------ batches


def per_process_batch(
    per_device_batch_size: int, accumulation: int, processes: int | None = None
) -> tuple[int, int]:
    """``(per-device batch, accumulation)`` for each of ``processes`` so the global batch stays
    ``per_device_batch_size × accumulation`` (the params' meaning: one process).

    The per-process share of the global batch is run as the largest batch up to
    ``per_device_batch_size`` that divides it (memory never exceeds what params allow), times the
    accumulation needed. 16 × 1 on 2 processes: 8 × 1 each; 4 × 4 on 8 processes: 2 × 1 each.
    """
    n = world_size() if processes is None else processes
    total = per_device_batch_size * accumulation
    if n <= 1:
        return per_device_batch_size, accumulation
    if total % n:
        raise LaunchError(
            f"the global batch {per_device_batch_size} x {accumulation} = {total} does not divide over "
            f"{n} processes: change per_device_batch_size or gradient_accumulation, or launch.processes"
        )
    share = total // n
    batch = max(b for b in range(1, min(per_device_batch_size, share) + 1) if share % b == 0)
    return batch, share // batch


# ------------------------------------------------------------------------------------ rank 0 decides


def decided_by_main(decide: Callable[..., T], *args: Any, cpu: bool = True, **kwargs: Any) -> T:
    """``decide(*args, **kwargs)`` run on rank 0 only; every rank gets its (picklable) result.

    For decisions with side effects that must happen once (``claim_checkpoints`` stamps the
    checkpoint folder). Starts the process group the trainer will use (accelerate's
    ``PartialState``, as transformers does: gloo with ``cpu``, NCCL on GPUs).
    """
    if world_size() <= 1:
        return decide(*args, **kwargs)
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState(cpu=cpu)
    box = [decide(*args, **kwargs) if state.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


# ---------------------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accelerate_config(path: str) -> dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise LaunchError(f"launch.accelerate_config: no file {path}")
    return yaml.safe_load(file.read_text(encoding="utf-8")) or {}


def launch_command(settings: LaunchSettings, argv: Sequence[str], port: int | None = None) -> list[str]:
    """The ``accelerate launch`` command line that runs ``argv`` (script and arguments) in workers."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(settings.processes)]
    if settings.accelerate_config:
        config = _accelerate_config(settings.accelerate_config)
        configured = config.get("num_processes")
        if configured is not None and int(configured) != settings.processes:
            raise LaunchError(
                f"launch.processes is {settings.processes} but {settings.accelerate_config} has "
                f"num_processes: {configured} (the global batch is split by launch.processes)"
            )
        command += ["--config_file", settings.accelerate_config]
        machine_rank = os.environ.get(ENV_MACHINE_RANK)
        if machine_rank:
            command += ["--machine_rank", machine_rank]
        if settings.main_process_port:
            command += ["--main_process_port", str(settings.main_process_port)]
    else:
        # One machine. --multi_gpu is accelerate's torch.distributed.run launcher; on a machine
        # without GPUs the trainers' use_cpu makes it a multi-CPU run over gloo.
        command += [
            "--multi_gpu",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",  # the trainers' own bf16/fp16 arguments decide
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(settings.main_process_port or port or _free_port()),
        ]
    return [*command, *argv]


def _start_ticks(pid: int) -> str | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rindex(")") + 2 :].split()[19]


def _threads(settings: LaunchSettings) -> int:
    if settings.threads_per_process:
        return settings.threads_per_process
    local = int(os.environ.get("LOCAL_WORLD_SIZE", settings.processes))
    return max(1, (os.cpu_count() or 1) // max(1, local))


def this_command() -> list[str]:
    """This process's script and arguments for a worker: ``-m tasks.sft ...`` when it was started as
    a module (``python -m``: the workers must import it the same way), else ``sys.argv``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name and spec.name != "__main__":
        return ["-m", spec.name, *sys.argv[1:]]
    return list(sys.argv)


def relaunch(
    settings: LaunchSettings, argv: Sequence[str] | None = None, *, batch: tuple[int, int] | None = None
) -> bool:
    """Run this stage in ``settings.processes`` workers; True once they succeeded (return then).

    False: this process trains (``processes == 1``, or it is a worker: then its torch threads are
    set and a watchdog ends it if its launcher dies). A failed worker raises ``SystemExit``.
    ``batch``: the stage's ``(per_device_batch_size, gradient_accumulation)``, checked to divide
    over the processes before any worker starts.
    """
    if is_worker():
        _as_worker(settings)
        return False
    if settings.processes <= 1:
        return False
    if batch is not None:
        per_process_batch(*batch, settings.processes)
    argv = list(this_command() if argv is None else argv)
    command = launch_command(settings, argv)
    threads = _threads(settings)
    env = dict(os.environ)
    env.update(
        {
            ENV_LAUNCHED: "1",
            ENV_LAUNCHER_PID: f"{os.getpid()}:{_start_ticks(os.getpid()) or ''}",
            # The launcher tracks the stage (one MLflow run); the workers do not.
            "CHATUIE_TRACKING": "off",
            "OMP_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    log.info(
        "launching %d processes (%d torch threads each): %s", settings.processes, threads, " ".join(command)
    )
    started = time.monotonic()
    # Its own session: a signal to the launcher reaches the workers through us, never twice.
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:  # an exception while waiting: no orphans
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        raise SystemExit(f"error: stopped by signal {received[0]}; the workers were stopped")
    if code != 0:
        raise SystemExit(f"error: {settings.processes} worker processes: `accelerate launch` exited {code}")
    log.info("%d workers done in %.1f s", settings.processes, time.monotonic() - started)
    return True


def _as_worker(settings: LaunchSettings) -> None:
    import torch

    torch.set_num_threads(_threads(settings))
    launcher = os.environ.get(ENV_LAUNCHER_PID, "")
    pid_text, _, ticks = launcher.partition(":")
    if pid_text.isdigit():
        threading.Thread(
            target=_watch, args=(int(pid_text), ticks), daemon=True, name="launcher-watch"
        ).start()


def _watch(pid: int, ticks: str, every: float = 0.25) -> None:
    """End this worker once its launcher is gone (killed: no signal was forwarded)."""
    while True:
        time.sleep(every)
        current = _start_ticks(pid)
        alive = current is not None and (not ticks or current == ticks)
        if not alive:
            try:
                os.kill(pid, 0)
                alive = current is None and not Path("/proc").is_dir()  # no /proc: trust kill(0)
            except ProcessLookupError:
                alive = False
        if not alive:
            print(f"launcher {pid} is gone: worker rank {rank()} exits", file=sys.stderr, flush=True)
            os._exit(1)
