#!/usr/bin/env bash
# One-shot setup: a virtualenv in .venv, the pinned stack (CPU torch first), raw data from the DVC remote.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
# torch first, from the CPU wheel: with torch==2.13.0 present nothing later resolves a CUDA build.
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install -e ".[dev]"

if .venv/bin/python -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
    echo "setup: a CUDA (nvidia-*) package was pulled in; the CPU stack is broken" >&2
    exit 1
fi

# Raw data only (data/raw.dvc -> data/raw/, from the default remote ../shared/dvc-store): every
# other output is rebuilt by `dvc repro`, and was never pushed, so a bare `dvc pull` would report it.
.venv/bin/dvc pull --quiet data/raw.dvc
echo "setup: done ($(find data/raw -type f | wc -l) raw files)"
