# `make train` and `make test` each create or reuse .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall whenever pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
export TOKENIZERS_PARALLELISM ?= false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help install lint format test test-fast emoji-data train train-mvlm smoke clean clean-dvae

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

install: $(STAMP)  ## create .venv and install cots with its test and optional extras (chromium: .ci/run; webdata: img2dataset for the tests)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e ".[test,lint,minilm,export,faiss,serve,webdata]"
	rm -f $(VENV)/.installed-* && touch $@

lint: install  ## ruff: lint rules and the format check (pyproject.toml [tool.ruff])
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install  ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install  ## the whole test suite (slow DDP / resume runs included)
	$(BIN)/python -m pytest -q

test-fast: install  ## the suite without the slow-marked runs
	$(BIN)/python -m pytest -q -m "not slow"

emoji-data: install  ## build the emoji image-text set (npm packages cached; checked and reused when built)
	$(BIN)/cots-data emoji --out data/emoji

# The emoji dVAE behind CMVM's targets in experiment=emoji_mvlm (64 px -> 8x8 tokens, 512 codes),
# trained once when missing: 600 steps of 16 images, about 1.8 min here (`make clean-dvae` removes it).
EMOJI_DVAE := tokenizers/artifacts/emoji_dvae.safetensors
# What experiment=emoji_demo (and emoji_mvlm) trains on.
EMOJI_TRAIN := data/emoji/trainval_names.json

$(EMOJI_DVAE): | emoji-data
	$(BIN)/cots-dvae train --manifest $(EMOJI_TRAIN) --out $@ --vocab-size 512 --n-hid 32 \
		--n-blk-per-group 1 --input-size 64 --steps 600 --batch-size 16 --lr 2e-3

train: install emoji-data  ## the main job: build the emoji set (cached), pretrain, evaluate on held-out concepts, report
	$(BIN)/cots-train experiment=emoji_demo

train-mvlm: install emoji-data $(EMOJI_DVAE)  ## the emoji demo with the full objective (+ L_task, CMVM, CMLM); trains the emoji dVAE first when missing
	$(BIN)/cots-train experiment=emoji_mvlm

smoke: install  ## tiny towers on synthetic shapes, under a minute
	$(BIN)/cots-train experiment=smoke

clean:  ## remove logs and built data (keeps .venv and the emoji dVAE)
	rm -rf logs outputs data/synthetic

clean-dvae:  ## remove the emoji dVAE (the next `make train-mvlm` trains it again)
	rm -f $(EMOJI_DVAE) $(basename $(EMOJI_DVAE))_recon.png $(basename $(EMOJI_DVAE))_metrics.json  # all untracked
