"""Chat training: TRL's ``SFTTrainer`` on chat samples with CPU-safe arguments, loss on the assistant
turns, resumable from checkpoints (:func:`train_chat`; SFT and the base stage's teaching are it under
their stages' names). Models, tokenizers and the chat template: :mod:`chatuie.models.modeling`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from transformers import TrainerCallback

from chatuie.config import ConfigError
from chatuie.data.splits import HeldoutSplit
from chatuie.models.modeling import is_peft
from chatuie.progress import Progress
from chatuie.train.answer_loss import patch_answer_loss
from chatuie.train.launch import LaunchSettings, is_main_process, per_process_batch

logger = logging.getLogger(__name__)

ANSWER_NLL = "answer_nll"  # TeachSettings.loss_type of chatuie.train.answer_loss
LOSS_TYPES = (ANSWER_NLL, "chunked_nll", "nll", "dft")  # the last three: TRL's own


@dataclass(frozen=True)
class TrainerSettings:
    """What every Trainer-based run shares (SFT, the reward model): steps, optimizer, batch,
    logging, seed and device. :meth:`trainer_kwargs` turns them into the transformers
    ``TrainingArguments`` fields every TRL config takes, so each trainer's config adds only its own."""

    max_steps: int = 200
    learning_rate: float = 5e-4
    per_device_batch_size: int = 8
    gradient_accumulation: int = 1
    max_length: int = 512  # tokens per sample (longer ones are left out)
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    logging_steps: int = 10
    seed: int = 13
    device: str = "cpu"  # "cpu" (use_cpu=True, reproducible on the reference machine) | "auto" (GPU if any)

    def trainer_kwargs(self, output_dir: str | Path) -> dict[str, Any]:
        if self.device not in ("cpu", "auto"):
            raise ValueError(f"device: expected 'cpu' or 'auto', got {self.device!r}")
        # Data-parallel (chatuie.train.launch): the params' batch x accumulation is the global batch.
        batch, accumulation = per_process_batch(self.per_device_batch_size, self.gradient_accumulation)
        return {
            "output_dir": str(output_dir),
            "max_steps": self.max_steps,
            "learning_rate": self.learning_rate,
            "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": accumulation,
            # transformers 5 dropped warmup_ratio: a float < 1 in warmup_steps is the ratio.
            "warmup_steps": self.warmup_ratio,
            "weight_decay": self.weight_decay,
            "lr_scheduler_type": self.lr_scheduler,
            "max_grad_norm": self.max_grad_norm,
            "max_length": self.max_length,
            "logging_steps": self.logging_steps,
            "logging_first_step": True,
            **trainer_safety_args(self.device, self.seed),
        }


@dataclass(frozen=True)
class TeachSettings(TrainerSettings):
    """One causal-LM training run on chat samples (loss on the assistant turns only); packed rows
    are ``max_length`` tokens long."""

    save_steps: int = 50  # checkpoint every N optimizer steps (0 = no checkpoints)
    save_total_limit: int | None = 2
    # False: length-grouped batches (little padding, no cross-sample attention question at all).
    # True: TRL's BFD packing (padding-free rows; transformers 5 derives a block-diagonal mask
    # from the position ids on sdpa/eager, so packed samples do not attend to each other).
    packing: bool = False
    # "answer_nll": answer tokens only, the output head in the weights' dtype
    # (chatuie.train.answer_loss; ~2.5x faster steps on Gemma here, bench/train.py) |
    # "chunked_nll": TRL 1.12's default (the head in float32, in checkpointed chunks) |
    # "nll": the plain cross-entropy over every position
    loss_type: str = "chunked_nll"

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(
                f"train.loss_type: expected one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}"
            )


# ------------------------------------------------------------------------------------------ training


class TrainResult(NamedTuple):
    model: Any
    loss_log: list[dict[str, float]]  # [{"step": int, "loss": float}, ...] over the whole run
    global_step: int
    resumed_from: str | None  # checkpoint directory the run continued from
    too_long: int  # training samples left out: longer than settings.max_length tokens
    seconds_per_step: float | None = None  # measured over this run's steps (None: none trained)


class TrainingProgress(TrainerCallback):
    """A Trainer's (or TRL's PPO trainer's) steps as :class:`Progress`, with the last logged loss.

    Its measured time per step is kept (``seconds_per_step``) for the stage's metrics file.
    """

    def __init__(self, desc: str, unit: str = "step") -> None:
        self.desc, self.unit = desc, unit
        self.progress: Progress | None = None
        self.seconds_per_step: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        total = state.max_steps or None
        self.progress = Progress(self.desc, total, unit=self.unit, initial=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None and logs:
            loss = logs.get("loss", logs.get("loss/policy_avg"))
            self.progress.set(loss=loss)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(state.global_step - self.progress.position)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            progress, self.progress = self.progress, None
            per_step = progress.average_seconds_per_unit()
            self.seconds_per_step = None if per_step is None else round(per_step, 3)
            progress.close()


def claim_checkpoints(output_dir: str | Path, identity: Any) -> bool:
    """Whether checkpoints in ``output_dir`` belong to the run described by ``identity``.

    Checkpoint folders outlive runs (a DVC ``persist`` out) so that a killed run resumes; a run with
    other params, data or starting weights must not continue from them. The folder is stamped with
    this run's fingerprint; pass the result as ``resume=`` to :func:`train_chat` (False wipes them).
    """
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True, default=repr).encode()).hexdigest()
    out = Path(output_dir)
    marker = out / "run_fingerprint.txt"
    same = marker.is_file() and marker.read_text(encoding="utf-8").strip() == fingerprint
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint + "\n", encoding="utf-8")
    return same


def file_digest(path: str | Path) -> str:
    """sha256 of a file or of every file under a folder (sorted), for run fingerprints."""
    digest = hashlib.sha256()
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode() if root.is_dir() else b"")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest *complete* ``checkpoint-N`` (trainer_state.json is written last); None if none."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = []
    for path in root.iterdir():
        name = path.name
        if path.is_dir() and name.startswith("checkpoint-") and name[len("checkpoint-") :].isdigit():
            found.append((int(name[len("checkpoint-") :]), path))
    for _, path in sorted(found, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("ignoring incomplete checkpoint %s", path)
            continue
        return path
    return None


def resume_point(output_dir: str | Path, resume: bool) -> Path | None:
    """The checkpoint a run in ``output_dir`` continues from: the newest complete one (``resume``) or
    none. Checkpoint folders newer than it (interrupted writes) are removed; all of them when not
    ``resume`` (a fresh run)."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = last_checkpoint(out) if resume else None
    if is_main_process():  # data-parallel: rank 0 alone removes folders (chatuie.train.launch)
        _drop_incomplete_after(out, checkpoint)
    return checkpoint


def finished_state(checkpoint: Path | None, max_steps: int) -> dict[str, Any] | None:
    """``checkpoint``'s trainer state if that run already reached ``max_steps``, else None."""
    if checkpoint is None or max_steps <= 0:
        return None
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return state if int(state.get("global_step", 0)) >= max_steps else None


def _drop_incomplete_after(output_dir: Path, keep: Path | None) -> None:
    """Remove checkpoint dirs newer than ``keep`` (interrupted writes) so they cannot shadow it."""
    keep_step = int(keep.name.split("-")[-1]) if keep else -1
    for path in output_dir.glob("checkpoint-*"):
        suffix = path.name[len("checkpoint-") :]
        if path.is_dir() and suffix.isdigit() and int(suffix) > keep_step:
            logger.warning("removing interrupted checkpoint %s", path)
            shutil.rmtree(path)


def freeze_input_embeddings(*models) -> None:
    """No gradient for each model's input embedding (nor for an output head tied to it)."""
    for model in models:
        model.get_input_embeddings().weight.requires_grad_(False)


def trainer_safety_args(device: str, seed: int) -> dict[str, Any]:
    """The arguments every TRL config here shares: seeded, CPU-safe, quiet.

    TRL defaults to bf16 and gradient checkpointing; transformers 5.23 renamed gradient_checkpointing
    to activation_checkpointing, and TRL's gradient_checkpointing=True is copied over unless the new
    name is set. No trackers (MLflow is ours), no worker processes, no progress bars.
    """
    return {
        "seed": seed,
        "data_seed": seed,
        "use_cpu": device == "cpu",
        "bf16": False,
        "fp16": False,
        "activation_checkpointing": False,
        "report_to": [],
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        # Data-parallel runs (chatuie.train.launch): every parameter gets a gradient in these dense models;
        # transformers' default (True without checkpointing) costs an extra autograd traversal.
        "ddp_find_unused_parameters": False,
    }


def sft_config(settings: TeachSettings, output_dir: str | Path, *, has_eval: bool = False, **overrides: Any):
    """TRL ``SFTConfig`` for a CPU-safe, assistant-only, checkpointed run (``overrides`` win)."""
    from trl import SFTConfig

    save = settings.save_steps > 0
    base = settings.trainer_kwargs(output_dir)
    kwargs: dict[str, Any] = {
        **base,
        "per_device_eval_batch_size": base["per_device_train_batch_size"],
        "save_strategy": "steps" if save else "no",
        "save_steps": settings.save_steps if save else 500,
        "save_total_limit": settings.save_total_limit,
        "eval_strategy": "steps" if has_eval else "no",
        "eval_steps": (settings.save_steps or settings.logging_steps) if has_eval else None,
        # Data: conversational samples, loss on assistant turns (answer + <|im_end|>) only.
        "assistant_only_loss": True,
        "packing": settings.packing,
        "packing_strategy": "bfd",
        # answer_nll replaces the forward TRL patches for chunked_nll, and returns the same fields.
        "loss_type": "chunked_nll" if settings.loss_type == ANSWER_NLL else settings.loss_type,
    }
    if not settings.packing:
        # transformers 5 replaced group_by_length=True by train_sampling_strategy.
        kwargs["train_sampling_strategy"] = "group_by_length"
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def _messages(sample: dict[str, Any]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in sample["messages"]]


def fitting_samples(
    samples: Sequence[dict[str, Any]], tokenizer, max_length: int | None
) -> list[dict[str, Any]]:
    """Samples whose whole chat fits ``max_length`` tokens.

    TRL would cut longer ones (keep_start): the answer loses its tail and its <|im_end|>, which teaches
    truncated JSON and no stop; an answer cut away entirely is dropped by TRL anyway.
    """
    if max_length is None:
        return list(samples)
    kept = []
    for start in range(0, len(samples), 512):
        chunk = samples[start : start + 512]
        ids = tokenizer.apply_chat_template([_messages(s) for s in chunk], tokenize=True, return_dict=False)
        kept.extend(sample for sample, tokens in zip(chunk, ids, strict=True) if len(tokens) <= max_length)
    return kept


def _chat_dataset(samples: Sequence[dict[str, Any]]):
    from datasets import Dataset

    # Only the messages travel: other fields (schema) vary in structure and would upset Arrow.
    return Dataset.from_list([{"messages": _messages(s)} for s in samples])


def _lm(model):
    return model.get_base_model() if is_peft(model) else model


def _unpatch_forward(model, patched_before: bool) -> None:
    """Undo the loss's ``forward`` patch (TRL's chunked one or chatuie.train.answer_loss's, an instance
    attribute): with it, a later ``model(..., labels=...)`` returns ``logits=None``."""
    target = _lm(model)
    if not patched_before and "forward" in target.__dict__:
        del target.__dict__["forward"]


def sft_trainer(
    model,
    tokenizer,
    samples: Sequence[dict[str, Any]],
    settings: TeachSettings,
    output_dir: str | Path,
    *,
    eval_samples: Sequence[dict[str, Any]] | None = None,
    callbacks: list | None = None,
    **config_overrides: Any,
):
    """TRL's ``SFTTrainer`` as :func:`train_chat` builds it (samples already fitting ``max_length``);
    bench/train.py times it against a bare loop over its own batches."""
    from trl import SFTTrainer

    trainer = SFTTrainer(
        model=model,
        args=sft_config(settings, output_dir, has_eval=bool(eval_samples), **config_overrides),
        train_dataset=_chat_dataset(samples),
        eval_dataset=_chat_dataset(eval_samples) if eval_samples else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if settings.loss_type == ANSWER_NLL:
        patch_answer_loss(_lm(model))  # over TRL's chunked-loss patch; _unpatch_forward removes either
    return trainer


def train_chat(
    model,
    tokenizer,
    samples: Sequence[dict[str, Any]],
    settings: TeachSettings,
    output_dir: str | Path,
    *,
    eval_samples: Sequence[dict[str, Any]] | None = None,
    resume: bool = True,
    callbacks: list | None = None,
    progress: str = "train",
    **config_overrides: Any,
) -> TrainResult:
    """Causal-LM training on chat samples, loss on the assistant turns, resumable.

    If ``output_dir`` holds a complete checkpoint (and ``resume``), training continues from the newest one
    (weights, optimizer, scheduler, RNG, data position, global step, log history); raise
    ``settings.max_steps`` to train further. Checkpoint folders newer than that one (interrupted
    writes) are removed; with ``resume=False`` every existing checkpoint is removed (a fresh run).
    Samples longer than ``settings.max_length`` tokens are left out (counted in ``too_long``).
    Works for full models and peft (LoRA) models alike; the trained model is returned (same object).
    ``config_overrides`` go to :func:`sft_config` (any ``SFTConfig`` field).
    """
    if not samples:
        raise ValueError("no training samples")
    out = Path(output_dir)
    checkpoint = resume_point(out, resume)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    fitting = fitting_samples(samples, tokenizer, settings.max_length)
    too_long = len(samples) - len(fitting)
    if too_long:
        logger.warning(
            "%d of %d samples exceed max_length=%d tokens: left out",
            too_long,
            len(samples),
            settings.max_length,
        )
    if not fitting:
        raise ValueError(f"no training sample fits max_length={settings.max_length}")
    eval_fitting = fitting_samples(eval_samples, tokenizer, settings.max_length) if eval_samples else None
    patched_before = "forward" in _lm(model).__dict__
    steps = TrainingProgress(progress)  # rate and ETA, named as the stage (``progress``)
    trainer = sft_trainer(
        model,
        tokenizer,
        fitting,
        settings,
        out,
        eval_samples=eval_fitting,
        callbacks=[*(callbacks or []), steps],
        **config_overrides,
    )
    finished = finished_state(checkpoint, settings.max_steps)
    try:
        if finished is not None:
            # The run is complete: hand back its weights. (transformers' resume at the last step of
            # a mid-epoch run would train one step more, and every rerun one more again.)
            logger.info("%s already reached max_steps=%d: no training", checkpoint, settings.max_steps)
            trainer._load_from_checkpoint(str(checkpoint))
            log_history, global_step = finished["log_history"], int(finished["global_step"])
        else:
            if checkpoint is not None:
                logger.info("resuming from %s", checkpoint)
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
            log_history, global_step = trainer.state.log_history, trainer.state.global_step
    finally:
        _unpatch_forward(model, patched_before)
    loss_log = [
        {"step": int(entry["step"]), "loss": float(entry["loss"])}
        for entry in log_history
        if "loss" in entry and "step" in entry
    ]
    tokenizer.padding_side = "left"  # back to generation's side
    model = trainer.model
    model.eval()
    resumed_from = str(checkpoint) if checkpoint else None
    return TrainResult(model, loss_log, global_step, resumed_from, too_long, steps.seconds_per_step)


def teach_to_answer(
    model,
    tokenizer,
    samples: Sequence[dict[str, Any]],
    settings: TeachSettings,
    output_dir: str | Path,
    **kwargs: Any,
) -> TrainResult:
    """Teach a (base) model to answer chat samples: :func:`train_chat` under its stage's name."""
    return train_chat(model, tokenizer, samples, settings, output_dir, **{"progress": "base", **kwargs})


def train_sft(
    model,
    tokenizer,
    samples: Sequence[dict[str, Any]],
    settings: TeachSettings,
    output_dir: str | Path,
    **kwargs: Any,
) -> TrainResult:
    """Supervised fine-tuning on IE instructions: :func:`train_chat` (LoRA when the model is a peft model)."""
    return train_chat(model, tokenizer, samples, settings, output_dir, **{"progress": "sft", **kwargs})


@dataclass(frozen=True)
class BaseStageConfig:
    """``base`` section: what teaching the tiny model to answer uses."""

    qa_datasets: list[str] = field(default_factory=lambda: ["webqa", "ceval"])
    repeat_samples: int = 0  # "repeat the text" samples from IE training texts: copying, before SFT
    teach: TeachSettings = field(default_factory=TeachSettings)
    threads: int = 0


@dataclass(frozen=True)
class SFTStageConfig:
    """``sft`` section."""

    datasets: list[str] = field(default_factory=lambda: ["resume", "conll04", "fewfc"])
    max_samples_per_dataset: int = 0  # 0 = all
    # Copies of a dataset's samples in the training mix (default 1): a small dataset (CoNLL04 has
    # 922 records against FewFC's 7,185) otherwise gets a small share of the steps.
    repeats: dict[str, int] = field(default_factory=dict)
    qa_datasets: list[str] = field(default_factory=lambda: ["webqa", "ceval"])
    qa_replay_fraction: float = 0.1  # QA samples added, as a share of the IE samples
    # Train records SFT leaves out (by a hash of the record id): reward_data scores the SFT
    # model's answers on them, records it never saw.
    heldout: HeldoutSplit = field(default_factory=HeldoutSplit)
    train: TeachSettings = field(default_factory=TeachSettings)
    merge_lora: bool = False
    threads: int = 0
    launch: LaunchSettings = field(default_factory=LaunchSettings)  # data-parallel (chatuie.train.launch)
    seed: int = 13

    def __post_init__(self) -> None:
        for dataset, copies in self.repeats.items():
            where = f"params.yaml: sft.repeats.{dataset}"
            if dataset not in self.datasets:
                raise ConfigError(f"{where}: not one of sft.datasets {self.datasets}")
            if not isinstance(copies, int) or isinstance(copies, bool) or copies < 1:
                raise ConfigError(f"{where}: expected an integer >= 1, got {copies!r}")
