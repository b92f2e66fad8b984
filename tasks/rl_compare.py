"""Stage `rl_compare`: what RL changed over SFT, on the same test records, with paired intervals.

``python -m tasks.rl_compare [base new]`` (default ``sft rl``) reads metrics/<model>.json and the
per-record predictions under reports/eval/<model>/ (the evaluate stage's) and writes
metrics/<new>_vs_<base>.json: the F1 gained per dataset and constraint mode (the headline mode's
with its 95 % paired bootstrap interval), the mean IE F1 gain with its interval, and each chat
metric's change, absolute and relative (with its interval where per-example scores exist).
"""

from __future__ import annotations

import sys
from pathlib import Path

from chatuie.eval.comparison import compare_runs, paired_gain, record_scores
from chatuie.io import read_json, write_json
from tasks._stage import run


def compare(base: str, new: str) -> dict:
    metrics = {name: read_json(Path("metrics") / f"{name}.json") for name in (base, new)}
    scores = {name: record_scores(Path("reports/eval") / name, metrics[name]) for name in (base, new)}
    paired = paired_gain(scores[base], scores[new])
    result = compare_runs(metrics[base], metrics[new], base, new, paired=paired)
    write_json(Path("metrics") / f"{new}_vs_{base}.json", result)
    return result


def main() -> None:
    base, new = (sys.argv[1:3] + ["sft", "rl"][len(sys.argv[1:3]) :])[:2]
    print(compare(base, new)["summary"])


if __name__ == "__main__":
    run(main)
