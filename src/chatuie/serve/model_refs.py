"""Model references for users: a saved model directory or an MLflow ``models:/`` URI, loaded in
the dtype this machine computes fast; a model's fingerprint (sha256 of its files).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from chatuie.errors import ExtractError
from chatuie.models.precision import resolve_dtype


def load_model_ref(ref: str, dtype: str = "auto") -> tuple[Any, Any, str]:
    """(model, tokenizer, name) from a saved model directory or an MLflow ``models:/`` URI, in
    ``dtype`` (auto: this machine's fast one, chatuie.models.precision, whatever it was saved in)."""
    path, name = resolve_model_ref(ref)
    return (*load_model_dir(path, dtype), name)


def load_model_dir(path: Path, dtype: str = "auto") -> tuple[Any, Any]:
    from chatuie.models.modeling import load_saved

    return load_saved(path, dtype=resolve_dtype(dtype, where="--dtype"))


def resolve_model_ref(ref: str) -> tuple[Path, str]:
    """(saved model directory, name) of a directory or an MLflow ``models:/`` URI (downloaded)."""
    if ref.startswith("models:/"):
        try:
            from chatuie.tracking import download_model  # MLflow stays behind chatuie.tracking
        except ImportError as err:  # includes a missing download_model
            raise ExtractError(
                f"{ref}: registry URIs need chatuie.tracking.download_model, which is not available "
                f"({err}); pass a local model directory instead"
            ) from None
        try:
            path = Path(download_model(ref))
        except Exception as err:  # the registry's own errors vary by backend
            raise ExtractError(f"{ref}: cannot download the model: {err}") from None
        name = ref.removeprefix("models:/").replace("/", "-").replace("@", "-")
    else:
        path = Path(ref)
        if not path.is_dir():
            raise ExtractError(f"{ref}: no such model directory (train one with `dvc repro sft`)")
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ExtractError(f"{ref}: not a saved model (no config.json / adapter_config.json)")
        name = path.resolve().name
    return path, name


def model_fingerprint(folder: str | Path) -> str:
    """sha256 of a saved model directory: every file's relative path, size and bytes (weights,
    config, tokenizer, chat template). The same model wherever it lies; another after retraining.
    Reads the weights once (about 1 GB/s)."""
    root = Path(folder)
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        name = file.relative_to(root).as_posix().encode("utf-8", "surrogateescape")
        digest.update(name + f"\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
