"""LightningModule: runs the training step (``cots.training_step``), steps the momentum, logs, evaluates."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from cots import distributed
from cots.amf import AMFDecision, noise_confusion, precision_recall
from cots.checkpoints import capture_rank_rng_states, restore_rank_rng_state, seed_rank_streams, upgrade_state_dict
from cots.guards import NonFiniteGuard, all_ranks_finite, assert_finite_parameters, check_skip_fraction
from cots.losses.vilem import vilem_loss
from cots.masking import IGNORE_INDEX
from cots.metrics.folds import FoldTables, fold_metrics, fold_table_prefix
from cots.metrics.retrieval import retrieval_metrics
from cots.models.cots_model import COTSModel
from cots.momentum import momentum_at
from cots.optim import build_optimizer
from cots.training_step import TrainingStep, predict_caption_errors


class COTSLitModule(L.LightningModule):
    """Pretraining and retrieval evaluation of a :class:`COTSModel`.

    Args:
        model: the network (built by Hydra from ``model``).
        step: the objective and the pieces around it (AMF, CMVM targets, ViLEM's editor), built from
            ``objective`` and ``data.image_tokens`` by :meth:`TrainingStep.from_config`.
        optimizer: partial optimizer taking parameter groups (weight decay per group).
        scheduler: partial LR scheduler taking (optimizer, total_steps), stepped per optimizer step.
        momentum: base EMA coefficient m; ``momentum_schedule`` 'constant' or 'cosine' (to 1).
        eval_chunk_size: rows scored at once in retrieval (bounds memory).
        run_config: the resolved run config, stored in checkpoints so that ``cots-eval`` can rebuild the model.
        skip_nonfinite: skip (no update, no enqueue) a step whose loss is NaN/Inf on any rank; costs one
            host sync per step. ``max_nonfinite_steps`` in a row stop the run.
        max_skip_fraction: stop when more than this fraction of training samples is unusable (None: never).
        compile: None runs eager; a dict (``{}`` for the defaults) ``torch.compile``s the towers with
            those options (see :meth:`COTSModel.compile_towers`).
        lr_scale: learning-rate multipliers by parameter-name prefix (``optim.lr_scale``; see
            :func:`cots.optim.param_groups`).
        seed: the run's seed; at the start of fitting each rank reseeds its random streams (dropout,
            drop-path, ViLEM's edits) with ``seed + rank``. None leaves the streams as they are.
    """

    def __init__(
        self,
        model: COTSModel,
        step: TrainingStep,
        optimizer: Callable,
        scheduler: Callable | None = None,
        momentum: float = 0.995,
        momentum_schedule: str = "constant",
        eval_chunk_size: int | None = None,
        run_config: dict | None = None,
        skip_nonfinite: bool = True,
        max_nonfinite_steps: int = 10,
        max_skip_fraction: float | None = 0.1,
        compile: Mapping | None = None,
        lr_scale: Mapping[str, float] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if compile is not None:
            model.compile_towers(**dict(compile))
        self.model = model
        self.step = step
        self.objective = step.objective
        self.amf = step.amf  # a submodule: its similarity queue lives in checkpoints ("amf.similarity_queue.*")
        self.optimizer_factory = optimizer
        self.lr_scale = dict(lr_scale or {})
        self.scheduler_factory = scheduler
        self.momentum = momentum
        self.momentum_schedule = momentum_schedule
        self.eval_chunk_size = eval_chunk_size
        self.run_config = run_config
        self.text_tokenizer_json: str | None = None  # set by train(); saved with checkpoints
        self.skipped: Counter[str] = Counter()
        self.samples_seen = 0
        self.max_skip_fraction = max_skip_fraction
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps) if skip_nonfinite else None
        self.seed = seed
        # A non-finite loss in any micro-batch of an accumulation window cancels the window's update: no
        # optimizer or scheduler step, no EMA, nothing enqueued. ``_window`` is the global_step it belongs to.
        self._window: int | None = None
        self._window_skipped = False
        self._gallery: dict[str, list] = {}
        self.last_retrieval: dict[str, float] = {}
        # The last gallery table with its stage, step and gallery size (saved in checkpoints: an export's model
        # card shows it); the sanity check's partial gallery is left out.
        self.last_evaluation: dict = {}
        self.last_error_accuracy: dict[str, float] = {}  # ViLEM detection / correction accuracy (%), when on
        # [filtered & noisy, filtered & clean, kept & noisy, kept & clean] once AMF is active, over injected noise
        # (data.noise_rate); saved in the "cots" section of checkpoints, not in the state dict.
        self.register_buffer("amf_noise_counts", torch.zeros(4), persistent=False)

    # -- training ----------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        # Before a resume restores the saved streams (Lightning restores after ``setup``).
        if stage == "fit" and self.seed is not None:
            seed_rank_streams(self.seed, self.trainer.global_rank)

    def on_train_start(self) -> None:
        # Transformers' from_pretrained returns its model in eval mode and Lightning keeps every module's mode:
        # a pretrained text tower would fine-tune without its dropout. COTSModel.train() puts every online
        # module in train mode and keeps the momentum encoders in eval (no dropout in the keys).
        self.model.train()
        self._learning_rates_of_this_schedule()
        # Anything else in eval mode now is a bug.
        others = [name for name, m in self.named_modules() if not m.training and not name.startswith("model.momentum_")]
        if others:
            rank_zero_warn(
                f"{len(others)} module(s) in eval mode at the start of training (only the momentum "
                f"encoders should be): {others[:8]}{' ...' if len(others) > 8 else ''}"
            )

    def _learning_rates_of_this_schedule(self) -> None:
        """Set each group's learning rate to this run's schedule at the step training starts from.

        A resume restores the optimizer with the learning rates the saved run's last scheduler step set,
        from that run's schedule. The schedule's length is this run's (``trainer.max_steps`` may be
        longer or shorter than the saved run's): without this, the first update after a resume used
        the saved run's rate, and the next scheduler step moved to this run's curve.
        """
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                continue
            pairs = zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
            rates = [base * factor(scheduler.last_epoch) for factor, base in pairs]
            for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
                group["lr"] = rate
            scheduler._last_lr = rates  # what get_last_lr() and the lr monitor read

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if self._window != self.global_step:  # the first micro-batch of an accumulation window
            self._window, self._window_skipped = self.global_step, False
        out = self.step(self.model, batch)  # forward -> filter -> targets -> masked passes -> edits -> objective
        self._check_data(batch)
        if self.nonfinite is not None:
            finite = all_ranks_finite(out.terms["loss"])
            self.nonfinite.record(finite, out.terms, self.global_step)
            self.log("train/nonfinite_skipped", float(self.nonfinite.skipped), batch_size=batch["images"].shape[0])
            if not finite or self._window_skipped:
                # No backward; the window's gradients so far are dropped, so the optimizer sees none and
                # changes nothing; nothing is enqueued, so the queues stay clean.
                self._window_skipped = True
                self.zero_grad(set_to_none=True)
                return None
        self.step.enqueue(self.model, out)
        if out.decision is not None:
            self._log_amf(out.decision, batch)
        batch_size = batch["images"].shape[0]
        terms = out.terms
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), prog_bar=name == "loss", batch_size=batch_size)
        self.log("train/temperature", out.features.temperature.detach(), batch_size=batch_size)
        self.log("train/queue_fill", self.model.feature_queue.fill_fraction(), batch_size=batch_size)
        for reason, count in self.skipped.items():
            self.log(f"data/skipped_{reason}", float(count), batch_size=batch_size)
        return terms["loss"]

    def _check_data(self, batch: dict) -> None:
        """Count unusable samples (host-side counters from the collate); stop past the allowed fraction."""
        self.skipped.update(batch.get("skipped", {}))
        self.samples_seen += batch["images"].shape[0]
        if self.max_skip_fraction is not None:
            check_skip_fraction(self.skipped, self.samples_seen, self.max_skip_fraction)

    def _log_amf(self, decision: AMFDecision, batch: dict) -> None:
        """Filter statistics; with injected noise, cumulative precision/recall of the filtered pairs."""
        batch_size = batch["images"].shape[0]
        stats = {
            "filtered_fraction": decision.filtered_fraction(),
            "mean": decision.mean,
            "std": decision.std,
            "threshold": decision.threshold,
            "active": decision.active.float(),
        }
        if "is_noisy" in batch:
            is_noisy = distributed.all_gather_no_grad(batch["is_noisy"].float()) > 0.5  # G, like decision.keep
            self.amf_noise_counts += noise_confusion(decision.keep, is_noisy, decision.active)
            stats["precision"], stats["recall"] = precision_recall(self.amf_noise_counts)
        for name, value in stats.items():
            self.log(f"amf/{name}", value, batch_size=batch_size)

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)  # runs the window's last training_step
        if self._window_skipped:  # every gradient is None: the optimizer changed nothing; neither do the rest
            return
        # Lightning calls this once per optimizer step, so accumulation does not repeat the EMA.
        m = momentum_at(
            self.global_step, self.trainer.estimated_stepping_batches, self.momentum, self.momentum_schedule
        )
        self.model.momentum_update(m)
        self.model.clamp_temperature_()

    def lr_scheduler_step(self, scheduler, metric) -> None:
        """The schedule advances with the updates made: a skipped non-finite step does not move it."""
        if self._window_skipped:
            return
        super().lr_scheduler_step(scheduler, metric)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip here for a fused optimizer when no fp16 gradient scaler runs (bf16-mixed, fp32).

        Lightning's mixed-precision plugin refuses to clip for any optimizer that can unscale gradients
        itself (fused AdamW), bf16 included, where the gradients are never scaled and clipping them is
        exact. With an fp16 scaler the config check refuses fused + clipping before training.
        """
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if gradient_clip_val and getattr(optimizer, "_step_supports_amp_scaling", False) and scaler is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.optimizer_factory, self.model, self.lr_scale)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- retrieval evaluation (val and test share it) -------------------------------------------
    def _gallery_step(self, batch: dict, batch_idx: int, dataloader_idx: int) -> None:
        encoder = self.model.encoder
        if dataloader_idx == 0:
            image = encoder.encode_image(batch["images"])
            self._gallery.setdefault("images", []).append(image.embedding.float())
            if self.objective.vilem.enabled:
                self._keep_error_images(image.cls, image.tokens)
        else:
            text = encoder.encode_text(batch["input_ids"], batch["attention_mask"]).embedding.float()
            self._gallery.setdefault("texts", []).append(text)
            self._gallery.setdefault("text_to_image", []).append(batch["image_index"])
            if self.objective.vilem.enabled:
                self._score_errors(batch, batch_idx)

    def _keep_error_images(self, image_global: torch.Tensor, image_patches: torch.Tensor) -> None:
        """Keep [CLS] and patch tokens of the first ``objective.vilem.val_images`` gallery images."""
        kept = self._gallery.setdefault("error_images", [])
        room = self.objective.vilem.val_images - sum(len(cls) for cls, _ in kept)
        if room > 0:
            kept.append((image_global[:room], image_patches[:room]))

    def _score_errors(self, batch: dict, batch_idx: int) -> None:
        """ViLEM detection / correction counts on seeded edits of the captions of the kept images."""
        kept = self._gallery.get("error_images")
        if not kept:
            return
        if isinstance(kept, list):  # first caption batch: one tensor per field from now on
            kept = self._gallery["error_images"] = (torch.cat([c for c, _ in kept]), torch.cat([p for _, p in kept]))
        image_global, image_patches = kept
        index = batch["image_index"]
        own = index < image_global.shape[0]
        if not own.any():
            return
        ids, mask, index = batch["input_ids"][own], batch["attention_mask"][own], index[own]
        generator = torch.Generator(device=ids.device).manual_seed(
            1000003 * (batch_idx + 1)
        )  # the same edits every time
        edited, predicted = predict_caption_errors(
            self.model, self.step.caption_editor, ids, mask, image_global[index], image_patches[index], generator
        )
        result = vilem_loss(
            predicted.detection_logits, edited.detection_labels, predicted.correction_logits, edited.correction_labels
        )
        scored = (edited.detection_labels != IGNORE_INDEX).sum()
        replaced = edited.replaced.sum()
        counts = torch.stack(
            [result["detection_accuracy"] * scored, scored, result["correction_accuracy"] * replaced, replaced.float()]
        ).float()
        self._gallery["error_counts"] = self._gallery.get("error_counts", 0) + counts

    def _gallery_end(self, prefix: str) -> None:
        if not self._gallery:
            return
        images = torch.cat(self._gallery.pop("images"))
        texts = torch.cat(self._gallery.pop("texts"))
        text_to_image = torch.cat(self._gallery.pop("text_to_image"))
        error_counts = self._gallery.pop("error_counts", None)
        self._gallery.clear()
        # every rank holds the whole gallery; each scores its share of the images and all get the one table
        self.last_retrieval = retrieval_metrics(
            images, texts, text_to_image, self.eval_chunk_size, across_ranks=distributed.is_distributed()
        )
        self._fold_tables(prefix, images, texts, text_to_image)  # COCO 1K, when asked for (below)
        if not (self._trainer is not None and self.trainer.sanity_checking):
            self.last_evaluation = {
                "stage": prefix,  # val: the val gallery during training; test: trainer.test
                "global_step": int(self.global_step),
                "images": int(images.shape[0]),
                "captions": int(texts.shape[0]),
                "table": dict(self.last_retrieval),
            }
        for name, value in self.last_retrieval.items():
            self.log(f"{prefix}/{name}", value, prog_bar=name == "rsum", sync_dist=False)
        if error_counts is not None:  # every rank scored the same captions
            det_correct, det_total, cor_correct, cor_total = error_counts.tolist()
            self.last_error_accuracy = {
                "vilem_det_acc": 100.0 * det_correct / max(det_total, 1.0),
                "vilem_cor_acc": 100.0 * cor_correct / max(cor_total, 1.0),
                # what "nothing was replaced" scores: the bar detection must clear
                "vilem_det_majority": 100.0 * (1.0 - cor_total / max(det_total, 1.0)),
            }
            for name, value in self.last_error_accuracy.items():
                self.log(f"{prefix}/{name}", value, sync_dist=False)

    # -- evaluation protocols: COCO 1K (cots/metrics/folds.py) ------------------------------------------
    # Set by cots-train / cots-eval from the data module (``evaluation_fold_size``) before testing.
    test_fold_size: int | None = None  # images per fold of the test gallery; None: no fold table
    last_fold_tables: FoldTables | None = None  # of the last test

    def _fold_tables(self, stage: str, images: torch.Tensor, texts: torch.Tensor, text_to_image: torch.Tensor) -> None:
        """Score the gathered test gallery per fold too: the mean table is logged as ``test_1k/*``."""
        self.last_fold_tables = None
        if stage != "test" or not self.test_fold_size:
            return
        self.last_fold_tables = fold_metrics(images, texts, text_to_image, self.test_fold_size, self.eval_chunk_size)
        prefix = fold_table_prefix(stage, self.test_fold_size)
        for name, value in self.last_fold_tables.mean.items():
            self.log(f"{prefix}/{name}", value, sync_dist=False)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._gallery_step(batch, batch_idx, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._gallery_end("val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._gallery_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._gallery_end("test")

    # -- checkpoints: plain data only, no pickled modules -------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        assert_finite_parameters(self)
        checkpoint["cots"] = {
            "config": self.run_config,
            "text_tokenizer": self.text_tokenizer_json,
            "skipped": dict(self.skipped),
            "samples_seen": self.samples_seen,
            "rng": capture_rank_rng_states(),  # one entry per rank, in rank order
            "amf_noise_counts": self.amf_noise_counts.tolist(),
            "last_evaluation": self.last_evaluation,  # {} before any; absent from older checkpoints
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        upgrade_state_dict(checkpoint["state_dict"])  # key names of older checkpoints, before Lightning loads them
        state = checkpoint.get("cots", {})
        self.skipped = Counter(state.get("skipped", {}))
        self.samples_seen = state.get("samples_seen", 0)
        self.last_evaluation = dict(state.get("last_evaluation") or {})
        if "amf_noise_counts" in state:
            self.amf_noise_counts.copy_(torch.tensor(state["amf_noise_counts"]))
        if state.get("rng"):
            restore_rank_rng_state(state["rng"])
