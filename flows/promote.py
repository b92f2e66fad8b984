"""Prefect flow: gate a registered version into production, or roll production back.

The same operations as ``chatuie promote`` (chatuie.eval.promotion.promote,
chatuie.tracking.rollback), with the decision published as a markdown artifact (key
``chatuie-promotion``). The gate's margins come from params.yaml's ``promote`` section, ``policy``
overrides some of them for this run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from chatuie import tracking
from chatuie.config import build, load_params
from chatuie.eval.gate import PromotionPolicy
from chatuie.eval.promotion import promote

ROOT = Path(__file__).resolve().parents[1]
ARTIFACT_KEY = "chatuie-promotion"


@flow(name="chatuie-promote")
def promote_flow(
    version: int | None = None,
    rollback: bool = False,
    root: str | None = None,
    policy: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Gate ``version`` (default: the latest) or, with ``rollback``, restore the previous production."""
    repo = Path(root or ROOT).resolve()
    params = load_params(repo / "params.yaml")
    name = (params.get("register") or {}).get("registered_model", tracking.REGISTERED_MODEL)
    if rollback:
        decision = tracking.rollback(name=name, root=repo)
    else:
        rules = build(PromotionPolicy, {**(params.get("promote") or {}), **(policy or {})}, "promote")
        decision = promote(version, rules, name=name, root=repo)
    get_run_logger().info("%s version %s -> %s: %s", name, decision.version, decision.alias, decision.reason)
    create_markdown_artifact(
        key=ARTIFACT_KEY,
        markdown=(
            f"# {name}: version {decision.version} -> `{decision.alias}`\n\n{decision.reason}\n\n"
            f"Compared with production version: {decision.compared_to}\n"
        ),
        description="chatuie promotion decision",
    )
    return dataclasses.asdict(decision)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", type=int, default=None)
    parser.add_argument("--rollback", action="store_true")
    parser.add_argument("--root", default=str(ROOT))
    args = parser.parse_args()
    print(promote_flow(version=args.version, rollback=args.rollback, root=args.root))
