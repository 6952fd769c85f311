"""Evidence tables: what each COTS part does at an equal wall-clock budget, over several seeds, with error bars.

Every (row, seed) of a table is one training run, scored after training on the Google and the Twitter
gallery of held-out concepts. Each finished run writes its own record, so a table is built over as
many sittings as the machine allows: ``run`` skips the runs that have a record and resumes an
interrupted one from the ``last.ckpt`` in its run folder. Run from the repository root.

0. The CMVM/CMLM rows (``experiment=emoji_mvlm``) need the emoji dVAE; ``calibrate`` and ``run`` check every
   file they need before the first step and stop with the list of what is missing::

       make tokenizers/artifacts/emoji_dvae.safetensors         # 1.8 min, once (what `make train-mvlm` trains)

1. Calibrate once, on a quiet machine (nothing else running; about 12 min for the 5 timings): the rows are
   timed together in 3 interleaved rounds (this virtual machine's speed drifts by up to 30% over minutes,
   and only the ratios between rows set their steps); each timing's median step (``cots.callbacks.StepTimer``)
   goes to ``bench/results/evidence/step_times.json`` with the per-round medians, the commit, date, CPU and
   torch threads::

       .venv/bin/python bench/evidence.py calibrate             # every timing the tables use, together

   A row added to a table whose runs have started is timed with ``--add-missing``: only the timings the
   file lacks, beside their table's budget timing, stored scaled to its committed step (the ratio comes
   from one sitting; no committed timing, so no run already made, changes)::

       .venv/bin/python bench/evidence.py calibrate tuning2 --add-missing

2. Run the tables, in any number of sittings; the machine may do other work meanwhile, because the
   steps of a row are fixed by the committed step times, never by the run's own timing::

       .venv/bin/python bench/evidence.py run ablation          # 5 rows x 3 seeds, about 3 h
       .venv/bin/python bench/evidence.py run noise             # 4 rows x 2 seeds, about 1.5 h
       .venv/bin/python bench/evidence.py run cross_style       # 2 rows x 3 seeds, about 1.1 h
       .venv/bin/python bench/evidence.py run ablation --only "+ AMF (emoji_demo)" --seeds 45 46  # more seeds

   Each run prints what happened to it (``ran``, ``resumed``, ``skipped``: it has a record, ``busy``:
   another process holds it); stopping a sitting at any moment loses at most 50 steps of one run.

3. Build the tables from whatever records exist (missing seeds are shown as missing)::

       .venv/bin/python bench/evidence.py table                 # all tables (or name them)

Selection mode, for choosing settings without touching the test concepts: ``--split val`` trains on
``train_names.json`` (no val concepts) and scores ``val_google.json`` / ``val_twitter.json``; its records
and tables are ``<table>_val`` (``run ablation --split val``, then ``table ablation --split val``).
``list`` prints every table's rows, overrides, timings and planned steps. A check of the whole path, a few
steps a run (about a minute each with the model build and both galleries; records outside ``bench/results``)::

    .venv/bin/python bench/evidence.py run cross_style --steps 3 --seeds 1 --results /tmp/ev --logs /tmp/ev/logs
    .venv/bin/python bench/evidence.py table cross_style --results /tmp/ev

Budget: a row trains ``round(budget / its median step)`` steps; the budget defaults to the demo's,
``trainer.max_steps`` of ``experiment=emoji_demo`` (450) times the calibrated step of the demo row, so a
part that costs time pays for it in steps (``--budget-seconds`` sets another). The steps of a run are
fixed in its ``plan.json`` when it first starts, so a later recalibration never changes a half-done run.
Seeds vary the top-level ``seed`` (model init, data order, crops); ``data.noise_seed`` stays 0, so every
seed of the noise table sees the same injected noise. Rows whose step does the same work share a timing
(the noise rows time as the demo with AMF on or off, the one-vendor rows as the demo).

Files: records ``bench/results/evidence/<table>/<row>__seed<k>.json`` (written atomically when a run has
been scored), tables ``bench/results/evidence/<table>.md``, run folders
``logs/bench/evidence/<table>/<row>__seed<k>/`` (``plan.json``: its steps and a fingerprint of the code it
started on, so that no sitting resumes it on other code; ``sittings.json``: the wall time of each sitting;
``checkpoints/last.ckpt`` every 50 steps until the record is written, then removed unless
``--keep-checkpoints``: 0.45 GB a run). A table is a list of rows, each a name and its Hydra overrides on the
table's base (``TABLES`` below): a new table, e.g. tuning candidates to compare with ``--split val``, is one
more entry.
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from measure import markdown_table
from omegaconf import DictConfig, open_dict
from runs import amf_stats, compose_run, score_galleries, slug

from cots.callbacks import StepTimer
from cots.config_checks import ConfigError, check_config
from cots.data.manifest import ManifestError
from cots.metrics.retrieval import chance_table
from cots.train import train

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "evidence"
LOGS = ROOT / "logs" / "bench" / "evidence"
CHECKPOINT_EVERY = 50  # steps between crash-recovery saves of last.ckpt (about 75 s of the demo)
BUDGET_TIMING = "demo"  # the default budget: the demo's steps at this timing's calibrated step
BUDGET_EXPERIMENT = "emoji_demo"


# -- what a table is --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One setting of a table.

    ``timing`` names the entry of step_times.json whose median step sets the row's steps (rows whose
    step does the same work share one; None: the row's own, ``<table>/<slug>``); ``vs`` the row it is
    compared with in the Δ columns; ``vendor`` restricts training to that vendor's images.
    ``step_statistic``: ``median`` of the calibrated steps, or ``mean`` for a row whose step time
    follows what its batch holds (length buckets: a batch costs what its longest caption costs), where
    steps x median would under-count the long batches and overrun the budget.
    """

    name: str
    overrides: tuple[str, ...] = ()
    timing: str | None = None
    vs: str | None = None
    vendor: str | None = None
    step_statistic: str = "median"

    def __post_init__(self) -> None:
        if self.step_statistic not in ("median", "mean"):
            raise ValueError(
                f"row {self.name!r}: step_statistic must be 'median' or 'mean', got {self.step_statistic!r}"
            )

    @property
    def slug(self) -> str:
        return slug(self.name)


@dataclass(frozen=True)
class Split:
    """What a run trains on (a manifest in the data folder; None: the experiment's own) and is scored on."""

    train: str | None
    galleries: dict[str, str]


EMOJI_SPLITS = {
    # trainval_names.json (the demo's), scored on the held-out test concepts
    "test": Split(None, {"google": "test_google.json", "twitter": "test_twitter.json"}),
    # selection: no val concepts in training, scored on them
    "val": Split("train_names.json", {"google": "val_google.json", "twitter": "val_twitter.json"}),
}


@dataclass(frozen=True)
class Table:
    """Rows run on a common base of overrides, for ``seeds``; ``reference`` shows another table's row."""

    name: str
    title: str
    rows: tuple[Row, ...]
    seeds: tuple[int, ...] = (42, 43, 44)
    base: tuple[str, ...] = (f"experiment={BUDGET_EXPERIMENT}",)
    splits: dict[str, Split] = field(default_factory=lambda: dict(EMOJI_SPLITS))
    reference: tuple[str, str] | None = None  # (table, row) shown below the rows, from its own records
    notes: str = ""
    # the timing whose median step x the demo's steps is the budget: a table calibrated in its own sitting
    # names its own demo row, so that its budget and its rows' steps come from the same sitting
    budget_timing: str = BUDGET_TIMING
    budget_seconds: float | None = None  # a fixed budget instead (``--budget-seconds`` still wins)

    def row(self, name: str) -> Row:
        for row in self.rows:
            if name in (row.name, row.slug):
                return row
        raise KeyError(f"table {self.name} has no row {name!r}; rows: {[r.name for r in self.rows]}")

    def timing(self, row: Row) -> str:
        return row.timing or f"{self.name}/{row.slug}"

    def folder(self, split: str) -> str:
        """Records and run folders of a split: ``<table>`` for test, ``<table>_<split>`` otherwise."""
        return self.name if split == "test" else f"{self.name}_{split}"


DEMO = "+ AMF (emoji_demo)"
CMLM = ("data.text_mask={mask_prob:0.15,replace_prob:0.8,random_prob:0.1}", "objective.cmlm.enabled=true")
TABLES: dict[str, Table] = {
    table.name: table
    for table in (
        Table(
            "ablation",
            "Each part of the objective at the demo's wall-clock budget",
            (
                Row("contrastive only", ("objective=contrastive_only",), timing="contrastive"),
                Row(DEMO, (), timing="demo", vs="contrastive only"),
                Row("+ AMF + L_task", ("objective.task.enabled=true",), timing="demo_task", vs=DEMO),
                Row(  # emoji_mvlm's token level; its L_task off, as in the demo
                    "+ AMF + CMVM/CMLM (emoji_mvlm)",
                    ("experiment=emoji_mvlm", "objective.task.enabled=false"),
                    timing="mvlm",
                    vs=DEMO,
                ),
                Row(
                    "full: + AMF + L_task + CMVM/CMLM",
                    ("experiment=emoji_mvlm", "objective.task.enabled=true"),
                    timing="full",
                    vs=DEMO,
                ),
            ),
            notes="Rows are the demo (L_inst + AMF) with one part added or removed; Δ is against the row "
            "named in `vs`. CMVM/CMLM is emoji_mvlm's setting: 8 masked pairs per batch at weight 0.2.",
        ),
        Table(
            "noise",
            "Injected caption swaps: AMF on and off, and what it filters",
            tuple(
                Row(
                    f"p={p} AMF {state}",
                    (f"data.noise_rate={p}", f"objective.amf.enabled={str(on).lower()}"),
                    timing="demo" if on else "contrastive",
                    vs=f"p={p} AMF off" if on else None,
                )
                for p in (0.2, 0.4)
                for state, on in (("off", False), ("on", True))
            ),
            seeds=(42, 43),
            base=(f"experiment={BUDGET_EXPERIMENT}", "data.noise_seed=0"),
            reference=("ablation", DEMO),
            notes="`data.noise_rate=p` gives a fraction p of the training pairs another pair's caption (the same "
            "pairs for every seed: `data.noise_seed=0`). AMF precision: the noisy share of what it filtered; "
            "recall: the filtered share of the noisy pairs; both over the pairs after its warm-up (4096 "
            "pairs, its similarity queue). p=0 is the ablation's first two rows.",
        ),
        Table(
            "cross_style",
            "Cross-style transfer: trained on one vendor's images, scored on both vendors' held-out concepts",
            (
                Row("Google only", vendor="google", timing="demo"),
                Row("Twitter only", vendor="twitter", timing="demo"),
            ),
            reference=("ablation", DEMO),
            notes="A one-vendor row trains on the chosen train manifest filtered to that vendor's images (half "
            "the pairs, so about twice the epochs in the same steps); its own vendor's gallery is in-style, "
            "the other cross-style; `in − cross` is their difference within each run. The reference row "
            "trains on both vendors.",
        ),
        Table(
            "tuning",
            "Candidate settings for the demo, chosen on the val concepts (`--split val`)",
            (
                Row(DEMO, (), timing="tuning/demo"),
                Row("contrastive only", ("objective=contrastive_only",), timing="tuning/contrastive", vs=DEMO),
                Row(
                    "contrastive, batch 32",
                    (
                        "objective=contrastive_only",
                        "data.batch_size=32",
                        "module.momentum=0.995",  # the EMA horizon of 0.99 at batch 64, in pairs
                        "optim.scheduler.warmup_steps=80",
                    ),
                    timing="tuning/batch32",
                    vs="contrastive only",
                ),
                Row(  # 16 patches of 16 px instead of 64 of 8: a quarter of the ViT's tokens buys steps
                    "contrastive, patch 16",
                    ("objective=contrastive_only", "model.encoder.image_tower.patch_size=16"),
                    timing="tuning/patch16",
                    vs="contrastive only",
                ),
                Row(
                    "contrastive, text tower lr 0.2x",
                    ("objective=contrastive_only", "+optim.lr_scale.encoder.text_tower=0.2"),
                    timing="tuning/contrastive",
                    vs="contrastive only",
                ),
                Row(  # the open_clip reference's weight decay (bench/openclip_reference.py); the demo has 0.05
                    "contrastive, weight decay 0.2",
                    ("objective=contrastive_only", "optim.optimizer.weight_decay=0.2"),
                    timing="tuning/contrastive",
                    vs="contrastive only",
                ),
                # (not flips: emoji captions say left and right, "backhand index pointing left")
                Row(
                    "contrastive, queue 4096",
                    ("objective=contrastive_only", "model.queue_size=4096"),
                    timing="tuning/contrastive",
                    vs="contrastive only",
                ),
            ),
            budget_timing="tuning/demo",
            budget_seconds=283.0,
            seeds=(42,),
            notes="Selection runs: `run tuning --split val` trains on `train_names.json` and "
            "scores the val concepts (324 images per vendor), never the test concepts. 283 s is the open_clip "
            "reference's training on this machine, 230 steps at its median 1.235 s (`python "
            "bench/openclip_reference.py`: 5.07 min of wall time with its data loading and first steps); each "
            "row trains that many seconds at its own median step, calibrated together in one sitting "
            "(`calibrate tuning vilem`). Compiled towers (`module.compile={}`) were calibrated and left out: "
            "864 ms a step against 940 eager, but 109 s to compile (`startup_s`, the cold round's excess over "
            "its median steps), so 201 steps against 296 in this budget.",
        ),
        Table(
            "tuning2",
            "Round two for the demo, in fp32 on a CPU without native bf16, at the open_clip reference's budget there",
            (
                Row(DEMO, ("trainer.precision=32-true",), timing="tuning2/demo"),
                Row(  # round one's two leaders together: +8.1, +6.9 on val Google against a 3-seed mean
                    # (-2.2, -3.4 seed against seed)
                    "+ AMF, weight decay 0.2, queue 4096",
                    ("trainer.precision=32-true", "optim.optimizer.weight_decay=0.2", "model.queue_size=4096"),
                    timing="tuning2/demo",  # a 4096-key queue adds 64 x 4096 logits to a step of two towers
                    vs=DEMO,
                ),
                Row(  # 6 x 6 patches of 8 px instead of 8 x 8: the ViT's tokens are ~2/3 of a step's FLOPs
                    "+ AMF, images 48 px",
                    ("trainer.precision=32-true", "data.image_size=48"),
                    timing="tuning2/img48",
                    vs=DEMO,
                ),
                Row(  # 142 of the 324 val captions hold a word piece no caption of train_names.json has: fine-tuned
                    # word vectors drift from those of the pieces never seen; kept as pretrained, they stay comparable
                    "+ AMF, text tower's embeddings frozen",
                    ("trainer.precision=32-true", "model.encoder.text_tower.trainable_layers=6"),
                    timing="tuning2/demo",  # no more work than the demo's step (less: no embedding gradients)
                    vs=DEMO,
                ),
                Row(  # 4 x 4 patches of 8 px: 48 px (+28% steps) gained on val; does coarser still pay in steps?
                    "+ AMF, images 32 px",
                    ("trainer.precision=32-true", "data.image_size=32"),
                    timing="tuning2/img32",
                    vs=DEMO,
                ),
                Row(  # text lr 0.2x cost 17 rsum in round one: does a faster schedule pay within 471 steps?
                    "+ AMF, images 48 px, lr 1e-3",
                    ("trainer.precision=32-true", "data.image_size=48", "optim.optimizer.lr=1.0e-3"),
                    timing="tuning2/img48",  # the same step as 48 px at lr 5e-4
                    vs="+ AMF, images 48 px",
                ),
                Row(  # lr 1e-3 for both towers cost 21.9 at 48 px: is it the pretrained text tower that cannot take
                    # it? Twice the rate for the image tower trained from scratch (and the heads), the text tower's kept
                    "+ AMF, images 32 px, image tower lr 1e-3",
                    (
                        "trainer.precision=32-true",
                        "data.image_size=32",
                        "optim.optimizer.lr=1.0e-3",
                        "+optim.lr_scale.encoder.text_tower=0.5",
                    ),
                    timing="tuning2/img32",  # the same step as 32 px at lr 5e-4
                    vs="+ AMF, images 32 px",
                ),
                Row(  # at 32 px the text tower is ~2/3 of a step's FLOPs, and a random batch of 64 names (7.6
                    # tokens on average) pads to 18: batches of similar length pad to 8.2, for more steps
                    "+ AMF, images 32 px, length buckets 16",
                    ("trainer.precision=32-true", "data.image_size=32", "data.length_buckets=16"),
                    timing="tuning2/img32_buckets16",
                    vs="+ AMF, images 32 px",
                    step_statistic="mean",  # a batch's step follows its longest caption
                ),
                Row(  # at 32 px the text tower is ~2/3 of a step: no gradients below its top 3 layers buys steps
                    # (the frozen embeddings were level with the demo on val, round three)
                    "+ AMF, images 32 px, text tower's top 3 layers trained",
                    ("trainer.precision=32-true", "data.image_size=32", "model.encoder.text_tower.trainable_layers=3"),
                    timing="tuning2/img32_text_top3",
                    vs="+ AMF, images 32 px",
                ),
                Row(  # batch 128 -> 64 bought 1.76x the updates and +15 rsum at one budget (emoji_demo.yaml); 32 lost
                    # at 64 px in round one (one seed): at 32 px, where a step buys more, does it pay? Momentum and
                    # warm-up keep their horizons in pairs; the negatives come from the queue
                    "+ AMF, images 32 px, batch 32",
                    (
                        "trainer.precision=32-true",
                        "data.image_size=32",
                        "data.batch_size=32",
                        "module.momentum=0.995",
                        "optim.scheduler.warmup_steps=80",
                    ),
                    timing="tuning2/img32_batch32",
                    vs="+ AMF, images 32 px",
                ),
                Row(  # at 64 px a crop of 0.7 cut emoji apart and 0.9 was kept (emoji_demo.yaml); at 32 px a 4 x 4 grid
                    # of patches sees every drawing whole at test: train on the whole drawing too, at the same step
                    "+ AMF, images 32 px, no crop",
                    ("trainer.precision=32-true", "data.image_size=32", "data.train_transform.scale=[1.0,1.0]"),
                    timing="tuning2/img32",  # the same step as 32 px with its crop
                    vs="+ AMF, images 32 px",
                ),
                Row(  # AMF drops ~8 % of these clean pairs: -5.9 +- 1.5 on test (ablation, not for choosing),
                    # +1.6 +- 3.0 for turning it off on val at 64 px (round one); at 32 px's 688 steps, val decides
                    "contrastive only, images 32 px",
                    ("trainer.precision=32-true", "data.image_size=32", "objective=contrastive_only"),
                    timing="tuning2/img32",  # AMF's fit is under 1 % of a step (tuning/contrastive against tuning/demo)
                    vs="+ AMF, images 32 px",
                ),
            ),
            budget_timing="tuning2/demo",
            budget_seconds=1101.0,
            seeds=(42,),
            notes="Round one (`tuning_val.md`) ran in bf16 on a CPU with AVX512-BF16; on a CPU without it (AVX2 only) "
            "bf16 is emulated and 10x slower, so this round trains in fp32 and measures its budget on that CPU: "
            "the open_clip reference (`python bench/openclip_reference.py --precision fp32 --steps 25`) took a "
            "median 4.79 s a step there, 230 steps = 1101 s. Its demo row is round one's demo in fp32, so every "
            "Δ compares runs of one precision on one CPU. Chosen on val (`run tuning2 --split val`, seed 42: two "
            "settings, nine over both rounds), the winner then scored on test once, seeds 42-44 (`run tuning2 "
            "--only '+ AMF, weight decay 0.2, queue 4096' --seeds 42 43 44`; `table tuning2 --seeds 42 43 44`). "
            "That pick compared one seed with a three-seed mean (see Δ). Round three (images 48 px, frozen "
            "embeddings) screens on val with the demo's seeds, seed against seed (`run tuning2 --split val "
            "--seeds 42 43 44`); round four (images 32 px against the demo, seeds 42-44, then scored on test: "
            "`run tuning2 --only '+ AMF, images 32 px' --seeds 42 43 44`; 48 px at lr 1e-3 against 48 px, seed "
            "42); round five, 32 px with the image tower at lr 1e-3 against 32 px (stopped after two seeds, both "
            "below on Google: -18.8, -12.6); round six, 32 px with length buckets of 16 (`data.length_buckets=16`: "
            "captions of similar length share a batch, which pads to 8.2 tokens instead of 17.9, "
            "`bench/results/length_buckets.md`) against 32 px (withdrawn after two seeds: 1105 steps against 688, "
            "but -55.0 and -34.6 on Google, -41.1 and -12.9 on Twitter); round seven, 32 px with the text tower's "
            "top 3 layers trained (no gradients below them: 1514 ms a step beside the demo's 3552, stored scaled, "
            "1270 ms: 864 steps) against 32 px (closed after seeds 42-44 on val, +4.9 ± 4.9 Google, -4.8 ± 6.3 "
            "Twitter: not scored on test); round eight, 32 px at batch 32 (momentum 0.995, 80 warm-up steps: the "
            "demo's horizons in pairs; 1182 ms beside the demo's 3895, stored scaled 904 ms: 1210 steps after its "
            "6.9 s start-up) against 32 px "
            "(stopped after two seeds on val, both below on Google: -17.6, -6.2); round nine, 32 px without the "
            "random crop (`data.train_transform.scale=[1.0,1.0]`: trained on the whole drawing, as the test shows it;"
            " 32 px's step) against 32 px (stopped after seed 42: -14.5 Google, +4.0 Twitter, where 300 on test "
            "needs about +20 on val); round ten, 32 px without AMF (`objective=contrastive_only`, 32 px's step: "
            "AMF's fit is under 1 % of a step) against 32 px (closed after seeds 42-44 on val: -0.5 ± 2.5 Google, "
            "+10.0 ± 4.0 Twitter; not scored on test); twenty settings over ten rounds. "
            "Timed beside round seven and not run: "
            "the text in 2 length groups inside the tower (`model.encoder.text_tower.length_groups=2`, the same "
            "features on random batches), 1740 ms against the demo's 3552 (1446 ms mean scaled: 758 steps, 1.10x "
            "32 px's 688), a gain in steps too small to tell from the seed spread. "
            "Images 48 px was "
            "timed at 2317 ms in a sitting where the demo re-measured 3077 ms, and stored as measured (471 steps; "
            "scaled to the demo's committed 2980 ms it would have had 487); images 32 px at 1776 ms beside the "
            "demo's 3316 ms (`calibrate tuning2 --step-times <tmp>`: the ratio between rows comes from one sitting),"
            " stored scaled to the demo's committed step (1596 ms: 688 steps), the step `calibrate --add-missing` "
            "now does; length buckets at 1164 ms median, 1201 ms mean beside the demo's 3599 ms (`calibrate tuning2 "
            "--add-missing --calibrate-steps 24`, each round on another seed's batches), stored scaled (994 ms mean:"
            " 1105 steps; its steps are planned from the mean, because a batch's step follows its longest caption "
            "and the median would under-count the long ones). No re-measure replaced the demo's timing, so its later"
            " seeds train its first seeds' 368 steps. The frozen-embeddings row trains the demo's steps (its step "
            "does less).",
        ),
        Table(
            "vilem",
            "ViLEM's error generator: the CMLM head reading the text only (default) or fused with the image",
            (
                Row("+ CMLM", (*CMLM,), timing="vilem/cmlm"),
                Row("+ CMLM + ViLEM", (*CMLM, "objective.vilem.enabled=true"), timing="vilem/vilem", vs="+ CMLM"),
                Row(
                    "+ CMLM + ViLEM, image-conditioned generator",
                    (*CMLM, "objective.vilem.enabled=true", "objective.vilem.generator=cmlm_image"),
                    timing="vilem/vilem",
                    vs="+ CMLM + ViLEM",
                ),
            ),
            seeds=(42, 43),
            base=(f"experiment={BUDGET_EXPERIMENT}", "objective=contrastive_only"),
            budget_timing="tuning/demo",
            notes="Contrastive only + CMLM (ViLEM draws its errors from the CMLM head, so its baseline trains "
            "CMLM too), with ViLEM's error modeling on top, for each generator. Detection accuracy is per token "
            "on seeded edits of the held-out captions, against answering 'not replaced' everywhere (majority); "
            "correction accuracy is at the replaced tokens. Calibrated with the tuning table (one sitting).",
        ),
    )
}


# -- crash recovery (one place: where the checkpoint callbacks change, only this changes) -----------------
def enable_crash_recovery(cfg: DictConfig, every_n_steps: int) -> None:
    """Keep ``<run>/checkpoints/last.ckpt`` at most ``every_n_steps`` optimizer steps old.

    With ``callbacks.recovery_checkpoint`` (``cots.callbacks.RecoveryCheckpoint``) its ``every_n_steps``;
    in a config without it, Lightning's ``ModelCheckpoint`` with ``every_n_train_steps`` and ``save_last``.
    """
    with open_dict(cfg):
        if cfg.callbacks.get("recovery_checkpoint") is not None:
            cfg.callbacks.recovery_checkpoint.every_n_steps = every_n_steps
        else:
            cfg.callbacks.model_checkpoint.every_n_train_steps = every_n_steps
            cfg.callbacks.model_checkpoint.save_last = True


def disable_checkpoints(cfg: DictConfig) -> None:
    """No checkpoint at all (calibration runs): nothing is resumed from them, and a save is not a step."""
    with open_dict(cfg):
        for name in ("model_checkpoint", "recovery_checkpoint"):
            cfg.callbacks.pop(name, None)
        cfg.trainer.enable_checkpointing = False


def last_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint an interrupted run resumes from, None when it has none."""
    path = run_dir / "checkpoints" / "last.ckpt"
    return path if path.is_file() else None


class SittingClock(L.Callback):
    """Wall time of each sitting of a run (one process's share of its training), kept in a JSON list.

    Written after every training step, so the time of a sitting that gets killed is kept too: the record
    reports the minutes actually spent, summed over sittings, beside the budget.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.sittings: list[dict] = []
        self._start = 0.0

    def on_train_start(self, trainer, module) -> None:
        self.sittings = read_json(self.path, [])
        self.sittings.append(
            {
                "started": now(),
                "host": platform.node(),
                "start_step": int(trainer.global_step),
                "end_step": int(trainer.global_step),
                "seconds": 0.0,
            }
        )
        self._start = time.perf_counter()
        self._save(trainer)

    def _save(self, trainer) -> None:
        if not self.sittings or not trainer.is_global_zero:
            return
        self.sittings[-1].update(end_step=int(trainer.global_step), seconds=time.perf_counter() - self._start)
        write_json_atomic(self.path, self.sittings)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._save(trainer)

    def on_train_end(self, trainer, module) -> None:
        self._save(trainer)

    def on_exception(self, trainer, module, exception) -> None:
        self._save(trainer)


# -- small helpers ---------------------------------------------------------------------------------------
def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.is_file() else default


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temporary file in the same folder and rename it: a reader sees the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def git_state() -> dict:
    """The commit, and the tracked files that differ from it (the runs measure the working tree)."""

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    commit, changed = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit.strip() if commit else None,
        "modified": [line[3:] for line in changed.splitlines() if line.strip()] if changed else [],
    }


CODE_FOLDERS = ("cots", "conf", "tokenizers/cots_dvae")  # what a run's numbers depend on (bench/ and docs do not)


def code_fingerprint() -> str:
    """sha256 over the tracked files of :data:`CODE_FOLDERS` as they are on disk (uncommitted changes included).

    A run resumed on other code than it started with would be half one version and half another.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", *CODE_FOLDERS], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    digest = hashlib.sha256()
    for name in sorted(filter(None, listed)):
        file = ROOT / name.decode()
        digest.update(name + b"\0" + (file.read_bytes() if file.is_file() else b"<deleted>") + b"\0")
    return digest.hexdigest()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def vendor_of(image: str) -> str:
    """The vendor folder of an image path: 'images/google/1f600.png' -> 'google'."""
    parts = Path(image).parts
    return parts[-2] if len(parts) >= 2 else ""


def vendor_manifest(source: Path, vendor: str, out: Path, image_root: str | None = None) -> int:
    """Write the entries of ``source`` whose image lies in ``vendor``'s folder to ``out``; returns how many.

    The image paths become absolute (resolved against ``image_root``, default the source manifest's
    folder), so the filtered manifest can live in the run folder, away from the images.
    """
    entries = json.loads(Path(source).read_text())
    root = Path(image_root) if image_root else Path(source).resolve().parent
    kept = [
        {**entry, "image": str((root / entry["image"]).resolve())}
        for entry in entries
        if vendor_of(entry["image"]) == vendor
    ]
    if not kept:
        found = sorted({vendor_of(entry["image"]) for entry in entries})
        raise ManifestError(f"{source}: no image in a '{vendor}' folder (image folders there: {found})")
    write_json_atomic(Path(out), kept)
    return len(kept)


# -- configs ---------------------------------------------------------------------------------------------
def row_overrides(table: Table, row: Row, seed: int, steps: int, extra: Sequence[str] = ()) -> list[str]:
    """The table's base, the row's own overrides (a row's ``experiment=`` replaces the base's), seed, steps."""
    base = list(table.base)
    if any(o.startswith("experiment=") for o in row.overrides):
        base = [o for o in base if not o.startswith("experiment=")]
    return [*base, *row.overrides, *extra, f"seed={seed}", f"trainer.max_steps={steps}", "test=false", "report=false"]


def build_cfg(table: Table, row: Row, split: str, overrides: list[str], run_dir: Path) -> DictConfig:
    """The run's config: ``overrides`` composed, then the split's train manifest and the row's vendor filter.

    A vendor row's manifest is written to ``<run_dir>/train_<vendor>.json`` (never into the data folder).
    """
    cfg = compose_run(overrides, run_dir)
    train_manifest = Path(cfg.data.train_manifest)
    if table.splits[split].train:
        train_manifest = data_folder(cfg) / table.splits[split].train
    if row.vendor:
        out = run_dir / f"train_{row.vendor}.json"
        vendor_manifest(train_manifest, row.vendor, out, cfg.data.get("image_root"))
        train_manifest = out
    with open_dict(cfg):
        cfg.data.train_manifest = str(train_manifest)
    return cfg


def data_folder(cfg: DictConfig) -> Path:
    """The folder of the experiment's galleries (the emoji set's, for the emoji experiments)."""
    return Path(cfg.data.val_manifest).parent


def galleries(table: Table, split: str, cfg: DictConfig) -> dict[str, str]:
    return {name: str(data_folder(cfg) / file) for name, file in table.splits[split].galleries.items()}


def preflight(cfg: DictConfig, gallery_files: Iterable[str]) -> list[str]:
    """What would stop the run: config errors and missing files, found before anything trains."""
    try:
        check_config(cfg)
    except ConfigError as err:
        return [str(err)]
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    problems = datamodule.missing_files()
    problems += [f"gallery not found: {path}" for path in gallery_files if not Path(path).is_file()]
    return problems


# -- calibration -----------------------------------------------------------------------------------------
def timing_rows(tables: Iterable[Table]) -> dict[str, tuple[Table, Row]]:
    """Each timing the given tables use, with the row that defines it (its first row in ``TABLES`` order)."""
    wanted = {t.timing(r) for t in tables for r in t.rows}
    defining: dict[str, tuple[Table, Row]] = {}
    for table in [*TABLES.values(), *tables]:
        for row in table.rows:
            key = table.timing(row)
            if key in wanted and key not in defining:
                defining[key] = (table, row)
    return defining


def _timed_segment(table: Table, row: Row, overrides: list[str], run_dir: Path) -> list[float]:
    """Step times (s) of every step of one short untested run of ``row``."""
    cfg = build_cfg(table, row, "test", overrides, run_dir)
    disable_checkpoints(cfg)
    _, objects = train(cfg)
    timer = next(cb for cb in objects["trainer"].callbacks if isinstance(cb, StepTimer))
    timed = list(timer.times)
    del objects
    gc.collect()
    return timed


def calibrate(
    tables: Sequence[Table],
    step_times_path: Path,
    logs: Path,
    steps: int = 14,
    warmup: int = 4,
    rounds: int = 3,
    extra: Sequence[str] = (),
    add_missing: bool = False,
) -> dict:
    """Median step time of every timing the tables use, all measured together, written to ``step_times_path``.

    Only the ratios between rows decide their steps (steps = the demo's steps x its step time / the
    row's), and this 2-core virtual machine's speed drifts by up to 30% over minutes (the demo measured
    0.96 s a step, then 1.26 s twenty minutes later on an idle machine). So the rows are timed in
    interleaved rounds, each round a short run of every row (``steps`` steps, the first ``warmup`` left
    out), after one untimed run (the first run of a process is slower); a row's figure is the median
    (and the mean) of its timed steps over all rounds, and the per-round medians are kept to show the
    drift. Round r trains seed ``seeds[0] + r``, so that a row whose step depends on its batches
    (length buckets) is timed on other batches each round. Every timing the tables use is measured
    again each time, so the ratios always come from one sitting.

    ``add_missing``: time only the timings ``step_times_path`` lacks, each beside its table's budget
    timing, and store them scaled to that timing's committed step (``merge_timings``), so that a row
    added to a half-run table gets its steps without changing the steps of the rows already run.
    """
    data = read_json(step_times_path, {"timings": {}})
    wanted = timing_rows(tables)
    references: dict[str, str] = {}  # missing timing -> the committed timing it is scaled to
    if add_missing:
        references = {key: table.budget_timing for key, (table, _) in wanted.items() if key not in data["timings"]}
        unscalable = sorted({ref for ref in references.values() if ref not in data["timings"]})
        if unscalable:
            raise SystemExit(f"no committed {unscalable} timing to scale to: run `calibrate` without --add-missing")
        if not references:
            print(f"every timing of {[t.name for t in tables]} is in {step_times_path}: nothing to time")
            return data
        keep = {*references, *references.values()}
        wanted = {key: pair for key, pair in timing_rows([*TABLES.values(), *tables]).items() if key in keep}

    def overrides_of(table: Table, row: Row, round_index: int) -> list[str]:
        seed = table.seeds[0] + round_index
        return [*row_overrides(table, row, seed, steps, extra), f"callbacks.step_timer.warmup={warmup}"]

    todo = [
        (key, table, row, overrides_of(table, row, 0), logs / "calibrate" / slug(key))
        for key, (table, row) in wanted.items()
    ]
    problems = [
        f"{key}: {p}"
        for key, table, row, overrides, run_dir in todo
        for p in preflight(build_cfg(table, row, "test", overrides, run_dir), ())
    ]
    if problems:
        raise SystemExit("not calibrating; fix these first:\n  " + "\n  ".join(problems))
    key, table, row, overrides, run_dir = todo[0]
    print(f"\n=== warm-up ({key}, not timed): {steps} steps", flush=True)
    _timed_segment(table, row, overrides, run_dir.with_name(run_dir.name + "_warmup"))
    full: dict[str, list[list[float]]] = {key: [] for key, *_ in todo}  # every step of each round
    loads = []
    for round_index in range(rounds):
        for key, table, row, _, run_dir in todo:
            loads.append(machine()["loadavg"])
            print(f"\n=== calibrate {key} ({table.name} / {row.name}), round {round_index + 1}/{rounds}", flush=True)
            full[key].append(_timed_segment(table, row, overrides_of(table, row, round_index), run_dir))
            print(f"{key}: round median {1000 * statistics.median(full[key][-1][warmup:]):.1f} ms", flush=True)
    date, state, where = now(), git_state(), machine()
    measured: dict[str, dict] = {}
    for key, table, row, overrides, _ in todo:
        rounds_timed = [segment[warmup:] for segment in full[key]]  # the first steps of each round left out
        timed = [t for segment in rounds_timed for t in segment]
        deciles = statistics.quantiles(timed, n=10)
        median = statistics.median(timed)
        per_step = statistics.fmean(timed) if row.step_statistic == "mean" else median  # what plans the steps
        measured[key] = {
            "median_ms": 1000 * median,
            "mean_ms": 1000 * statistics.fmean(timed),
            # one-time work a run pays besides its steps (compilation, first-use allocations): the largest
            # excess of a round's steps over the step that plans the row's steps, the cold first round included
            "startup_s": max(sum(segment) - len(segment) * per_step for segment in full[key]),
            "p10_ms": 1000 * deciles[0],
            "p90_ms": 1000 * deciles[-1],
            "round_medians_ms": [1000 * statistics.median(segment) for segment in rounds_timed],
            "timed_steps": len(timed),
            "left_out_per_round": warmup,
            "rounds": rounds,
            "load_averages_during": loads,  # of this sitting: each calibration keeps its own
            "table": table.name,
            "row": row.name,
            "overrides": overrides,  # of round 1; round r trains seed + r - 1
            "date": date,
            **state,
            **where,
        }
        print(
            f"{key}: median {measured[key]['median_ms']:.1f} ms "
            f"(rounds {', '.join(f'{v:.0f}' for v in measured[key]['round_medians_ms'])})"
        )
    data = merge_timings(data, measured, references)
    write_json_atomic(step_times_path, data)
    print(f"wrote {step_times_path}")
    return data


SCALED_FIELDS = ("median_ms", "mean_ms", "p10_ms", "p90_ms", "round_medians_ms", "startup_s")


def merge_timings(stored: dict, measured: dict[str, dict], references: dict[str, str] | None = None) -> dict:
    """``stored`` (a ``step_times.json``) with the ``measured`` timings of one sitting merged in.

    Without ``references`` every measured timing replaces the stored one. With them (missing timing ->
    reference timing, both measured in this sitting, the reference also stored), only the missing
    timings are added, each scaled by the reference's stored / re-measured median, so the ratio
    between the two comes from one sitting while the reference and the steps of its runs stay as
    committed. An added entry keeps its own figures under ``measured``, the factor under ``scaled_by``
    and the re-measures of the timings it was measured beside (not stored) under ``calibrated_with``.
    """
    merged = {**stored, "timings": dict(stored.get("timings", {}))}
    if not references:
        merged["timings"].update(measured)
        return merged
    for key, reference in references.items():
        if key in merged["timings"]:
            raise ValueError(f"{key} is already stored: only missing timings are added")
        factor = merged["timings"][reference]["median_ms"] / measured[reference]["median_ms"]
        entry = dict(measured[key])
        entry["measured"] = {name: entry[name] for name in SCALED_FIELDS if name in entry}
        for name, value in entry["measured"].items():
            entry[name] = [v * factor for v in value] if isinstance(value, list) else value * factor
        entry["scaled_by"] = {
            "factor": factor,
            "reference": reference,
            "note": f"{key} measured beside {reference}, scaled by {reference}'s stored / re-measured median, so "
            f"the ratio between them comes from one sitting and {reference}'s committed step stays",
        }
        entry["calibrated_with"] = {
            other: {"median_ms": timing["median_ms"], "round_medians_ms": timing["round_medians_ms"]}
            for other, timing in measured.items()
            if other not in references
        }
        merged["timings"][key] = entry
    return merged


def default_budget_seconds(step_times: dict, key: str = BUDGET_TIMING) -> float:
    """The demo's budget: ``trainer.max_steps`` of the demo experiment times the calibrated step of ``key``."""
    timing = step_times.get("timings", {}).get(key)
    if timing is None:
        raise SystemExit(f"no '{key}' timing in step_times.json: run `bench/evidence.py calibrate` first")
    demo_steps = compose_run([f"experiment={BUDGET_EXPERIMENT}"], LOGS).trainer.max_steps
    return demo_steps * timing["median_ms"] / 1000


def planned_steps(budget_seconds: float, median_ms: float, startup_s: float = 0.0) -> int:
    """Steps that fit the budget at this median step (at least one), after ``startup_s`` of one-time work
    (``torch.compile``: the calibrated excess of a cold first round over its median steps)."""
    return max(1, round((budget_seconds - startup_s) / (median_ms / 1000)))


# -- runs ------------------------------------------------------------------------------------------------
def record_path(results: Path, table: Table, split: str, row: Row, seed: int) -> Path:
    return results / table.folder(split) / f"{row.slug}__seed{seed}.json"


@dataclass
class Budget:
    """How a run's steps are chosen: fixed ``steps`` (checks), or ``seconds`` at each timing's median step."""

    seconds: float | None = None
    step_times: dict | None = None
    steps: int | None = None

    def plan(self, table: Table, row: Row) -> dict:
        if self.steps is not None:
            return {"steps": self.steps, "budget_seconds": None, "timing": None, "calibrated_step_ms": None}
        key = table.timing(row)
        timing = (self.step_times or {}).get("timings", {}).get(key)
        if timing is None:
            raise SystemExit(
                f"no timing '{key}' (row {row.name!r}) in step_times.json: run "
                f"`bench/evidence.py calibrate {table.name}` on a quiet machine first"
            )
        step_ms = timing.get(f"{row.step_statistic}_ms")
        if step_ms is None:
            raise SystemExit(
                f"timing '{key}' has no {row.step_statistic} step (row {row.name!r} needs it): calibrated before "
                f"calibrate stored it; time it again"
            )
        return {
            "steps": planned_steps(self.seconds, step_ms, timing.get("startup_s", 0.0)),
            "budget_seconds": self.seconds,
            "startup_s": timing.get("startup_s", 0.0),
            "timing": key,
            "calibrated_step_ms": step_ms,
            "step_statistic": row.step_statistic,
            "timing_date": timing["date"],
            "timing_commit": timing.get("commit"),
        }


def run_table(
    table: Table,
    split: str,
    seeds: Sequence[int],
    budget: Budget,
    results: Path,
    logs: Path,
    only: Sequence[str] = (),
    extra: Sequence[str] = (),
    checkpoint_every: int = CHECKPOINT_EVERY,
    keep_checkpoints: bool = False,
    allow_code_change: bool = False,
) -> list[tuple[str, int, str]]:
    """Run every (row, seed) of ``table`` that has no record yet; returns (row, seed, what happened) for each.

    What happened: ``skipped`` (a record exists), ``busy`` (another process holds the run), ``ran``
    (from step 0), ``resumed`` (from the run folder's last.ckpt). Every pending run is checked before
    the first one trains, so a missing file stops the sitting at once, not hours later; so does a run
    that would resume on other code than it started with (:func:`code_fingerprint`), unless
    ``allow_code_change``.
    """
    rows = [table.row(name) for name in only] if only else list(table.rows)
    outcome: list[tuple[str, int, str]] = []
    pending = []
    for row in rows:
        for seed in seeds:
            if record_path(results, table, split, row, seed).is_file():
                outcome.append((row.name, seed, "skipped"))
            else:
                pending.append((row, seed))
    problems: dict[str, list[str]] = {}  # problem -> the runs it stops
    code = code_fingerprint()
    for row, seed in pending:
        run_dir = logs / table.folder(split) / f"{row.slug}__seed{seed}"
        plan = read_json(run_dir / "plan.json") or budget.plan(table, row)
        started_on = plan.get("code")
        if last_checkpoint(run_dir) and started_on != code and not allow_code_change:
            problems.setdefault(
                f"{run_dir} was started on other code (fingerprint {str(started_on)[:12]}, now {code[:12]}: "
                "cots/, conf/ or tokenizers/ changed): delete the folder to run it again from step 0, "
                "or resume anyway with --allow-code-change",
                [],
            ).append(f"{row.name!r} seed {seed}")
        cfg = build_cfg(table, row, split, row_overrides(table, row, seed, plan["steps"], extra), run_dir)
        for problem in preflight(cfg, galleries(table, split, cfg).values()):
            problems.setdefault(problem, []).append(f"{row.name!r} seed {seed}")
    if problems:
        raise SystemExit(
            "not starting; fix these first:\n"
            + "\n".join(f"  {problem}\n    (stops {', '.join(runs)})" for problem, runs in problems.items())
        )
    for row, seed in pending:
        outcome.append(
            (
                row.name,
                seed,
                run_one(table, row, split, seed, budget, results, logs, extra, checkpoint_every, keep_checkpoints),
            )
        )
    return outcome


def run_one(
    table: Table,
    row: Row,
    split: str,
    seed: int,
    budget: Budget,
    results: Path,
    logs: Path,
    extra: Sequence[str],
    checkpoint_every: int,
    keep_checkpoints: bool,
) -> str:
    """Train (or resume) one (row, seed), score its galleries, write its record; returns what happened."""
    run_dir = logs / table.folder(split) / f"{row.slug}__seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"\n=== {table.name} / {row.name} / seed {seed}: another process is running it, skipped")
            return "busy"
        record_file = record_path(results, table, split, row, seed)
        if record_file.is_file():  # finished by another process since this one listed the runs
            return "skipped"
        plan_file = run_dir / "plan.json"
        plan = read_json(plan_file)
        checkpoint = last_checkpoint(run_dir)
        if plan is None:  # the steps are fixed at the first start, whatever is recalibrated later
            plan = {**budget.plan(table, row), "row": row.name, "seed": seed, "split": split, "created": now()}
        if checkpoint is None:  # (re)starting from step 0: the code it runs on is today's
            plan["code"] = code_fingerprint()
            write_json_atomic(plan_file, plan)
        overrides = row_overrides(table, row, seed, plan["steps"], extra)
        cfg = build_cfg(table, row, split, overrides, run_dir)
        enable_crash_recovery(cfg, checkpoint_every)
        clock = SittingClock.__module__ + "." + SittingClock.__qualname__
        with open_dict(cfg):
            cfg.callbacks.evidence_sittings = {"_target_": clock, "path": str(run_dir / "sittings.json")}
            cfg.ckpt_path = str(checkpoint) if checkpoint else None
        state = "resumed" if checkpoint else "ran"
        print(
            f"\n=== {table.folder(split)} / {row.name} / seed {seed}: {plan['steps']} steps"
            + (f", resuming {checkpoint}" if checkpoint else ""),
            flush=True,
        )
        metrics, objects = train(cfg)
        trainer, module, datamodule = objects["trainer"], objects["module"], objects["datamodule"]
        start = time.perf_counter()
        scores = score_galleries(trainer, module, datamodule, galleries(table, split, cfg))
        test_minutes = (time.perf_counter() - start) / 60
        timer = next((cb for cb in trainer.callbacks if isinstance(cb, StepTimer)), None)
        measured = timer.median_step_seconds() if timer else None
        sittings = read_json(run_dir / "sittings.json", [])
        record = {
            "table": table.name,
            "row": row.name,
            "row_slug": row.slug,
            "seed": seed,
            "split": split,
            "row_overrides": list(row.overrides),
            "overrides": overrides,
            "vendor": row.vendor,
            "train_manifest": cfg.data.train_manifest,
            "noise_seed": cfg.data.get("noise_seed"),
            **{
                k: plan.get(k)
                for k in ("steps", "budget_seconds", "timing", "calibrated_step_ms", "timing_date", "timing_commit")
            },
            "global_step": int(trainer.global_step),
            "checkpoint_every": checkpoint_every,
            "galleries": scores,
            "train_minutes": sum(s["seconds"] for s in sittings) / 60,
            "budget_minutes": (
                plan["steps"] * plan["calibrated_step_ms"] / 60000 if plan.get("calibrated_step_ms") else None
            ),
            "test_minutes": test_minutes,
            "measured_step_ms": 1000 * measured if measured else None,  # the last sitting's median (shared machine)
            "sittings": sittings,
            "resumed": bool(checkpoint) or len(sittings) > 1,
            "train_loss": metrics.get("train/loss"),
            "precision": str(trainer.precision),  # what trained: bf16 falls back to fp32 where the CPU emulates it
            **amf_stats(module),
            "finished": now(),
            **git_state(),
            "code": plan.get("code"),
            "machine": machine(),
            "run_dir": str(run_dir),
        }
        write_json_atomic(record_file, record)
        print(f"wrote {record_file}: " + ", ".join(f"{g} rsum {s['rsum']:.1f}" for g, s in scores.items()))
        if not keep_checkpoints:  # they are only for crash recovery; the record is the result
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        del objects, trainer, module, datamodule
        gc.collect()
        return state


# -- tables ----------------------------------------------------------------------------------------------
def read_records(results: Path, table: Table, split: str) -> dict[tuple[str, int], dict]:
    """Records of a table by (row slug, seed)."""
    records = {}
    for path in sorted((results / table.folder(split)).glob("*__seed*.json")):
        record = json.loads(path.read_text())
        records[(record["row_slug"], int(record["seed"]))] = record
    return records


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); None where undefined."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


NOISY_COUNTS = ("filtered_noisy", "kept_noisy")  # a record's AMF counts of injected-noise pairs


def summarize_row(
    row: Row,
    records: dict[tuple[str, int], dict],
    seeds: Sequence[int],
    gallery_names: Sequence[str],
    other_vendor: dict[str, str] | None = None,
) -> dict:
    """n, per-gallery rsum (mean, std, per seed), minutes, steps and AMF figures of one row."""
    found = {seed: rec for (name, seed), rec in records.items() if name == row.slug}
    all_seeds = sorted(set(seeds) | set(found))
    out = {
        "row": row.name,
        "n": len(found),
        "seeds": all_seeds,
        "missing": [s for s in all_seeds if s not in found],
        "rsum": {},
        "steps": sorted({rec["steps"] for rec in found.values()}),
    }
    for gallery in gallery_names:
        per_seed = {seed: found[seed]["galleries"][gallery]["rsum"] if seed in found else None for seed in all_seeds}
        mean, std = mean_std([v for v in per_seed.values() if v is not None])
        out["rsum"][gallery] = {"mean": mean, "std": std, "per_seed": per_seed}
    for key in ("train_minutes", "budget_minutes", "amf_filtered_after_warmup"):
        out[key] = mean_std([rec[key] for rec in found.values() if rec.get(key) is not None])
    # precision and recall against injected noise: undefined for a run with none (all it filtered was clean)
    noisy = [rec for rec in found.values() if any(rec.get("amf_counts", {}).get(k) for k in NOISY_COUNTS)]
    for key in ("amf_precision", "amf_recall"):
        out[key] = mean_std([rec[key] for rec in noisy if rec.get(key) is not None])
    first = [rec["galleries"][gallery_names[0]] for rec in found.values()]
    for key in ("vilem_det_acc", "vilem_det_majority", "vilem_cor_acc"):  # on the first gallery's captions
        out[key] = mean_std([scores[key] for scores in first if key in scores])
    if row.vendor and other_vendor:  # in-style minus cross-style, within each run
        gaps = [
            rec["galleries"][row.vendor]["rsum"] - rec["galleries"][other_vendor[row.vendor]]["rsum"]
            for rec in found.values()
        ]
        out["in_minus_cross"] = mean_std(gaps)
    return out


def fmt(mean: float | None, std: float | None, digits: int = 1) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def delta(a: dict, b: dict) -> str:
    """Difference of two rows over the seeds both have, seed against seed: the mean of the per-seed
    differences ± their standard error (n ≥ 2).

    A run's seed (init, data order, crops) moves rsum by about as much as the settings compared, and the
    same seed gives two rows the same draw of all three, so the per-seed differences cancel most of it.
    Where the rows have records for different seeds, the seeds in common are named: one row's lucky or
    missing seed never enters the difference.
    """
    a_seeds = {seed for seed, v in a["per_seed"].items() if v is not None}
    b_seeds = {seed for seed, v in b["per_seed"].items() if v is not None}
    if not a_seeds or not b_seeds:  # a row without records
        return "–"
    shared = sorted(a_seeds & b_seeds)
    if not shared:
        return "– (no seed in common)"
    diffs = [a["per_seed"][seed] - b["per_seed"][seed] for seed in shared]
    spread = f" ± {statistics.stdev(diffs) / len(diffs) ** 0.5:.1f}" if len(diffs) > 1 else ""
    named = "" if a_seeds == b_seeds else f" (seed{'s' if len(shared) > 1 else ''} {' '.join(map(str, shared))})"
    return f"{statistics.fmean(diffs):+.1f}{spread}{named}"


def build_table(table: Table, split: str, results: Path, seeds: Sequence[int] | None = None) -> tuple[str, list[dict]]:
    """The markdown of a table from its records, and the per-row summaries it shows."""
    seeds = list(seeds or table.seeds)
    records = read_records(results, table, split)
    names = list(table.splits[split].galleries)
    other = {names[0]: names[1], names[1]: names[0]} if len(names) == 2 else None
    summaries = [summarize_row(row, records, seeds, names, other) for row in table.rows]
    by_name = {s["row"]: s for s in summaries}
    reference = None
    shown = dict(records)  # every record a row of the table shows, the reference row's included
    if table.reference:
        ref_table = TABLES[table.reference[0]]
        ref_row = ref_table.row(table.reference[1])
        ref_records = read_records(results, ref_table, split)
        reference = summarize_row(ref_row, ref_records, ref_table.seeds, names)
        reference["row"] = f"{ref_row.name} (reference: {ref_table.folder(split)})"
        shown |= {(reference["row"], seed): r for (name, seed), r in ref_records.items() if name == ref_row.slug}
    show_amf = any("amf_counts" in record for record in records.values())  # a run with AMF on
    show_gap = any("in_minus_cross" in s for s in summaries)
    show_vilem = any(s["vilem_det_acc"][0] is not None for s in summaries)
    lines = []
    for s in [*summaries, *([reference] if reference else [])]:
        row = next((r for r in table.rows if r.name == s["row"]), None)  # None for the reference row
        cells = {"row": s["row"], "n": f"{s['n']}/{len(s['seeds'])}"}
        for g in names:
            cells[g] = fmt(s["rsum"][g]["mean"], s["rsum"][g]["std"])
            cells[f"d_{g}"] = delta(s["rsum"][g], by_name[row.vs]["rsum"][g]) if row and row.vs else ""
        cells["per_seed"] = ", ".join(
            f"{seed}: " + " / ".join(fmt(s["rsum"][g]["per_seed"][seed], None) for g in names) for seed in s["seeds"]
        )
        cells["steps"] = "/".join(map(str, s["steps"])) or "–"
        cells["train_min"] = fmt(*s["train_minutes"])
        cells["budget_min"] = fmt(*s["budget_minutes"])
        cells["precision"] = fmt(*[None if v is None else 100 * v for v in s["amf_precision"]])
        cells["recall"] = fmt(*[None if v is None else 100 * v for v in s["amf_recall"]])
        cells["filtered"] = fmt(*[None if v is None else 100 * v for v in s["amf_filtered_after_warmup"]])
        cells["gap"] = fmt(*s["in_minus_cross"]) if "in_minus_cross" in s else ""
        if show_vilem:
            cells["det"] = fmt(*s["vilem_det_acc"]) + (
                f" ({fmt(s['vilem_det_majority'][0], None)})" if s["vilem_det_majority"][0] is not None else ""
            )
            cells["cor"] = fmt(*s["vilem_cor_acc"])
        lines.append(cells)
    columns = [("row", "row", ""), ("n", "n", "")]
    columns += [(f"{g.capitalize()} rsum", g, "") for g in names]
    if any(r.vs for r in table.rows):
        columns += [(f"Δ {g.capitalize()}", f"d_{g}", "") for g in names]
    if show_gap:
        columns.append(("in − cross", "gap", ""))
    if show_amf:
        columns += [
            ("AMF precision %", "precision", ""),
            ("AMF recall %", "recall", ""),
            ("filtered %", "filtered", ""),
        ]
    if show_vilem:
        columns += [
            (f"ViLEM detection % (majority), {names[0].capitalize()}", "det", ""),
            ("ViLEM correction %", "cor", ""),
        ]
    columns += [
        ("per seed (" + " / ".join(g.capitalize() for g in names) + ")", "per_seed", ""),
        ("steps", "steps", ""),
        ("train min", "train_min", ""),
        ("budget min", "budget_min", ""),
    ]
    return render(table, split, seeds, records, lines, columns, precision_note(shown)), summaries


def precision_of(record: dict) -> str:
    """The precision a run trained in: recorded, else its last ``trainer.precision=`` override, else the base's."""
    if record.get("precision"):
        return record["precision"]
    given = [o.split("=", 1)[1] for o in record.get("overrides", []) if o.startswith("trainer.precision=")]
    return given[-1] if given else "the experiment's"


def precision_note(records: dict) -> str | None:
    """One line naming which runs trained in which precision on which CPU, when they are not all alike."""
    groups: dict[tuple[str, str], list[str]] = {}
    for (name, seed), record in sorted(records.items()):
        key = (precision_of(record), record.get("machine", {}).get("cpu", "?"))
        groups.setdefault(key, []).append(f"{name} seed {seed}")
    if len(groups) < 2:
        return None
    return (
        "Not every run trained alike: "
        + "; ".join(f"{precision} on {cpu}: {', '.join(runs)}" for (precision, cpu), runs in groups.items())
        + "."
    )


def render(
    table: Table, split: str, seeds: list[int], records: dict, lines: list[dict], columns: list, mixed: str | None
) -> str:
    """Header (what was run, where, on which budget), the table, and how to read it; ``mixed``: the
    :func:`precision_note` of every run shown."""
    any_record = next(iter(records.values()), None)
    gallery_lines = []
    if any_record:
        for name, g in any_record["galleries"].items():
            chance = chance_table(g["images"], g["captions"] / max(g["images"], 1))["rsum"]
            gallery_lines.append(
                f"{name}: `{Path(g['manifest']).name}`, {g['images']} images (chance rsum {chance:.1f})"
            )
    budgets = sorted({r["budget_seconds"] for r in records.values() if r.get("budget_seconds")})
    commits = sorted({(r.get("commit") or "?")[:10] + ("+" if r.get("modified") else "") for r in records.values()})
    vs = {r.name: r.vs for r in table.rows if r.vs}
    parts = [
        f"# {table.title} ({table.folder(split)})",
        "",
        f"Split `{split}`: "
        + (
            "trained on the experiment's manifest"
            if not table.splits[split].train
            else f"trained on `{table.splits[split].train}`"
        )
        + f"; base `{' '.join(table.base)}`; galleries "
        + ("; ".join(gallery_lines) or "(no records yet)")
        + ".",
        "Budget: "
        + (", ".join(f"{b:.0f} s ({b / 60:.1f} min)" for b in budgets) or "–")
        + " of calibrated steps per run (steps = budget / the row's median step in `step_times.json`); "
        + f"runs at commit {', '.join(commits) or '–'} (`+`: with uncommitted changes).",
        "",
        "rsum: R@1 + R@5 + R@10 of image→text and text→image, in %, max 600; mean ± sample std over the seeds "
        "that have a record (n = records / seeds asked for; a missing seed shows as –). Δ: this row minus the row "
        "it is compared with, seed against seed: the mean of the per-seed differences ± their standard error, "
        "over the seeds both rows have (named when the rows' seeds differ). "
        "train min: wall minutes spent training, summed over sittings (on a shared machine, more than "
        "budget min = steps × calibrated step).",
    ]
    if vs:
        parts.append("Compared with: " + "; ".join(f"{a} vs {b}" for a, b in vs.items()) + ".")
    if mixed:
        parts.append(mixed)
    if table.notes:
        parts += ["", table.notes]
    slugs = {row.slug for row in table.rows}
    strays = [f"{name} seed {seed}" for name, seed in records if name not in slugs]
    if strays:  # a renamed or removed row: its records are kept but not shown
        parts += ["", "Records of no row of this table (not shown): " + ", ".join(strays) + "."]
    command = f"python bench/evidence.py table {table.name}" + (f" --split {split}" if split != "test" else "")
    if seeds != list(table.seeds):  # the seeds asked for decide n and the missing ones
        command += " --seeds " + " ".join(map(str, seeds))
    parts += [
        "",
        markdown_table(lines, columns),
        "",
        f"Built by `{command}` from {len(records)} records in `{table.folder(split)}/`.",
    ]
    return "\n".join(parts) + "\n"


# -- command line ----------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, tables_nargs: str = "+") -> None:
        p.add_argument(
            "tables",
            nargs=tables_nargs,
            metavar="TABLE",  # checked below (choices rejects [] for *)
            help=f"of {', '.join(TABLES)}" + (" (default: all)" if tables_nargs == "*" else ""),
        )
        p.add_argument("--results", type=Path, default=RESULTS, help="records, tables and step_times.json")
        p.add_argument("--step-times", type=Path, default=None, help="default: <results>/step_times.json")

    p_cal = sub.add_parser("calibrate", help="median step time of every timing the tables use (quiet machine)")
    common(p_cal, "*")
    p_cal.add_argument("--calibrate-steps", type=int, default=14, help="steps of each row in each round")
    p_cal.add_argument("--left-out", type=int, default=4, help="first steps of each round left out of the median")
    p_cal.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the rows")
    p_cal.add_argument("--logs", type=Path, default=LOGS)
    p_cal.add_argument("--overrides", nargs="+", default=[], help="Hydra overrides for every timing run")
    p_cal.add_argument(
        "--add-missing",
        action="store_true",
        help="time only the timings step_times.json lacks, beside their table's budget timing, and store them "
        "scaled to its committed step (the committed timings and the steps of runs made stay)",
    )

    p_run = sub.add_parser("run", help="run the (row, seed) pairs that have no record; resume interrupted ones")
    common(p_run)
    p_run.add_argument("--split", choices=["test", "val"], default="test", help="val: selection mode")
    p_run.add_argument("--seeds", type=int, nargs="+", help="default: the table's")
    p_run.add_argument("--only", nargs="+", metavar="ROW", help="these rows only (name or slug)")
    p_run.add_argument("--budget-seconds", type=float, help="default: the demo's steps x the demo's step")
    p_run.add_argument("--steps", type=int, help="fixed steps for every run (checks; needs --results and --logs)")
    p_run.add_argument(
        "--budget-scale",
        type=float,
        default=1.0,
        help="times the budget, so each row trains that many times its steps at the calibrated CPU step (the GPU "
        "ablation: 10)",
    )
    p_run.add_argument("--logs", type=Path, default=LOGS, help="run folders")
    p_run.add_argument("--checkpoint-every", type=int, default=CHECKPOINT_EVERY)
    p_run.add_argument("--keep-checkpoints", action="store_true", help="keep last.ckpt after the record")
    p_run.add_argument(
        "--allow-code-change", action="store_true", help="resume runs that started on other cots/conf code"
    )
    p_run.add_argument("--overrides", nargs="+", default=[], help="Hydra overrides for every run (recorded)")

    p_table = sub.add_parser("table", help="write <results>/<table>.md from the records")
    common(p_table, "*")
    p_table.add_argument("--split", choices=["test", "val"], default="test")
    p_table.add_argument("--seeds", type=int, nargs="+", help="seeds expected (default: the table's)")

    p_list = sub.add_parser("list", help="every table's rows, overrides, timings and planned steps")
    common(p_list, "*")

    args = parser.parse_args(argv)
    unknown = [name for name in args.tables if name not in TABLES]
    if unknown:
        parser.error(f"unknown table(s) {unknown}: choose from {list(TABLES)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_float32_matmul_precision("high")  # as cots-train does
    tables = [TABLES[name] for name in (args.tables or TABLES)]
    step_times_path = args.step_times or args.results / "step_times.json"

    if args.command == "calibrate":
        calibrate(
            tables,
            step_times_path,
            args.logs,
            args.calibrate_steps,
            args.left_out,
            args.rounds,
            args.overrides,
            args.add_missing,
        )
    elif args.command == "run":
        if args.steps is not None and (args.results == RESULTS or args.logs == LOGS):
            parser.error("--steps is for checks: give --results and --logs outside bench/results and logs/bench")
        step_times = read_json(step_times_path, {"timings": {}})
        for table in tables:
            if args.steps is not None:
                budget = Budget(steps=args.steps)
            else:
                seconds = (
                    args.budget_seconds
                    or table.budget_seconds
                    or default_budget_seconds(step_times, table.budget_timing)
                ) * args.budget_scale
                print(f"{table.name}: budget {seconds:.0f} s ({seconds / 60:.1f} min) of calibrated steps per run")
                budget = Budget(seconds=seconds, step_times=step_times)
            outcome = run_table(
                table,
                args.split,
                args.seeds or table.seeds,
                budget,
                args.results,
                args.logs,
                args.only or (),
                args.overrides,
                args.checkpoint_every,
                args.keep_checkpoints,
                args.allow_code_change,
            )
            print("\n".join(f"{table.folder(args.split)} / {row} / seed {seed}: {what}" for row, seed, what in outcome))
    elif args.command == "table":
        for table in tables:
            markdown, _ = build_table(table, args.split, args.results, args.seeds)
            out = args.results / f"{table.folder(args.split)}.md"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(markdown)
            print(f"{markdown}\nwrote {out}")
    else:
        step_times = read_json(step_times_path, {"timings": {}})
        for table in tables:
            seconds = table.budget_seconds
            if seconds is None and table.budget_timing in step_times["timings"]:
                seconds = default_budget_seconds(step_times, table.budget_timing)
            print(f"\n{table.name}: {table.title}; seeds {list(table.seeds)}; base {' '.join(table.base)}")
            for row in table.rows:
                timing = step_times["timings"].get(table.timing(row))
                startup = timing.get("startup_s", 0.0) if timing else 0.0
                step_ms = timing.get(f"{row.step_statistic}_ms") if timing else None
                steps = planned_steps(seconds, step_ms, startup) if step_ms and seconds else None
                print(
                    f"  {row.name!r}: {' '.join(row.overrides) or '(base)'}"
                    + (f" [train on {row.vendor} only]" if row.vendor else "")
                    + f"; timing {table.timing(row)}: "
                    + (f"{step_ms:.0f} ms ({row.step_statistic}) -> {steps} steps" if step_ms else "not calibrated")
                )


if __name__ == "__main__":
    main()
