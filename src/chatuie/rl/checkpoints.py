"""Checkpoints of a PPO run at update boundaries, and resuming a killed run from them.

TRL 1.12's experimental ``PPOTrainer`` saves Trainer checkpoints of the policy alone and its
``train()`` always starts at update 1. :class:`PPOCheckpoints` (a ``TrainerCallback``) writes, every
``save_steps`` updates, all that the next update depends on into ``checkpoint-N/``: the trainable
weights of policy and value model (frozen ones come back with the models), the optimizer and the
scheduler, the random state, the position in the shuffled prompt order (:class:`ResumableLoader`),
and the trainer state with its log; ``trainer_state.json`` is written last, so a folder without it
is an interrupted write (:func:`chatuie.train.trainer.last_checkpoint` skips it). Older checkpoints go
once the new one is complete.

To resume, :func:`PPOCheckpoints.bind` tells the trainer only the updates left; when training begins
the callback loads the checkpoint back, and the loader replays the current epoch's shuffle from the
random state it started with, skipping the prompts already used. A resumed run therefore makes the
same rollouts and updates as the uninterrupted one (tests/rl/test_rl.py checks weights and log).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

log = logging.getLogger(__name__)

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RANDOM_STATE = "random_state.pt"
TRAINER_STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint


def _cuda_states() -> list[torch.Tensor]:
    return torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []


class ResumableLoader:
    """PPO's prompt loader, wrapped: knows the random state its current epoch's shuffle drew from
    and how many batches of that epoch were handed out, and can restart there.

    A shuffling ``DataLoader`` draws each epoch's order from the global random state when the epoch's
    first batch is taken, between rollouts that sample from the same state; so the epoch's order is
    replayed from the state saved at that moment, then the state of the checkpoint is put back.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.epoch_random_state: torch.Tensor | None = None
        self.position = 0  # batches of the current epoch handed out
        self._resume: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def state(self) -> dict[str, Any]:
        return {"epoch_random_state": self.epoch_random_state, "position": self.position}

    def resume_at(self, state: dict[str, Any]) -> None:
        self._resume = state

    def __iter__(self) -> Iterator[Any]:
        resume, self._resume = self._resume, None
        if resume is not None and 0 < resume["position"] < len(self.loader):
            now = torch.get_rng_state()
            self.epoch_random_state = resume["epoch_random_state"]
            torch.set_rng_state(self.epoch_random_state)
            batches = iter(self.loader)
            for _ in range(resume["position"]):
                next(batches)
            torch.set_rng_state(now)
            self.position = resume["position"]
        else:  # a new epoch: its shuffle draws from the state as it is now
            self.epoch_random_state = torch.get_rng_state()
            batches = iter(self.loader)
            self.position = 0
        for batch in batches:
            self.position += 1
            yield batch


class PPOCheckpoints(TrainerCallback):
    """Saves a PPO run every ``save_steps`` updates (and after the last) and resumes it from
    ``resume_from``; :meth:`bind` it to the trainer before ``train()``."""

    def __init__(self, output_dir: str | Path, save_steps: int, resume_from: Path | None = None) -> None:
        self.output_dir = Path(output_dir)
        self.save_steps = save_steps
        self.resume_from = resume_from
        self.trainer: Any = None
        self.loader: ResumableLoader | None = None

    def bind(self, trainer: Any) -> None:
        """Wrap the trainer's prompt loader; on resume, leave the trainer only the updates to go."""
        self.trainer = trainer
        self.loader = ResumableLoader(trainer.dataloader)
        trainer.dataloader = self.loader
        if self.resume_from is not None:
            self.saved_state = json.loads((self.resume_from / TRAINER_STATE).read_text(encoding="utf-8"))
            done = int(self.saved_state["global_step"])
            self.total_updates = trainer.args.num_total_batches
            if done > self.total_updates:
                raise ValueError(
                    f"{self.resume_from}: {done} updates done, more than this run's {self.total_updates}"
                )
            trainer.args.num_total_batches = self.total_updates - done  # train()'s loop runs these

    def _model(self) -> Any:
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self._model().named_parameters() if p.requires_grad}

    # ---------------------------------------------------------------------------------- resuming

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.resume_from is None:
            return
        path, saved = self.resume_from, self.saved_state
        weights = load_file(str(path / WEIGHTS))
        trainable = self._trainable()
        if set(weights) != set(trainable):
            raise ValueError(f"{path / WEIGHTS}: its tensors are not this run's trainable parameters")
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(weights[name].to(param.device, param.dtype))
        self.trainer.optimizer.load_state_dict(torch.load(path / OPTIMIZER, weights_only=True))
        self.trainer.lr_scheduler.load_state_dict(torch.load(path / SCHEDULER, weights_only=True))
        random_state = torch.load(path / RANDOM_STATE, weights_only=True)
        torch.set_rng_state(random_state["cpu"])
        if random_state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(random_state["cuda"])
        self.loader.resume_at(random_state["loader"])
        state.global_step = int(saved["global_step"])
        state.episode = int(saved["episode"])
        state.epoch = saved.get("epoch")
        state.log_history = saved["log_history"]
        state.max_steps = self.total_updates
        log.info("PPO resumes from %s (update %d of %d)", path, state.global_step, state.max_steps)

    # ------------------------------------------------------------------------------------ saving

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.save_steps > 0 and (
            state.global_step % self.save_steps == 0 or state.global_step >= state.max_steps
        ):
            self.save(state)

    def save(self, state: Any) -> Path:
        started = time.monotonic()
        path = self.output_dir / f"checkpoint-{state.global_step}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        trainable = {name: p.detach().cpu().contiguous() for name, p in self._trainable().items()}
        save_file(trainable, str(path / WEIGHTS))
        torch.save(self.trainer.optimizer.state_dict(), path / OPTIMIZER)
        torch.save(self.trainer.lr_scheduler.state_dict(), path / SCHEDULER)
        random_state = {"cpu": torch.get_rng_state(), "cuda": _cuda_states(), "loader": self.loader.state()}
        torch.save(random_state, path / RANDOM_STATE)
        state.save_to_json(str(path / TRAINER_STATE))
        for older in self.output_dir.glob("checkpoint-*"):
            suffix = older.name[len("checkpoint-") :]
            if older.is_dir() and suffix.isdigit() and int(suffix) < state.global_step:
                shutil.rmtree(older)
        size = sum(f.stat().st_size for f in path.iterdir())
        log.info("saved %s: %.2f GB in %.1f s", path, size / 1e9, time.monotonic() - started)
        return path
