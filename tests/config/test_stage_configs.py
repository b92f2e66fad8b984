"""Stage configs built from params: what each stage reads, and the errors bad params get."""

from __future__ import annotations

import pytest
from conftest import ROOT

from chatuie.config import ConfigError, build, load_params
from chatuie.eval.evaluation import EvaluateStageConfig


def test_constraint_modes_per_model() -> None:
    config = build(
        EvaluateStageConfig,
        {"constraint_modes": ["constrained", "free"], "model_constraint_modes": {"base": ["constrained"]}},
        "evaluate",
    )
    assert config.modes_for("base") == ["constrained"]
    assert config.modes_for("sft") == ["constrained", "free"]
    # Whatever the default profile narrows, sft keeps the free-decoding ablation.
    default = build(EvaluateStageConfig, load_params(ROOT / "params.yaml")["evaluate"], "evaluate")
    assert "free" in default.modes_for("sft")


@pytest.mark.parametrize(
    "section, where",
    [
        ({"constraint_modes": []}, "evaluate.constraint_modes"),
        ({"model_constraint_modes": {"rl": ["greedy"]}}, "evaluate.model_constraint_modes.rl"),
    ],
)
def test_bad_constraint_modes_name_the_field(section: dict, where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        build(EvaluateStageConfig, section, "evaluate")


@pytest.mark.parametrize("text, value", [("5e-05", 5e-05), ("1E-4", 1e-4), ("2.5e+3", 2500.0), (".5e1", 5.0)])
def test_exponent_floats_written_by_dvc_are_floats(tmp_path, text: str, value: float) -> None:
    # `dvc exp run -S rl.grpo.learning_rate=5e-5` writes 5e-05, which PyYAML reads as a string
    from chatuie.rl.config import RLConfig

    path = tmp_path / "params.yaml"
    path.write_text(f"rl:\n  grpo:\n    learning_rate: {text}\n")
    config = build(RLConfig, load_params(path)["rl"], "params.yaml: rl")
    assert config.grpo.learning_rate == value and isinstance(config.grpo.learning_rate, float)
    # A signed one reads as a float too (a learning rate refuses it as out of range: it must be > 0).
    path.write_text(f"promote:\n  min_f1_gain: -{text}\n")
    assert load_params(path)["promote"]["min_f1_gain"] == -value


@pytest.mark.parametrize("text", ["'fast'", "5e", "e-5", "1e-5x"])
def test_non_numbers_for_a_float_still_name_the_field(tmp_path, text: str) -> None:
    from chatuie.rl.config import RLConfig

    path = tmp_path / "params.yaml"
    path.write_text(f"rl:\n  grpo:\n    learning_rate: {text}\n")
    with pytest.raises(ConfigError, match=r"rl\.grpo\.learning_rate: expected float"):
        build(RLConfig, load_params(path)["rl"], "params.yaml: rl")
