"""Stage `register`: the final model into the MLflow registry, then the promotion gate.

Logs models/<register.model> (a full model with the MLflow transformers flavor; a LoRA adapter as
artifacts with its base) into this stage's run, registers it as a new version of
`register.registered_model` with metrics/<model>.json's summary as version tags and the per-record
scores of reports/eval/<model>/ as the run's record_scores.json, and (with `register.gate`) gates
it: alias `production` if the paired interval of its gain over production clears the `promote`
section's margin (or, with no production yet, it passes the floors and is not worse than
`register.baseline`), else `candidate`.
Writes metrics/register.json: the version, whether it is production, and why.
"""

from __future__ import annotations

import json
from pathlib import Path

from chatuie.config import ConfigError
from chatuie.eval.comparison import record_scores
from chatuie.eval.gate import Baseline, PromotionPolicy
from chatuie.eval.promotion import RegisterConfig, promote
from chatuie.io import write_json
from chatuie.tracking import register_model
from tasks._stage import run, section


def load_baseline(model: str) -> Baseline:
    path = Path("metrics") / f"{model}.json"
    if not path.exists():
        raise ConfigError(f"params.yaml: register.baseline: {path} not found (evaluate that model first)")
    metrics = json.loads(path.read_text(encoding="utf-8"))
    return Baseline(model, metrics["summary"], record_scores(Path("reports/eval") / model, metrics))


def main() -> None:
    config = section("register", RegisterConfig)
    policy = section("promote", PromotionPolicy)
    metrics_path = Path("metrics") / f"{config.model}.json"
    if not metrics_path.exists():
        raise ConfigError(
            f"params.yaml: register.model: {metrics_path} not found (evaluate that model first)"
        )
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    # Each test record's counts go with the version: the gate pairs them with production's.
    scores = record_scores(Path("reports/eval") / config.model, metrics)
    version = register_model(
        Path("models") / config.model,
        metrics["summary"],
        name=config.registered_model,
        model_key=config.model,
        record_scores=scores,
    )
    result: dict = {"version": version, "model": config.model}
    if config.gate:
        baseline = None if config.baseline == config.model else load_baseline(config.baseline)
        decision = promote(version, policy, name=config.registered_model, baseline=baseline)
        result.update(production=decision.promoted, alias=decision.alias, reason=decision.reason)
    write_json(Path("metrics/register.json"), result)
    print(result)


if __name__ == "__main__":
    run(main)
