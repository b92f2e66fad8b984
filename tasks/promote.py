"""Promotion by hand: gate a registered version, or roll production back.

    python tasks/promote.py                 # gate the latest version of `chatuie`
    python tasks/promote.py --version 3     # gate version 3
    python tasks/promote.py --rollback      # production back to the previous production version

The gate's margins come from params.yaml's `promote` section (`--params` for another file), the
registry from MLFLOW_TRACKING_URI or the repository's mlflow/ store. Prints the decision as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from _stage import run, section

from chatuie.tracking import REGISTERED_MODEL, PromotionPolicy, promote, rollback


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", type=int, default=None, help="version to gate (default: the latest)")
    parser.add_argument("--rollback", action="store_true", help="move production to the previous one")
    parser.add_argument("--name", default=REGISTERED_MODEL, help="registered model name")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    args = parser.parse_args(argv)
    if args.rollback:
        decision = rollback(name=args.name)
    else:
        decision = promote(args.version, section("promote", PromotionPolicy, args.params), name=args.name)
    print(json.dumps(dataclasses.asdict(decision)))


if __name__ == "__main__":
    run(main, track=False)
