"""Stage `check_params`: the whole params.yaml (its active profile merged in) checked before any
other stage runs.

A stage checks its own section when it starts, but DVC has deleted that stage's outputs by then
(`sft.train.max_stepz` cost models/sft). This stage is first in dvc.yaml's graph (every other
stage depends on its output), depends on all of params.yaml, and builds every section with the
dataclass its stage builds, as that stage does (``section`` of tasks/_stage.py), plus the
``flow`` section of flows/pipeline.py; and the files of the datasets declared in
``prepare.datasets`` must exist. A mistake stops `dvc repro` here, nothing deleted:

    error: params.yaml: sft.train.max_stepz: unknown key (known: ...)
    error: params.yaml: sft.train.max_steps: expected an integer >= 1, got -3   (chatuie.config.RANGES)

A value the active profile sets is named in its overlay (``profiles/smoke.yaml: sft.train.max_steps:
...``); a profile may not set a key dvc.yaml reads from params.yaml itself (``${register.model}``).
Every mistake found is printed (one line each, section by section), then exit status 1. On success
it writes reports/params_check.json, whose content never depends on the params: the stages after it
see the same dependency and rerun only for their own reasons.

    python -m tasks.check_params [PARAMS_FILE]     # params.yaml by default
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from chatuie.config import ConfigError, blame, build, load_params, overlay_path, read_yaml
from chatuie.config.params import PROFILE_KEY, overlay_keys

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("reports/params_check.json")

# section -> (module, class): what the stage reading that section builds it with.
SECTIONS: dict[str, tuple[str, str]] = {
    "prepare": ("chatuie.data.prepare", "PrepareConfig"),
    "samples": ("chatuie.data.samples", "SamplesConfig"),
    "validate": ("chatuie.data.validation", "ValidateConfig"),
    "model": ("chatuie.models.modeling", "ModelConfig"),
    "base": ("chatuie.train.trainer", "BaseStageConfig"),
    "sft": ("chatuie.train.trainer", "SFTStageConfig"),
    "evaluate": ("chatuie.eval.evaluation", "EvaluateStageConfig"),
    "report": ("chatuie.eval.report", "ReportConfig"),
    "judge": ("chatuie.reward.judge_types", "JudgeConfig"),
    "reward_data": ("chatuie.reward.pairs", "RewardDataConfig"),
    "rm": ("chatuie.reward.model", "RMStageConfig"),
    "rl": ("chatuie.rl.config", "RLConfig"),
    "register": ("chatuie.eval.promotion", "RegisterConfig"),
    "promote": ("chatuie.eval.gate", "PromotionPolicy"),
    "flow": ("flows.pipeline", "FlowConfig"),
}


def _config_class(section: str) -> type:
    module, name = SECTIONS[section]
    return getattr(importlib.import_module(module), name)


def check(params_path: Path) -> list[str]:
    """Every mistake in the params file, one message each (empty: all sections build)."""
    errors = [blame(e, params_path) for e in _check(params_path)]
    with contextlib.suppress(ConfigError, OSError):  # an unreadable file, an unknown profile: said above
        errors += _templated(params_path)
    return errors


def _check(params_path: Path) -> list[str]:
    name = str(params_path)
    try:
        params = load_params(params_path)
    except (ConfigError, OSError) as err:
        return [str(err)]
    errors = []
    unknown = sorted(set(params) - set(SECTIONS) - {PROFILE_KEY})
    for section in unknown:
        errors.append(f"{name}: {section}: unknown section (known: {', '.join(sorted(SECTIONS))})")
    built: dict[str, Any] = {}
    for section in SECTIONS:
        where = f"{name}: {section}"
        data = params.get(section)
        try:
            cls = _config_class(section)
            built[section] = build(cls, data, where)
        except ConfigError as err:
            errors.append(str(err))
    if "prepare" in built:  # what prepare refuses before any training (evaluate.zero_shot vs sft)
        from chatuie.data.prepare import check_zero_shot

        evaluate, sft = params.get("evaluate") or {}, params.get("sft") or {}
        try:
            check_zero_shot(
                list(evaluate.get("zero_shot") or []) if isinstance(evaluate, dict) else [],
                list(sft.get("datasets") or []) if isinstance(sft, dict) else [],
                built["prepare"],
            )
        except ConfigError as err:
            errors.append(str(err).replace("params.yaml: ", f"{name}: ", 1))
        errors += _missing_files(built["prepare"], name)
    return errors


def _templated(params_path: Path) -> list[str]:
    """Keys the active profile sets that dvc.yaml (beside params.yaml) interpolates: DVC reads them
    from params.yaml alone (``models/${register.model}``), the profile's value would not reach it."""
    dvc_yaml = params_path.parent / "dvc.yaml"
    overlay = overlay_path(params_path)
    if overlay is None or not dvc_yaml.is_file():
        return []
    used = set(re.findall(r"\$\{\s*([\w.]+)\s*\}", dvc_yaml.read_text(encoding="utf-8")))
    errors = []
    for key in overlay_keys(read_yaml(overlay)):
        for name in sorted(used):
            if name == key or name.startswith(f"{key}.") or key.startswith(f"{name}."):
                errors.append(
                    f"{overlay}: {key}: dvc.yaml reads ${{{name}}} from {params_path.name} itself: "
                    f"set it there, not in a profile"
                )
    return errors


def _missing_files(config: Any, name: str) -> list[str]:
    """Declared datasets' files that are not there (prepare would stop on them, its outputs gone).

    Paths are the repo root's, as prepare reads them."""
    missing = []
    for i, dataset in enumerate(config.datasets):
        paths = {f"files.{split}": path for split, path in dataset.files.items()}
        if dataset.schema:
            paths["schema"] = dataset.schema
        for key, path in paths.items():
            if not Path(path).is_file():
                hint = (
                    " (`make profile P=smoke` puts them there)" if path.startswith("data/user/smoke/") else ""
                )
                missing.append(
                    f"{name}: prepare.datasets[{i}].{key}: {path}: no such file "
                    f"(dataset {dataset.name!r}){hint}"
                )
    return missing


def main(argv: list[str]) -> int:
    params_path = Path(argv[0]) if argv else Path("params.yaml")
    errors = check(params_path)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        print(f"{params_path}: {len(errors)} mistake(s); no stage ran, nothing deleted", file=sys.stderr)
        return 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"checked": "params.yaml"}) + "\n", encoding="utf-8")
    print(f"{params_path}: every section builds ({', '.join(s for s in SECTIONS)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
