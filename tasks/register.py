"""Stage `register`: the final model into the MLflow registry, then the promotion gate.

Logs models/<register.model> (a full model with the MLflow transformers flavor; a LoRA adapter as
artifacts with its base) into this stage's run, registers it as a new version of
`register.registered_model` with metrics/<model>.json's summary as version tags, and (with
`register.gate`) gates it: alias `production` if it beats production by the `promote` section's
margins (or passes its floors when there is no production yet), else `candidate`.
Writes metrics/register.json: the version, whether it is production, and why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from _stage import run, section

from chatuie.config import ConfigError
from chatuie.io import write_json
from chatuie.tracking import PromotionPolicy, promote, register_model


@dataclass(frozen=True)
class RegisterConfig:
    """``register`` section."""

    model: str = "sft"  # models/<model> and metrics/<model>.json (later: rl)
    registered_model: str = "chatuie"
    gate: bool = True  # run the promotion gate right after registering


def main() -> None:
    config = section("register", RegisterConfig)
    policy = section("promote", PromotionPolicy)
    metrics_path = Path("metrics") / f"{config.model}.json"
    if not metrics_path.exists():
        raise ConfigError(
            f"params.yaml: register.model: {metrics_path} not found (evaluate that model first)"
        )
    summary = json.loads(metrics_path.read_text(encoding="utf-8"))["summary"]
    version = register_model(
        Path("models") / config.model, summary, name=config.registered_model, model_key=config.model
    )
    result: dict = {"version": version, "model": config.model}
    if config.gate:
        decision = promote(version, policy, name=config.registered_model)
        result.update(production=decision.promoted, alias=decision.alias, reason=decision.reason)
    write_json(Path("metrics/register.json"), result)
    print(result)


if __name__ == "__main__":
    run(main)
