# The commands of the README. Everything runs inside .venv (made by `make setup`).
VENV := .venv/bin
export PATH := $(CURDIR)/$(VENV):$(PATH)

.PHONY: setup profile repro test lint

setup:
	bash scripts/setup.sh

# make profile P=smoke | tiny | gpu | default: params.yaml's `profile:` set to it (scripts/profile.sh)
profile:
	bash scripts/profile.sh "$(P)"

repro:
	dvc repro

# Two workers: much of the suite waits on servers and subprocesses. tests/conftest.py keeps each
# module on one worker and orders the modules (no reordering by size: --no-loadscope-reorder).
test:
	python -m pytest -q -n 2 --dist loadgroup --no-loadscope-reorder

lint:
	ruff check .
