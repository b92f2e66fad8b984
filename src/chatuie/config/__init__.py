"""Typed configs from params.yaml sections, with errors that name the offending field.

Reading params (params.yaml with the active profile's overlay) is chatuie.config.params; its names
are importable from here too.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
import typing
from typing import Any, TypeVar

from chatuie.config.params import (
    ConfigError,
    blame,
    known_profiles,
    load_params,
    merge,
    overlay_path,
    read_yaml,
    source_of,
)

__all__ = [
    "RANGES",
    "ConfigError",
    "Range",
    "blame",
    "build",
    "known_profiles",
    "load_params",
    "merge",
    "overlay_path",
    "range_of",
    "read_yaml",
    "source_of",
]

T = TypeVar("T")


def build(cls: type[T], data: dict[str, Any] | None, where: str) -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types name ``where.key``."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
        _check_range(kwargs[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # __post_init__'s own check: named where it was read
        message = str(err)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (
        isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list and not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if origin is list and typing.get_args(hint) and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        item = typing.get_args(hint)[0]
        return [_built(item, entry, f"{where}[{i}]") for i, entry in enumerate(value)]
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def _built(cls: type[T], data: Any, where: str) -> T:
    """A dataclass list item; its own checks (``__post_init__``) get ``where`` prefixed."""
    try:
        return build(cls, data, where)
    except ConfigError as err:
        message = str(err)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None


# ------------------------------------------------------------------------------------------ ranges


@dataclasses.dataclass(frozen=True)
class Range:
    """Where a number read from params.yaml may lie: ``low``/``high`` bounds (None: unbounded),
    ``open_low``/``open_high`` excluding them; ``note`` says what an edge value means."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    note: str = ""

    def admits(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or (value < self.high if self.open_high else value <= self.high)

    def describe(self, integer: bool) -> str:
        kind = "an integer" if integer else "a number"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            text = f"{kind} in {left}{self.low:g}, {self.high:g}{right}"
        elif self.low is not None:
            text = f"{kind} {'>' if self.open_low else '>='} {self.low:g}"
        else:
            text = f"{kind} {'<' if self.open_high else '<='} {self.high:g}"
        return f"{text} ({self.note})" if self.note else text


AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
ABOVE_0 = Range(0, open_low=True)
SHARE = Range(0, 1)  # a probability, a share, a ratio

# Every number a params.yaml section holds, by its key (``section.path.key``; fnmatch patterns, the
# first that matches wins: exceptions before the general rules). ``build`` checks each number it
# reads against its rule (dict values and list items under the key too), so a value out of range
# stops the stage, and check_params before any stage, with the key named:
#     params.yaml: sft.train.max_steps: expected an integer >= 1, got -3
# tests/config/test_config_ranges.py fails for a number in a section that no rule covers.
RANGES: tuple[tuple[str, Range], ...] = (
    # Exceptions to the name rules below (a 0 or an edge that means something, or a wider scale).
    ("*.max_labels_per_instruction", Range(0, note="0: no limit")),
    ("*.max_samples_per_dataset", Range(0, note="0: all")),
    ("*.max_records_per_dataset", Range(0, note="0: all")),
    ("*.max_prompts_per_dataset", Range(0, note="0: all")),
    ("*.max_chat_examples", Range(0, note="0: all")),
    ("validate.max_examples", AT_LEAST_0),
    ("judge.max_requests", Range(0, note="null: no budget")),
    ("*.max_retries", AT_LEAST_0),
    ("*.max_grad_norm", Range(0, note="0: no clipping")),
    ("*.max_chat_drop", SHARE),
    ("promote.min_f1_gain", Range(-100, 100, note="F1 points")),
    ("promote.floor_mean_ie_f1", Range(0, 100, note="F1 points")),
    ("promote.floor_chat", AT_LEAST_0),
    ("*.save_steps", Range(0, note="0: no checkpoints")),
    ("*.save_total_limit", Range(1, note="null: keep all")),
    ("*.main_process_port", Range(0, 65535, note="0: a free port")),
    ("rl.grpo.num_generations", Range(2, note="a group of answers per prompt")),
    ("sft.heldout.fraction", Range(0, 1, open_high=True)),
    ("sft.qa_replay_fraction", Range(0, note="a share of the IE samples")),
    ("judge.temperature", Range(0, note="0: greedy")),
    ("reward_data.judged.margin", Range(0, 10, note="judge scores are 0-10")),
    ("sft.repeats", AT_LEAST_1),
    ("validate.expected_counts", AT_LEAST_0),
    ("*.type_weights", ABOVE_0),
    ("model.lora.r", AT_LEAST_1),
    ("model.lora.alpha", AT_LEAST_1),
    ("model.lora.dropout", Range(0, 1, open_high=True)),
    ("model.lora.layers", Range(0, note="decoder layer indices")),
    # By name.
    ("*.max_steps", AT_LEAST_1),
    ("*.max_*", AT_LEAST_1),  # lengths, tokens, concurrency, shifts
    ("*max_new_tokens", AT_LEAST_1),
    ("*seed", AT_LEAST_0),
    ("*threads*", Range(0, note="0: torch's default")),
    ("*learning_rate", ABOVE_0),
    ("*_fraction", SHARE),
    ("*_rate", SHARE),
    ("*_ratio", SHARE),
    ("*temperature", ABOVE_0),
    ("*_size", AT_LEAST_1),  # batch sizes, model sizes, webqa_test_size
    ("*.num_*", AT_LEAST_1),
    ("*.gradient_accumulation", AT_LEAST_1),
    ("*.logging_steps", AT_LEAST_1),
    ("*.total_episodes", AT_LEAST_1),
    ("*.response_length", AT_LEAST_1),
    ("*.samples_per_prompt", AT_LEAST_1),
    ("*.processes", AT_LEAST_1),
    ("*.per_instruction", AT_LEAST_0),
    ("*.repeat_samples", AT_LEAST_0),
    ("*.top_k", Range(0, note="0: off")),
    ("*.frozen_layers", AT_LEAST_0),
    ("*.train_accuracy_pairs", Range(0, note="0: none")),
    ("*.rope_theta", ABOVE_0),
    ("*.weight_decay", AT_LEAST_0),
    ("*.center_rewards_coefficient", Range(0, note="null: off")),
    ("*_coef", AT_LEAST_0),  # kl_coef, vf_coef
    ("*.cliprange*", ABOVE_0),
    ("*.gamma", SHARE),
    ("*.lam", SHARE),
    ("*.missing_eos_penalty", Range(0, note="null: none")),
    ("*_weight", AT_LEAST_0),
    ("*.reward_weights.*", Range(0, note="0 drops one")),
    ("*.confusion_smoothing", AT_LEAST_0),
    ("*.repetition_penalty", Range(0, open_low=True, note="1: none")),
    ("*.timeout_s", ABOVE_0),
    ("*backoff*_s", AT_LEAST_0),
    ("*.retries", AT_LEAST_0),
    ("*.retry_delay_seconds", AT_LEAST_0),
)


def range_of(key: str) -> Range | None:
    """The rule for ``key`` (``section.path.key``, list indices left out), None if no rule has it."""
    for pattern, rule in RANGES:
        if fnmatch.fnmatchcase(key, pattern):
            return rule
    return None


def _key(where: str) -> str:
    """``params.yaml: rl.grpo.learning_rate`` -> ``rl.grpo.learning_rate``; ``x[2].y`` -> ``x.y``."""
    return re.sub(r"\[\d+\]", "", where.rpartition(": ")[2])


def _check_range(value: Any, where: str) -> None:
    """``value`` (a number, or numbers in a list or mapping) against the rule of ``where``'s key."""
    numbers = list(_numbers(value, where))
    if not numbers:
        return
    rule = range_of(_key(where))
    if rule is None:
        return  # a section that check_params does not build; its numbers are its own business
    for at, number in numbers:
        if not rule.admits(number):
            integer = isinstance(number, int)
            raise ConfigError(f"{at}: expected {rule.describe(integer)}, got {number!r}")


def _numbers(value: Any, where: str) -> typing.Iterator[tuple[str, int | float]]:
    if isinstance(value, bool) or value is None or dataclasses.is_dataclass(value):
        return
    if isinstance(value, int | float):
        yield where, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{where}[{i}]")
