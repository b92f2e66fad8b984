"""Profiles as overlays (chatuie.config.params): profiles/<name>.yaml merged over params.yaml."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from chatuie.config import ConfigError, load_params, merge

BASE = {
    "sft": {"datasets": ["a", "b"], "repeats": {"a": 3}, "train": {"max_steps": 800, "lr": 0.1}, "seed": 13},
    "model": {"base": "gemma", "lora": {"r": 16, "alpha": 32}},
}


def test_nested_mappings_merge_and_everything_else_replaces() -> None:
    overlay = {
        "sft": {"datasets": ["c"], "train": {"max_steps": 10}},  # a list replaced whole
        "model": {"lora": None},  # a mapping replaced by null
    }
    before = copy.deepcopy(BASE)
    merged = merge(BASE, overlay, "profiles/x.yaml")
    assert merged == {
        "sft": {"datasets": ["c"], "repeats": {"a": 3}, "train": {"max_steps": 10, "lr": 0.1}, "seed": 13},
        "model": {"base": "gemma", "lora": None},
    }
    assert before == BASE and overlay["sft"]["datasets"] == ["c"]  # neither input changed
    merged["sft"]["datasets"].append("d")
    assert overlay["sft"]["datasets"] == ["c"]  # nor shared with the result


def test_tilde_removes_and_plus_adds() -> None:
    overlay = {
        "sft": {"repeats": {"~a": None}, "~seed": None, "train": {"+device": "auto"}, "+launch": {"p": 8}},
        "model": {"~lora": None},
    }
    merged = merge(BASE, overlay, "profiles/x.yaml")
    assert merged["sft"] == {
        "datasets": ["a", "b"],
        "repeats": {},
        "train": {"max_steps": 800, "lr": 0.1, "device": "auto"},
        "launch": {"p": 8},
    }
    assert merged["model"] == {"base": "gemma"}
    assert list(merged["sft"]["train"]) == ["max_steps", "lr", "device"]  # params.yaml's order, then added


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        (
            {"sft": {"train": {"max_stepz": 3}}},
            "sft.train.max_stepz: not a key of params.yaml (to add one it leaves out: +max_stepz)",
        ),
        ({"sftt": {}}, "sftt: not a key of params.yaml"),
        ({"sft": {"~threads": None}}, "sft.~threads: sft.threads is not a key of params.yaml"),
        ({"sft": {"~seed": 13}}, "sft.~seed: removes sft.seed, so it takes no value"),
        ({"sft": {"+seed": 1}}, "sft.+seed: sft.seed is a key of params.yaml already"),
        ({"sft": {"seed": 1, "~seed": None}}, "sft.seed: set, added or removed more than once"),
        ({"profile": "smoke"}, "profile: the profile is chosen in params.yaml"),
        ({"sft": {"train": [1]}}, None),  # a mapping replaced by a list: allowed (check_params judges it)
    ],
)
def test_overlay_mistakes_name_the_file_and_key(overlay: dict, message: str | None) -> None:
    if message is None:
        assert merge(BASE, overlay, "profiles/x.yaml")["sft"]["train"] == [1]
        return
    with pytest.raises(ConfigError) as err:
        merge(BASE, overlay, "profiles/x.yaml")
    assert str(err.value).startswith(f"profiles/x.yaml: {message}"), str(err.value)


def test_a_params_file_without_a_profile_is_read_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("sft:\n  train: {max_steps: 3}\n")
    assert load_params(path) == {"sft": {"train": {"max_steps": 3}}}
