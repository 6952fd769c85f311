"""The pretraining objective (METHOD §3-7): each term with its own switch and weight, summed.

The objective receives tensors (the model's :class:`~cots.models.cots_model.PairFeatures`, the AMF
weights, the masked passes' logits, the CMVM targets, ViLEM's edits and predictions) and only
weighs and sums the pure losses of ``cots.losses``. The filter, the targets and the edits that
produce its inputs are the training step's (``cots.training_step``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from cots import distributed
from cots.error_generation import EditedCaptions
from cots.losses.instance import instance_contrastive_loss
from cots.losses.mvlm import cmlm_loss, cmvm_loss
from cots.losses.task import TASK_DIRECTIONS, task_kl_loss
from cots.losses.vilem import vilem_loss
from cots.masking import IGNORE_INDEX
from cots.models.cots_model import ErrorPredictions, MaskedPredictions, PairFeatures


@dataclass
class LossTerm:
    """A switch and a weight; ``enabled: false`` skips the term's computation entirely."""

    enabled: bool = True
    weight: float = 1.0


@dataclass
class TaskTerm(LossTerm):
    """L_task: ``direction`` in ``TASK_DIRECTIONS``; ``temperature`` a fixed tau_task, None = the model's tau."""

    direction: str = "i2t||t2i"
    temperature: float | None = None


@dataclass
class AMFSettings:
    """The Adaptive Momentum Filter: keep pair i while s_i >= mu - k sigma of the last ``queue_size`` s."""

    enabled: bool = True
    k: float = 1.0
    queue_size: int = 4096


@dataclass
class ViLEMSettings(LossTerm):
    """ViLEM error modeling (METHOD §7).

    ``ratio`` of each caption's tokens are replaced by a draw from the ``top_k`` of ``generator``
    ('cmlm': the model's own CMLM head on the text alone, without gradient; 'cmlm_image': the same head
    fused with the paired image; or a local Hugging Face masked-LM directory sharing the caption
    vocabulary; see :class:`cots.error_generation.CaptionEditor`). ``layers`` (M1, None = half the text depth) and
    ``num_heads`` shape the model's interaction (read by the model config). ``mask_id``,
    ``special_ids`` and ``vocab_size`` come from the caption tokenizer (``cots-train`` fills them
    in). ``val_images``: validation scores detection / correction on the captions of the first
    that many gallery images.
    """

    ratio: float = 0.15
    top_k: int = 10
    generator: str = "cmlm"
    layers: int | None = None
    num_heads: int | None = None
    mask_id: int | None = None
    special_ids: list[int] | None = None
    vocab_size: int | None = None
    val_images: int = 512


def _global_mean(count: torch.Tensor) -> torch.Tensor:
    """sum over ranks / world size of a local count (the count itself with one process)."""
    return distributed.all_reduce_sum(count.float()) / distributed.world_size()


def _settings(cls, value, default_enabled: bool):
    if isinstance(value, cls):
        return value
    if value is None:
        return cls(enabled=default_enabled)
    return cls(**(dict(value) if isinstance(value, Mapping) else value))


class COTSObjective:
    """L = w_inst L_inst + w_task L_task + w_cmvm L_cmvm + w_cmlm L_cmlm + w_vilem L_vilem (METHOD §6).

    Terms left out of the config are off (old run configs keep their meaning). Holds no state: the
    AMF's similarity queue is the filter's (``cots.amf``), the queues are the model's.

    Args:
        inst: switch and weight of the instance-level contrast.
        task: switch, weight, direction and temperature of the task-level KL.
        amf: switch, ``k`` and ``queue_size`` of the Adaptive Momentum Filter (built by the training step).
        cmvm, cmlm: switch and weight of the masked vision / language modeling terms.
        masked_pairs: the masked passes (CMVM / CMLM) read the first this many pairs of each local
            batch; None = all. Each masked pass costs about an unmasked one: on a small compute budget a
            part of the batch keeps the token-level terms and buys more steps.
        vilem: ViLEM error modeling, see :class:`ViLEMSettings`.
    """

    def __init__(
        self,
        inst: Mapping | LossTerm | None = None,
        task: Mapping | TaskTerm | None = None,
        amf: Mapping | AMFSettings | None = None,
        cmvm: Mapping | LossTerm | None = None,
        cmlm: Mapping | LossTerm | None = None,
        vilem: Mapping | ViLEMSettings | None = None,
        masked_pairs: int | None = None,
    ) -> None:
        self.inst = _settings(LossTerm, inst, default_enabled=True)
        self.task = _settings(TaskTerm, task, default_enabled=False)
        self.amf = _settings(AMFSettings, amf, default_enabled=False)
        self.cmvm = _settings(LossTerm, cmvm, default_enabled=False)
        self.cmlm = _settings(LossTerm, cmlm, default_enabled=False)
        self.vilem = _settings(ViLEMSettings, vilem, default_enabled=False)
        if masked_pairs is not None and not (type(masked_pairs) is int and masked_pairs >= 1):
            raise ValueError(
                f"objective.masked_pairs must be a positive integer or null (all pairs), got {masked_pairs!r}"
            )
        self.masked_pairs = masked_pairs
        if not self.inst.enabled:
            raise ValueError("objective.inst.enabled=false leaves no retrieval objective; the queues need it")
        if self.task.direction not in TASK_DIRECTIONS:
            raise ValueError(f"objective.task.direction must be one of {TASK_DIRECTIONS}, got {self.task.direction!r}")
        if self.task.temperature is not None and not self.task.temperature > 0:
            raise ValueError(f"objective.task.temperature must be positive or null, got {self.task.temperature}")

    @property
    def token_level(self) -> bool:
        """Whether the step needs masked forward passes (CMVM or CMLM on)."""
        return self.cmvm.enabled or self.cmlm.enabled

    def __call__(
        self,
        features: PairFeatures,
        weights: torch.Tensor | None = None,
        masked: MaskedPredictions | None = None,
        image_tokens: torch.Tensor | None = None,
        errors: tuple[EditedCaptions, ErrorPredictions] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Loss terms for one step; ``loss`` is the weighted total, the rest are for logging.

        Args:
            features: the model's output: online z, momentum keys with the queue, tau, pair groups.
            weights: (B,) per-pair positive weights (AMF), None = all ones.
            masked: the masked passes' logits (``model.predict_masked``) when CMVM or CMLM is on.
            image_tokens: (B_m, h, w) CMVM targets of the pairs the masked passes read.
            errors: ViLEM's edited captions and the model's predictions on them, when ViLEM is on.
        """
        weight_sum = None
        if weights is not None:
            # Normalise by the global number of kept pairs so that DDP's gradient mean equals the 1-process loss.
            weight_sum = distributed.all_reduce_sum(weights.sum()) / distributed.world_size()
        keys = features.keys
        inst = instance_contrastive_loss(
            features.image.embedding,
            features.text.embedding,
            keys.image,
            keys.text,
            features.positive_index,
            features.temperature,
            weights=weights,
            key_mask=keys.valid,
            weight_sum=weight_sum,
            query_groups=features.groups,
            key_groups=keys.groups,
        )
        terms = {"inst": inst["loss"], "inst_i2t": inst["i2t"], "inst_t2i": inst["t2i"]}
        if features.groups is not None:
            terms["inst_positives"] = inst["positives"]
        terms["loss"] = self.inst.weight * inst["loss"]
        if self.task.enabled:
            terms["task"] = self._task_loss(features, weights, weight_sum)
            terms["loss"] = terms["loss"] + self.task.weight * terms["task"]
        if self.token_level:
            for name, (loss, accuracy) in self._token_losses(masked, image_tokens).items():
                terms[name], terms[f"{name}_acc"] = loss, accuracy
                terms["loss"] = terms["loss"] + getattr(self, name).weight * loss
        if self.vilem.enabled:
            if errors is None:
                raise ValueError("objective.vilem is on but no edited captions / predictions were given")
            result = self.error_terms(*errors)
            terms.update(
                vilem=result["loss"],
                vilem_det=result["detection"],
                vilem_cor=result["correction"],
                vilem_det_acc=result["detection_accuracy"],
                vilem_cor_acc=result["correction_accuracy"],
            )
            terms["loss"] = terms["loss"] + self.vilem.weight * result["loss"]
        return terms

    def error_terms(self, edited: EditedCaptions, predicted: ErrorPredictions) -> dict[str, torch.Tensor]:
        """``vilem_loss`` normalised by the global mean counts of scored and replaced tokens."""
        scored = _global_mean((edited.detection_labels != IGNORE_INDEX).sum())
        replaced = _global_mean(edited.replaced.sum())
        return vilem_loss(
            predicted.detection_logits,
            edited.detection_labels,
            predicted.correction_logits,
            edited.correction_labels,
            scored,
            replaced,
        )

    def _token_losses(
        self, masked: MaskedPredictions | None, image_tokens: torch.Tensor | None
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(loss, accuracy) of CMVM and CMLM, each normalised by the global mean count of predicted
        positions, so that DDP's gradient mean equals the one-process mean over all of them.

        Not weighted by the AMF: METHOD §6 filters the positive terms of L_inst and L_task, while a
        masked token stays a valid target whatever its caption.
        """
        if masked is None:
            raise ValueError("objective.cmvm / objective.cmlm are on but no masked predictions were given")
        out = {}
        if self.cmvm.enabled:
            patch_mask = masked.patch_mask  # B_m x P
            if image_tokens is None or image_tokens[0].numel() != patch_mask.shape[1]:
                got = None if image_tokens is None else tuple(image_tokens.shape[1:])
                raise ValueError(
                    f"CMVM targets of shape {got} for {patch_mask.shape[1]} patches: "
                    "check data.image_tokens.dvae_input_size against the ViT patch grid"
                )
            result = cmvm_loss(masked.cmvm_logits, image_tokens, patch_mask, _global_mean(patch_mask.sum()))
            out["cmvm"] = (result["loss"], result["accuracy"])
        if self.cmlm.enabled:
            labels = masked.mlm_labels  # B_m x L
            result = cmlm_loss(masked.cmlm_logits, labels, _global_mean((labels != IGNORE_INDEX).sum()))
            out["cmlm"] = (result["loss"], result["accuracy"])
        return out

    def _task_loss(
        self, features: PairFeatures, weights: torch.Tensor | None, weight_sum: torch.Tensor | None
    ) -> torch.Tensor:
        image_queue, text_queue, queue_valid = features.keys.queue()  # (K, D), (K, D), (K,)
        if self.task.temperature is not None:
            temperature = torch.tensor(self.task.temperature, device=image_queue.device)
        else:
            # The model's tau as a constant: both distributions flatten as tau grows, so the KL alone would
            # drive tau to its upper bound; tau is learned by L_inst.
            temperature = features.temperature.detach()
        return task_kl_loss(
            features.image.embedding,
            features.text.embedding,
            features.image_momentum,
            features.text_momentum,
            image_queue,
            text_queue,
            temperature,
            queue_mask=queue_valid,
            direction=self.task.direction,
            weights=weights,
            weight_sum=weight_sum,
        )["loss"]
