# The three commands of the README. Everything runs inside .venv (made by `make setup`).
VENV := .venv/bin
export PATH := $(CURDIR)/$(VENV):$(PATH)

.PHONY: setup repro test lint

setup:
	bash scripts/setup.sh

repro:
	dvc repro

# Two workers: most of the suite waits on subprocesses and servers; see tests/conftest.py.
test:
	python -m pytest -q -n 2 --dist loadgroup

lint:
	ruff check .
