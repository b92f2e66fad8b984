"""Stage `check_raw`: data/raw must be the raw data that data/raw.dvc pins, or prepare never runs.

`dvc repro` treats data/raw.dvc as a data source: were data/raw a stage's dependency, a changed
file under it would be hashed again and written into data/raw.dvc ("Verifying data sources"),
silently the new truth of every downstream metric. So no stage depends on the folder itself:
prepare depends on this stage's output (the pinned md5), which keeps data/raw.dvc out of `dvc
repro`'s graph, never re-recorded. This stage runs on every `dvc repro` (always_changed), before
prepare and so before every stage that reads what prepare makes, and hashes the folder as DVC does
(md5 of each file, then of the sorted listing). A difference stops `dvc repro` here, data/raw.dvc
untouched:

    error: data/raw is not the raw data pinned in data/raw.dvc: expected md5 8dd5...dir, found a407...dir
      changed: data/raw/webqa/SOURCE.md (expected md5 ..., found ...)
    restore the pinned data: dvc checkout --force data/raw.dvc
    ...

The files are named from the pinned listing in the DVC cache (.dvc/cache, there after
`dvc pull data/raw.dvc`). Changing the raw data on purpose is `dvc add data/raw` and a commit of
data/raw.dvc: a new pin, so a new output here (``{"data/raw": "<md5>"}``), and prepare reruns.

    python -m tasks.check_raw [DVC_FILE]     # data/raw.dvc by default
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import yaml

OUT = Path("reports/raw_check.json")
DVC_FILE = Path("data/raw.dvc")
CACHE = Path(".dvc/cache/files/md5")
RESTORE = "dvc checkout --force {dvc_file}"
PULL = "dvc pull --force {dvc_file}"


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def listing(folder: Path) -> dict[str, str]:
    """relative posix path -> md5 of every file under ``folder`` (DVC's ``hash: md5``: raw bytes)."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            files[path.relative_to(folder).as_posix()] = file_md5(path)
    return files


def dir_md5(files: dict[str, str]) -> str:
    """DVC's hash of a folder: md5 of its .dir listing (dvc_data Tree.as_bytes), plus ``.dir``."""
    entries = [{"md5": md5, "relpath": relpath} for relpath, md5 in sorted(files.items())]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def pinned(dvc_file: Path) -> tuple[Path, str]:
    """(folder, md5) that ``dvc_file`` records for its one output."""
    data = yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}
    (out,) = data.get("outs") or [None]
    if not isinstance(out, dict) or "md5" not in out or "path" not in out:
        raise ValueError(f"{dvc_file}: no output with an md5 (expected what `dvc add` writes)")
    return dvc_file.parent / out["path"], str(out["md5"])


def pinned_listing(md5: str, cache: Path = CACHE) -> dict[str, str] | None:
    """The pinned folder's files (relpath -> md5) from the DVC cache; None where it is not there."""
    manifest = cache / md5[:2] / md5[2:]
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {entry["relpath"]: entry["md5"] for entry in entries}


def check(dvc_file: Path = DVC_FILE, cache: Path = CACHE) -> list[str]:
    """What differs between the folder ``dvc_file`` pins and the pin (empty: they agree)."""
    try:
        folder, expected = pinned(dvc_file)
    except (OSError, ValueError, yaml.YAMLError) as err:
        return [f"{dvc_file}: cannot read the pin: {err}"]
    restore = RESTORE.format(dvc_file=dvc_file)
    if not folder.is_dir():
        return [
            f"{folder} is missing (pinned in {dvc_file}: md5 {expected})",
            f"get it: {PULL.format(dvc_file=dvc_file)}",
        ]
    files = listing(folder)
    found = dir_md5(files)
    if found == expected:
        return []
    lines = [f"{folder} is not the raw data pinned in {dvc_file}: expected md5 {expected}, found {found}"]
    recorded = pinned_listing(expected, cache)
    if recorded is None:
        lines.append(f"  (the pinned listing {expected} is not in the DVC cache: the files are not named)")
    else:
        for relpath in sorted(set(recorded) | set(files)):
            old, new = recorded.get(relpath), files.get(relpath)
            if old == new:
                continue
            if old is None:
                lines.append(f"  added: {folder / relpath} (md5 {new})")
            elif new is None:
                lines.append(f"  missing: {folder / relpath} (expected md5 {old})")
            else:
                lines.append(f"  changed: {folder / relpath} (expected md5 {old}, found {new})")
    lines += [
        f"restore the pinned data: {restore}"
        + ("" if recorded is not None else f" (not in the cache: {PULL.format(dvc_file=dvc_file)})"),
        f"or make this the raw data on purpose: dvc add {folder} && git commit {dvc_file} "
        "(prepare and every stage after it rerun)",
    ]
    return lines


def main(argv: list[str]) -> int:
    dvc_file = Path(argv[0]) if argv else DVC_FILE
    problems = check(dvc_file)
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        for line in problems[1:]:
            print(line, file=sys.stderr)
        print("prepare and every stage after it did not run: nothing deleted", file=sys.stderr)
        return 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    folder, md5 = pinned(dvc_file)
    OUT.write_text(json.dumps({folder.as_posix(): md5}) + "\n", encoding="utf-8")
    print(f"{folder}: the raw data pinned in {dvc_file} (md5 {md5})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
