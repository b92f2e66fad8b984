"""The check_raw stage: data/raw must be what data/raw.dvc pins (tasks/check_raw.py).

`dvc repro` used to re-record a changed raw file into data/raw.dvc ("Verifying data sources") and
go on: a one-byte edit became the new truth of every downstream metric. Now it stops at check_raw
with the hashes and the restore command, data/raw.dvc untouched.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml
from conftest import ROOT

from tasks.check_raw import check, dir_md5, listing
from tests.helpers.pipeline_repo import make_repo, run, tool_env

PINNED = "8dd5cb89472d7affab57d8bf1b914da0.dir"  # data/raw.dvc as committed
EDITED = "a40750c1dd227c1c3cb5b223a79b0f77.dir"  # what `dvc repro` re-recorded after the edit below


def test_the_hash_is_dvcs(raw_dir: Path, monkeypatch) -> None:
    """The folder hashed as DVC does: the committed data agrees with data/raw.dvc."""
    monkeypatch.chdir(ROOT)
    pin = yaml.safe_load((ROOT / "data" / "raw.dvc").read_text())["outs"][0]["md5"]
    assert dir_md5(listing(raw_dir)) == pin
    assert check() == []


def test_a_folder_named_file_by_file(tmp_path: Path) -> None:
    raw = tmp_path / "data" / "raw"
    (raw / "a").mkdir(parents=True)
    (raw / "a" / "one.txt").write_text("one\n")
    (raw / "two.txt").write_text("two\n")
    files = listing(raw)
    md5 = dir_md5(files)
    dvc_file = tmp_path / "data" / "raw.dvc"
    dvc_file.write_text(yaml.safe_dump({"outs": [{"md5": md5, "path": "raw", "hash": "md5"}]}))
    cache = tmp_path / "cache"
    (cache / md5[:2]).mkdir(parents=True)
    listed = [{"md5": m, "relpath": p} for p, m in sorted(files.items())]
    (cache / md5[:2] / md5[2:]).write_text(json.dumps(listed))
    assert check(dvc_file, cache) == []

    (raw / "a" / "one.txt").write_text("one!\n")
    (raw / "two.txt").unlink()
    (raw / "three.txt").write_text("three\n")
    problems = check(dvc_file, cache)
    now = listing(raw)
    assert problems[0] == (
        f"{raw} is not the raw data pinned in {dvc_file}: expected md5 {md5}, found {dir_md5(now)}"
    )
    assert problems[1:4] == [
        f"  changed: {raw / 'a/one.txt'} (expected md5 {files['a/one.txt']}, found {now['a/one.txt']})",
        f"  added: {raw / 'three.txt'} (md5 {now['three.txt']})",
        f"  missing: {raw / 'two.txt'} (expected md5 {files['two.txt']})",
    ]
    assert problems[4] == f"restore the pinned data: dvc checkout --force {dvc_file}"
    # Without the pinned listing in the cache: the hashes, and `dvc pull` too.
    problems = check(dvc_file, tmp_path / "elsewhere")
    assert "not in the DVC cache" in problems[1]
    assert problems[2].endswith(f"(not in the cache: dvc pull --force {dvc_file})")


def test_a_changed_raw_file_stops_dvc_repro_and_is_not_recorded(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo")
    env = tool_env(clean=True, CHATUIE_TRACKING="off")
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "pipeline"], repo, env)
    pin = (repo / "data" / "raw.dvc").read_text()
    assert PINNED in pin
    source = repo / "data" / "raw" / "webqa" / "SOURCE.md"
    with open(source, "a") as handle:
        handle.write("x\n")  # the issue's `echo x >> data/raw/webqa/SOURCE.md`

    proc = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stderr + proc.stdout
    assert proc.returncode != 0, out
    assert (
        f"error: data/raw is not the raw data pinned in data/raw.dvc: expected md5 {PINNED}, found {EDITED}"
    ) in out
    assert (
        "  changed: data/raw/webqa/SOURCE.md (expected md5 5abee94b9f1c43c5422b8bd1e2b79faa, "
        "found b3b766a71b33ca5be3fd67787db294fd)"
    ) in out
    assert "restore the pinned data: dvc checkout --force data/raw.dvc" in out
    assert "Verifying data sources" not in out and "Running stage 'prepare'" not in out
    assert (repo / "data" / "raw.dvc").read_text() == pin
    assert run(["git", "diff", "--stat", "data/raw.dvc"], repo, env).stdout == ""

    # The restore command the message names, then the check passes.
    run(["dvc", "checkout", "--force", "data/raw.dvc"], repo, env)
    proc = run(["dvc", "repro", "check_raw"], repo, env)
    assert json.loads((repo / "reports" / "raw_check.json").read_text()) == {"data/raw": PINNED}

    # Changing the raw data on purpose: `dvc add` makes a new pin, and prepare's dependency changes.
    with open(source, "a") as handle:
        handle.write("x\n")  # the issue's `echo x >> data/raw/webqa/SOURCE.md`
    run(["dvc", "add", "-q", "data/raw"], repo, env)
    assert EDITED in (repo / "data" / "raw.dvc").read_text()
    run(["dvc", "repro", "check_raw"], repo, env)
    assert json.loads((repo / "reports" / "raw_check.json").read_text()) == {"data/raw": EDITED}
