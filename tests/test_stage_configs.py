"""Stage configs built from params: what each stage reads, and the errors bad params get."""

from __future__ import annotations

import pytest
from conftest import ROOT
from evaluate import EvaluateStageConfig

from chatuie.config import ConfigError, build, load_params


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
