# `make train` and `make test` each create or reuse .venv and install what they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall whenever pyproject.toml changes.
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
export TOKENIZERS_PARALLELISM ?= false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help install test test-fast train train-mvlm smoke clean

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

EMOJI_DVAE := tokenizers/artifacts/emoji_dvae.safetensors
EMOJI_TOKENS := data/emoji/train_tokens.npy
EMOJI_TRAIN := data/emoji/trainval_names.json  # what experiment=emoji_demo trains on

$(EMOJI_DVAE):
	$(BIN)/cots-data emoji --out data/emoji
	$(BIN)/cots-tokenizer train --manifest $(EMOJI_TRAIN) --out $@ --vocab-size 512 --n-hid 32 \
		--n-blk-per-group 1 --input-size 64 --steps 900 --batch-size 16 --max-minutes 5

$(EMOJI_TOKENS): $(EMOJI_DVAE)
	$(BIN)/cots-tokenizer cache --manifest $(EMOJI_TRAIN) --weights $(EMOJI_DVAE) --image-size 64 \
		--patch-size 8 --out $@

train-mvlm: install $(EMOJI_TOKENS)  ## the emoji demo with CMVM + CMLM: trains the emoji dVAE and its token cache when missing
	$(BIN)/cots-train experiment=emoji_demo data=emoji_tokens data.image_tokens.source=cache objective=mvlm

smoke: install  ## tiny towers on synthetic shapes, under a minute
	$(BIN)/cots-train experiment=smoke

clean:  ## remove logs and built data (keeps .venv)
	rm -rf logs outputs data/synthetic
