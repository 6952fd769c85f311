# `make train` and `make test` each create or reuse .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall whenever pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
export TOKENIZERS_PARALLELISM ?= false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help install test test-fast train smoke clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(STAMP)  ## create .venv and install cots with its test and optional extras

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[test,minilm,shards]"
	rm -f $(VENV)/.installed-* && touch $@

test: install  ## the whole test suite (slow DDP / resume runs included)
	$(BIN)/python -m pytest -q

test-fast: install  ## the suite without the slow-marked runs
	$(BIN)/python -m pytest -q -m "not slow"

train: install  ## the main job: build the emoji set (cached), pretrain, evaluate on held-out concepts, report
	$(BIN)/cots-data emoji --out data/emoji
	$(BIN)/cots-train experiment=emoji_demo

smoke: install  ## tiny towers on synthetic shapes, under a minute
	$(BIN)/cots-train experiment=smoke

clean:  ## remove logs and built data (keeps .venv)
	rm -rf logs outputs data/synthetic
