"""Stage `report`: the paper's tables and plots for this run, from the evaluate stages' metrics.

Reads metrics/<model>.json (base, sft, and rl when it exists) and metrics/train/; writes
reports/report.md, reports/report.html (self-contained) and reports/report_plots/*.svg.
"""

from __future__ import annotations

from pathlib import Path

from chatuie.eval.report import ReportConfig, write_report
from tasks._stage import run, section


def main() -> None:
    config = section("report", ReportConfig)
    written = write_report(Path("metrics"), Path("reports"), config)
    for path in written:
        print(path)


if __name__ == "__main__":
    run(main)
