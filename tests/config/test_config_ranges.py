"""Number ranges of params.yaml: one table (chatuie.config.RANGES), checked wherever a section is built.

`sft.train.max_steps: -3` used to train 51 steps and exit 0; now the read (the stage's own, and
check_params before any stage) refuses it with the key named.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import pytest
from conftest import params_with

from chatuie.config import ConfigError, build, range_of
from tasks.check_params import SECTIONS, _config_class, check


def _has_number(hint: typing.Any) -> bool:
    if hint in (int, float):
        return True
    return any(_has_number(arg) for arg in typing.get_args(hint) if arg is not bool)


def _numeric_fields(cls: type, where: str) -> typing.Iterator[tuple[str, typing.Any, typing.Any]]:
    """(key, type, default) of every number field under ``cls``: nested dataclasses and dataclass
    list items too, and mappings or lists of numbers (each value has the rule of its key)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        hint, key = hints[field.name], f"{where}.{field.name}"
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if dataclasses.is_dataclass(hint):
            yield from _numeric_fields(hint, key)
        elif typing.get_origin(hint) in (typing.Union, types.UnionType) and any(
            dataclasses.is_dataclass(a) for a in args
        ):
            for arg in args:
                if dataclasses.is_dataclass(arg):
                    yield from _numeric_fields(arg, key)
        elif typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]):
            yield from _numeric_fields(args[0], key)
        elif _has_number(hint):
            if field.default is not dataclasses.MISSING:
                default = field.default
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:
                default = None
            yield key, hint, default


def _all_numeric_fields() -> list[tuple[str, typing.Any, typing.Any]]:
    return [f for section in SECTIONS for f in _numeric_fields(_config_class(section), section)]


def _numbers(value: typing.Any) -> list[float]:
    if isinstance(value, dict):
        return [n for item in value.values() for n in _numbers(item)]
    if isinstance(value, list):
        return [n for item in value for n in _numbers(item)]
    return [] if value is None or isinstance(value, bool) else [value]


def test_every_number_of_every_section_has_a_range() -> None:
    """A new numeric param cannot slip through unchecked: each one needs a rule in RANGES."""
    fields = _all_numeric_fields()
    assert len(fields) > 100  # the walk reached the nested sections
    missing = [key for key, _, _ in fields if range_of(key) is None]
    assert missing == [], f"no rule in chatuie.config.RANGES for: {', '.join(missing)}"


def test_every_default_is_in_its_range() -> None:
    wrong = [
        (key, default)
        for key, _, default in _all_numeric_fields()
        for number in _numbers(default)
        if not range_of(key).admits(number)
    ]
    assert wrong == []


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("sft.train.max_steps", -3, "expected an integer >= 1, got -3"),
        ("base.teach.max_steps", 0, "expected an integer >= 1, got 0"),
        ("rm.train.per_device_batch_size", 0, "expected an integer >= 1, got 0"),
        ("samples.chat.absent_label_rate", 1.5, "expected a number in [0, 1], got 1.5"),
        ("rl.grpo.learning_rate", 0.0, "expected a number > 0, got 0.0"),
        ("rl.grpo.temperature", -1, "expected a number > 0, got -1.0"),
        ("rl.kl_coef", math.nan, "expected a number >= 0, got nan"),
        ("sft.heldout.fraction", 1, "expected a number in [0, 1), got 1.0"),
        ("rl.grpo.num_generations", 1, "expected an integer >= 2 (a group of answers per prompt), got 1"),
        (
            "sft.launch.main_process_port",
            70000,
            "expected an integer in [0, 65535] (0: a free port), got 70000",
        ),
        ("judge.max_tokens", 0, "expected an integer >= 1, got 0"),
        ("sft.repeats", {"conll04": 0}, None),
        ("promote.floor_chat", {"webqa_rouge1": -1.0}, None),
    ],
)
def test_a_number_out_of_range_is_refused_with_its_key(tmp_path, key, value, expected) -> None:
    path = params_with(tmp_path, **{key.replace(".", "__"): value})
    errors = check(path)
    if expected is None:  # a mapping of numbers: the entry is named
        (name, number), *_ = value.items()
        rule = range_of(key)
        integer = isinstance(number, int)
        expected_line = f"{path}: {key}.{name}: expected {rule.describe(integer)}, got {number!r}"
    else:
        expected_line = f"{path}: {key}: {expected}"
    assert errors == [expected_line]


def test_edges_that_mean_something_pass(tmp_path) -> None:
    path = params_with(
        tmp_path,
        sft__train__save_steps=0,  # no checkpoints
        sft__threads=0,  # torch's default
        sft__max_samples_per_dataset=0,  # all
        judge__temperature=0.0,  # greedy
        judge__max_requests=None,  # no budget
        promote__min_f1_gain=-1.0,  # a gain threshold in F1 points may be below zero
        samples__chat__absent_label_rate=1,
    )
    assert check(path) == []


def test_the_stage_read_refuses_it_too() -> None:
    """Where a stage reads its section (tasks/_stage.py section -> build), the same message."""
    sft = _config_class("sft")
    with pytest.raises(
        ConfigError, match=r"^params\.yaml: sft\.train\.max_steps: expected an integer >= 1, got -3$"
    ):
        build(sft, {"train": {"max_steps": -3}}, "params.yaml: sft")
    judge = _config_class("judge")
    with pytest.raises(
        ConfigError, match=r"^params\.yaml: judge\.timeout_s: expected a number > 0, got 0\.0$"
    ):
        build(judge, {"timeout_s": 0}, "params.yaml: judge")
