"""Persisted checkpoints resume only the run that wrote them."""

from __future__ import annotations

from pathlib import Path

from chatuie.train.trainer import claim_checkpoints, file_digest


def test_same_identity_resumes_other_identity_does_not(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    assert claim_checkpoints(folder, {"lr": 1e-3, "samples": ["a", "b"]}) is False  # first run
    assert claim_checkpoints(folder, {"lr": 1e-3, "samples": ["a", "b"]}) is True  # killed, rerun
    assert claim_checkpoints(folder, {"lr": 5e-4, "samples": ["a", "b"]}) is False  # other params
    assert claim_checkpoints(folder, {"lr": 5e-4, "samples": ["a", "b"]}) is True


def test_file_digest_sees_content_changes(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"1")
    first = file_digest(tmp_path / "m")
    (tmp_path / "m" / "w.bin").write_bytes(b"2")
    assert file_digest(tmp_path / "m") != first
