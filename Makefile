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

test:
	python -m pytest -q

lint:
	ruff check .
