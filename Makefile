# The three commands of the README. Everything runs inside .venv (made by `make setup`).
VENV := .venv/bin
export PATH := $(CURDIR)/$(VENV):$(PATH)

.PHONY: setup repro test lint

setup:
	bash scripts/setup.sh

repro:
	dvc repro

test:
	python -m pytest -q

lint:
	ruff check .
