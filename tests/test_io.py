from __future__ import annotations

from pathlib import Path

import pytest

from chatuie.io import atomic_open, read_jsonl, write_jsonl


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError), atomic_open(target) as handle:
        handle.write("partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_until_success(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    write_jsonl(target, [{"a": 1}])

    def rows():
        yield {"a": 2}
        raise ValueError("bad row")

    with pytest.raises(ValueError):
        write_jsonl(target, rows())
    assert list(read_jsonl(target)) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_read_jsonl_names_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"x.jsonl:2: invalid JSON"):
        list(read_jsonl(path))
