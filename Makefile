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

# Two workers: much of the suite waits on servers and subprocesses. A module's tests run on one
# worker, in the order tests/conftest.py gives the modules (not reordered by size).
test:
	python -m pytest -q -n 2 --dist loadscope --no-loadscope-reorder

lint:
	ruff check .
