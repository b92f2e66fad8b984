"""Profiles as overlays (chatuie.config.params): profiles/<name>.yaml merged over params.yaml."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, profile_params, profiled_params

from chatuie.config import ConfigError, load_params, merge, read_yaml

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


def test_an_unknown_profile_lists_the_known_ones(tmp_path: Path) -> None:
    params = profiled_params(tmp_path, "smoke")
    params.write_text(params.read_text().replace("profile: smoke", "profile: gpuu"))
    with pytest.raises(ConfigError) as err:
        load_params(params)
    assert str(err.value) == f"{params}: profile: no profile 'gpuu' (known: default, gpu, smoke, tiny)"


@pytest.mark.parametrize("profile", ["default", "tiny", "smoke", "gpu"])
def test_load_params_merges_the_active_profile(tmp_path: Path, profile: str) -> None:
    merged = load_params(profiled_params(tmp_path, profile))
    assert merged.pop("profile") == profile
    assert merged == profile_params(profile)
    if profile == "default":
        assert merged == {k: v for k, v in read_yaml(ROOT / "params.yaml").items() if k != "profile"}


def test_the_smoke_profile_is_what_the_smoke_tests_expect(tmp_path: Path) -> None:
    smoke = load_params(profiled_params(tmp_path, "smoke"))
    assert smoke["model"]["base"] == "tiny" and smoke["model"]["lora"] is None
    assert smoke["sft"]["train"]["max_steps"] == 10 and "loss_type" not in smoke["sft"]["train"]
    assert "repeats" not in smoke["sft"] and [d["name"] for d in smoke["prepare"]["datasets"]] == [
        "smoke_ner",
        "smoke_re",
    ]


def test_a_stage_section_names_the_overlay_that_set_a_bad_value(tmp_path: Path, monkeypatch) -> None:
    from tasks._stage import section
    from tasks.sft import SFTStageConfig

    params = profiled_params(tmp_path, "smoke")
    overlay = tmp_path / "profiles" / "smoke.yaml"
    overlay.write_text(overlay.read_text().replace("    max_steps: 10\n", "    max_steps: 0\n", 1))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        section("sft", SFTStageConfig)
    assert str(err.value) == "profiles/smoke.yaml: sft.train.max_steps: expected an integer >= 1, got 0"
    with pytest.raises(ConfigError, match=f"^{overlay}: sft.train.max_steps: "):
        section("sft", SFTStageConfig, params)  # a path given: the overlay's beside it


# ------------------------------------------------------------------------------- flow overrides


def _set(params: dict, dotted: str, value: Any) -> dict:
    """An override of a full params file (flows.pipeline.apply_overrides before profiles)."""
    params = copy.deepcopy(params)
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
    node[leaf] = value
    return params


@pytest.mark.parametrize(
    ("profile", "dotted", "value", "lands_in"),
    [
        ("smoke", "rl.ppo.total_episodes", 16, "profiles/smoke.yaml"),  # the profile sets it
        ("smoke", "prepare.seed", 5, "params.yaml"),  # the profile leaves it to params.yaml
        ("smoke", "sft.repeats", {"fewfc": 2}, "profiles/smoke.yaml"),  # the profile removes it
        ("smoke", "rm.launch.processes", 2, "params.yaml"),  # a key neither file has
        ("smoke", "sft.train", {"max_steps": 5}, "profiles/smoke.yaml"),  # a mapping, whole
        ("smoke", "sft.repeats", {"conll04": 2, "fewfc": 1}, "profiles/smoke.yaml"),
        ("tiny", "sft.repeats", {}, "profiles/tiny.yaml"),
        ("gpu", "sft.launch.processes", 4, "profiles/gpu.yaml"),  # below a key the profile adds
        ("gpu", "sft.launch", {"processes": 2}, "profiles/gpu.yaml"),
        ("default", "sft.train.max_steps", 1, "params.yaml"),
    ],
)
def test_an_override_lands_where_it_takes_effect(tmp_path, profile, dotted, value, lands_in) -> None:
    from flows.pipeline import apply_overrides

    params = profiled_params(tmp_path, profile)
    before = {p: p.read_text() for p in [params, *(tmp_path / "profiles").glob("*.yaml")]}
    expected = _set(load_params(params), dotted, value)
    apply_overrides(params, {dotted: value})
    assert load_params(params) == expected
    changed = [str(p.relative_to(tmp_path)) for p, text in before.items() if p.read_text() != text]
    assert changed == [lands_in]


def test_an_override_of_the_profile_comes_first(tmp_path) -> None:
    from flows.pipeline import apply_overrides

    params = profiled_params(tmp_path, "default")
    smoke = load_params(profiled_params(tmp_path / "other", "smoke"))
    expected = _set(smoke, "sft.train.max_steps", 3)
    apply_overrides(params, {"sft.train.max_steps": 3, "profile": "smoke"})
    assert load_params(params) == expected
    assert "max_steps: 3" in (tmp_path / "profiles" / "smoke.yaml").read_text()


@pytest.mark.parametrize(
    ("profile", "dotted", "message"),
    [
        ("tiny", "model.lora.r", "profiles/tiny.yaml sets model.lora to None: override it whole"),
        ("smoke", "sft.repeats.conll04", "profiles/smoke.yaml removes sft.repeats: override it whole"),
    ],
)
def test_an_override_below_what_the_profile_replaces_is_refused(tmp_path, profile, dotted, message) -> None:
    from flows.pipeline import apply_overrides

    params = profiled_params(tmp_path, profile)
    with pytest.raises(ValueError) as err:
        apply_overrides(params, {dotted: 8})
    assert str(err.value) == f"override {dotted}: {tmp_path / message}"


def test_every_overlay_names_the_sections_stages_read_from_it() -> None:
    """dvc.yaml's stages list their sections of profiles/${profile}.yaml; DVC refuses a section the
    file lacks, so each overlay names them all (`{}` where it changes nothing)."""
    import yaml

    root = Path(__file__).resolve().parents[2]
    listed: set[str] = set()
    for stage in yaml.safe_load((root / "dvc.yaml").read_text())["stages"].values():
        body = stage.get("do", stage)
        for entry in body.get("params", []):
            if isinstance(entry, dict) and "profiles/${profile}.yaml" in entry:
                listed |= set(entry["profiles/${profile}.yaml"])
    assert {"sft", "rl", "evaluate", "samples"} <= listed
    for overlay in sorted((root / "profiles").glob("*.yaml")):
        sections = set(yaml.safe_load(overlay.read_text()) or {})
        assert listed <= sections, f"{overlay.name} lacks {sorted(listed - sections)}: add them as `{{}}`"
