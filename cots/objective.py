"""The pretraining objective: each term of DESIGN §3–7 with its own switch and weight."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from cots import distributed
from cots.amf import AdaptiveMomentumFilter, AMFDecision
from cots.error_generation import (EditedCaptions, MaskedLMGenerator, apply_errors, choose_error_positions,
                                   sample_replacements)
from cots.losses.instance import instance_contrastive_loss
from cots.losses.mvlm import cmlm_loss, cmvm_loss
from cots.losses.task import TASK_DIRECTIONS, task_kl_loss
from cots.losses.vilem import vilem_loss
from cots.masking import IGNORE_INDEX
from cots.models.cots_model import COTSModel, ErrorPredictions, MaskedPredictions, PairFeatures
from cots.online_tokens import OnlineImageTokens


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
    """ViLEM error modeling (DESIGN §7).

    ``ratio`` of each caption's tokens are replaced by a draw from the ``top_k`` of ``generator``
    ('cmlm': the model's own CMLM head, without gradient; or a local Hugging Face masked-LM
    directory sharing the caption vocabulary). ``layers`` (M1, None = half the text depth) and
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


class COTSObjective(nn.Module):
    """L = w_inst * L_inst + w_task * L_task + w_cmvm * L_cmvm + w_cmlm * L_cmlm (+ ViLEM when added).

    A module because the AMF's similarity queue is state that must live in checkpoints.
    Terms left out of the config are off (old run configs keep their meaning).

    Args:
        inst: switch and weight of the instance-level contrast.
        task: switch, weight, direction and temperature of the task-level KL.
        amf: switch, ``k`` and ``queue_size`` of the Adaptive Momentum Filter.
        cmvm, cmlm: switch and weight of the masked vision / language modeling terms.
        masked_pairs: the masked passes (CMVM / CMLM) read the first this many pairs of each local
            batch; None = all. Each masked pass costs about an unmasked one: on a small compute budget a
            part of the batch keeps the token-level terms and buys more steps.
        vilem: ViLEM error modeling, see :class:`ViLEMSettings`.
        image_tokenizer: ``data.image_tokens``, for the online path (batches carrying ``images_dvae``):
            see :class:`OnlineImageTokens`; the dVAE is built on first use, outside the state dict.
    """

    def __init__(self, inst: Mapping | LossTerm | None = None, task: Mapping | TaskTerm | None = None,
                 amf: Mapping | AMFSettings | None = None, cmvm: Mapping | LossTerm | None = None,
                 cmlm: Mapping | LossTerm | None = None, image_tokenizer: Mapping | None = None,
                 vilem: Mapping | ViLEMSettings | None = None, masked_pairs: int | None = None) -> None:
        super().__init__()
        self.inst = _settings(LossTerm, inst, default_enabled=True)
        self.task = _settings(TaskTerm, task, default_enabled=False)
        self.amf_settings = _settings(AMFSettings, amf, default_enabled=False)
        self.cmvm = _settings(LossTerm, cmvm, default_enabled=False)
        self.cmlm = _settings(LossTerm, cmlm, default_enabled=False)
        self.vilem = _settings(ViLEMSettings, vilem, default_enabled=False)
        if masked_pairs is not None and not (type(masked_pairs) is int and masked_pairs >= 1):
            raise ValueError(f"objective.masked_pairs must be a positive integer or null (all pairs), got {masked_pairs!r}")
        self.masked_pairs = masked_pairs
        self._error_generator: MaskedLMGenerator | None = None  # a plain attribute: frozen, not checkpointed
        # A plain attribute, not a submodule: the frozen dVAE is no part of the trained state.
        self.online_tokens: OnlineImageTokens | None = None
        if self.cmvm.enabled and image_tokenizer is not None and image_tokenizer.get("source", "online") == "online":
            self.online_tokens = OnlineImageTokens(**image_tokenizer)
        if not self.inst.enabled:
            raise ValueError("objective.inst.enabled=false leaves no retrieval objective; the queues need it")
        if self.task.direction not in TASK_DIRECTIONS:
            raise ValueError(f"objective.task.direction must be one of {TASK_DIRECTIONS}, got {self.task.direction!r}")
        if self.task.temperature is not None and not self.task.temperature > 0:
            raise ValueError(f"objective.task.temperature must be positive or null, got {self.task.temperature}")
        if self.vilem.enabled:
            self._check_vilem()
        self.amf: AdaptiveMomentumFilter | None = None
        if self.amf_settings.enabled:
            self.amf = AdaptiveMomentumFilter(self.amf_settings.queue_size, self.amf_settings.k)

    def _check_vilem(self) -> None:
        settings = self.vilem
        if not 0 < settings.ratio <= 1:
            raise ValueError(f"objective.vilem.ratio must be in (0, 1], got {settings.ratio}")
        if settings.top_k < 1:
            raise ValueError(f"objective.vilem.top_k must be at least 1, got {settings.top_k}")
        if settings.mask_id is None or settings.special_ids is None or not settings.vocab_size:
            raise ValueError("objective.vilem needs the caption tokenizer's mask_id, special_ids and vocab_size "
                             "(cots-train fills them in; set them when building the objective yourself)")

    def edit_captions(self, model: COTSModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      image_global: torch.Tensor, generator: torch.Generator | None = None) -> EditedCaptions:
        """ViLEM's plausible errors: about ``ratio`` of the tokens replaced from the generator's top-k.

        Args:
            input_ids, attention_mask: (B, L) clean captions.
            image_global: (B, W_v) the paired image [CLS] (read by the CMLM generator's fusion).
            generator: torch Generator for reproducible edits (validation); None = the global RNG.
        """
        settings = self.vilem
        forbidden = sorted(set(settings.special_ids) | {settings.mask_id})
        masked_ids, originals = choose_error_positions(
            input_ids, attention_mask, settings.mask_id, forbidden, settings.vocab_size, settings.ratio, generator)
        chosen = originals != IGNORE_INDEX  # B x L
        if settings.generator == "cmlm":
            logits = model.cmlm_generator_logits(masked_ids, attention_mask, image_global.detach(), chosen)
        else:
            if self._error_generator is None:
                self._error_generator = MaskedLMGenerator(settings.generator, settings.vocab_size)
            logits = self._error_generator(masked_ids, attention_mask, chosen)  # M x V
        replacements = sample_replacements(logits, originals[chosen], settings.top_k, forbidden, generator)
        return apply_errors(input_ids, attention_mask, originals, replacements, forbidden)

    def error_terms(self, edited: EditedCaptions, predicted: ErrorPredictions) -> dict[str, torch.Tensor]:
        """``vilem_loss`` normalised by the global mean counts of scored and replaced tokens."""
        scored = _global_mean((edited.detection_labels != IGNORE_INDEX).sum())
        replaced = _global_mean(edited.replaced.sum())
        return vilem_loss(predicted.detection_logits, edited.detection_labels, predicted.correction_logits,
                          edited.correction_labels, scored, replaced)

    def filter_pairs(self, features: PairFeatures) -> AMFDecision | None:
        """The AMF decision for this step (before the losses and the enqueue); None when AMF is off."""
        if self.amf is None:
            return None
        return self.amf(features.image_keys, features.text_keys, features.positive_index)

    @property
    def token_level(self) -> bool:
        """Whether the step needs masked forward passes (CMVM or CMLM on)."""
        return self.cmvm.enabled or self.cmlm.enabled

    def image_targets(self, batch: Mapping) -> torch.Tensor:
        """dVAE token ids (B, h, w) of the batch's crops: from the token cache, else tokenized here."""
        if "image_tokens" in batch:
            return batch["image_tokens"]
        if "images_dvae" not in batch:
            raise KeyError("objective.cmvm.enabled=true but the batch has no image tokens: set data.image_tokens")
        if self.online_tokens is None:
            raise ValueError("the batch carries dVAE views but data.image_tokens.source is not 'online'")
        return self.online_tokens(batch["images_dvae"])  # B x h x w

    def forward(self, model: COTSModel, features: PairFeatures, weights: torch.Tensor | None = None,
                masked: MaskedPredictions | None = None, image_tokens: torch.Tensor | None = None,
                errors: tuple[EditedCaptions, ErrorPredictions] | None = None) -> dict[str, torch.Tensor]:
        """Loss terms for one step; ``loss`` is the weighted total, the rest are for logging.

        Args:
            weights: (B,) per-pair positive weights (AMF), None = all ones.
            masked: the masked passes' logits (``model.predict_masked``) when CMVM or CMLM is on.
            image_tokens: (B_m, h, w) CMVM targets of the pairs the masked passes read (``image_targets``).
            errors: ViLEM's edited captions and the model's predictions on them, when ViLEM is on.
        """
        image_keys, text_keys, key_mask = model.keys_with_queue(features)
        weight_sum = None
        if weights is not None:
            # Normalise by the global number of kept pairs so that DDP's gradient mean equals the 1-process loss.
            weight_sum = distributed.all_reduce_sum(weights.sum()) / distributed.world_size()
        temperature = model.temperature()
        inst = instance_contrastive_loss(
            features.image.embedding,
            features.text.embedding,
            image_keys,
            text_keys,
            features.positive_index,
            temperature,
            weights=weights,
            key_mask=key_mask,
            weight_sum=weight_sum,
            query_groups=features.groups,
            key_groups=model.key_groups_with_queue(features),
        )
        terms = {"inst": inst["loss"], "inst_i2t": inst["i2t"], "inst_t2i": inst["t2i"]}
        if features.groups is not None:
            terms["inst_positives"] = inst["positives"]
        terms["loss"] = self.inst.weight * inst["loss"]
        if self.task.enabled:
            # The queue rows of the concatenated keys: a copy, so the enqueue after this step cannot
            # overwrite what backward needs.
            batch = features.image_keys.shape[0]
            queues = (image_keys[batch:], text_keys[batch:], key_mask[batch:])
            task = self._task_loss(features, queues, temperature, weights, weight_sum)
            terms["task"] = task
            terms["loss"] = terms["loss"] + self.task.weight * task
        if self.token_level:
            for name, (loss, accuracy) in self._token_losses(masked, image_tokens).items():
                terms[name], terms[f"{name}_acc"] = loss, accuracy
                terms["loss"] = terms["loss"] + getattr(self, name).weight * loss
        if self.vilem.enabled:
            if errors is None:
                raise ValueError("objective.vilem is on but no edited captions / predictions were given")
            result = self.error_terms(*errors)
            terms.update(vilem=result["loss"], vilem_det=result["detection"], vilem_cor=result["correction"],
                         vilem_det_acc=result["detection_accuracy"], vilem_cor_acc=result["correction_accuracy"])
            terms["loss"] = terms["loss"] + self.vilem.weight * result["loss"]
        return terms

    def _token_losses(self, masked: MaskedPredictions | None,
                      image_tokens: torch.Tensor | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(loss, accuracy) of CMVM and CMLM, each normalised by the global mean count of predicted
        positions, so that DDP's gradient mean equals the one-process mean over all of them.

        Not weighted by the AMF: DESIGN §6 filters the positive terms of L_inst and L_task, while a
        masked token stays a valid target whatever its caption.
        """
        if masked is None:
            raise ValueError("objective.cmvm / objective.cmlm are on but no masked predictions were given")
        out = {}
        if self.cmvm.enabled:
            patch_mask = masked.patch_mask  # B x P
            if image_tokens is None or image_tokens[0].numel() != patch_mask.shape[1]:
                got = None if image_tokens is None else tuple(image_tokens.shape[1:])
                raise ValueError(f"CMVM targets of shape {got} for {patch_mask.shape[1]} patches: "
                                 "check data.image_tokens.dvae_input_size against the ViT patch grid")
            result = cmvm_loss(masked.cmvm_logits, image_tokens, patch_mask, _global_mean(patch_mask.sum()))
            out["cmvm"] = (result["loss"], result["accuracy"])
        if self.cmlm.enabled:
            labels = masked.mlm_labels  # B x L
            result = cmlm_loss(masked.cmlm_logits, labels, _global_mean((labels != IGNORE_INDEX).sum()))
            out["cmlm"] = (result["loss"], result["accuracy"])
        return out

    def _task_loss(self, features: PairFeatures, queues: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                   temperature: torch.Tensor, weights: torch.Tensor | None, weight_sum: torch.Tensor | None) -> torch.Tensor:
        image_queue, text_queue, queue_mask = queues  # (K, D), (K, D), (K,)
        if self.task.temperature is not None:
            temperature = torch.tensor(self.task.temperature, device=image_queue.device)
        else:
            # The model's tau as a constant: both distributions flatten as tau grows, so the KL alone would
            # drive tau to its upper bound; tau is learned by L_inst.
            temperature = temperature.detach()
        return task_kl_loss(
            features.image.embedding,
            features.text.embedding,
            features.image_momentum,
            features.text_momentum,
            image_queue,
            text_queue,
            temperature,
            queue_mask=queue_mask,
            direction=self.task.direction,
            weights=weights,
            weight_sum=weight_sum,
        )["loss"]
