"""One training step, read top to bottom (METHOD §9): forward -> filter -> targets -> masked passes -> edits ->
objective, then, once the losses exist, the enqueue.

Each stage consumes what the one before produced; nothing calls back up. Backward, the optimizer and
the momentum update stay with the caller (``COTSLitModule``, or a benchmark's own loop). The stages'
pieces (the AMF filter, the CMVM targets, the caption editor) are built from the objective and data
configs by :meth:`TrainingStep.from_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from cots.amf import AdaptiveMomentumFilter, AMFDecision
from cots.error_generation import CaptionEditor, EditedCaptions
from cots.image_targets import ImageTargets
from cots.models.cots_model import COTSModel, ErrorPredictions, MaskedPredictions, PairFeatures
from cots.objective import COTSObjective


@dataclass
class StepOutput:
    """What one step computed: the loss terms, the features whose keys are enqueued, the AMF decision."""

    terms: dict[str, torch.Tensor]  # "loss" (weighted total, with gradient) and the logged terms
    features: PairFeatures
    decision: AMFDecision | None  # None when AMF is off
    masked: MaskedPredictions | None  # None when CMVM and CMLM are off
    errors: tuple[EditedCaptions, ErrorPredictions] | None = None  # ViLEM's edits and predictions, when on


def _field(batch: Mapping, key: str, config_key: str) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"the batch has no '{key}': the objective needs {config_key} to be set")
    return batch[key]


def masked_inputs(objective: COTSObjective, batch: Mapping) -> dict[str, torch.Tensor]:
    """Arguments of ``COTSModel.predict_masked`` for the terms that are on."""
    inputs = {}
    if objective.cmvm.enabled:
        inputs.update(images=batch["images"], patch_mask=_field(batch, "patch_mask", "data.image_tokens.block_mask"))
    if objective.cmlm.enabled:
        inputs.update(
            mlm_input_ids=_field(batch, "mlm_input_ids", "data.text_mask"),
            attention_mask=batch["attention_mask"],
            mlm_labels=_field(batch, "mlm_labels", "data.text_mask"),
        )
    return inputs


def first_pairs(batch: Mapping, pairs: int | None) -> Mapping:
    """The batch's first ``pairs`` pairs (every tensor cut along dim 0); the batch itself when None."""
    if pairs is None:
        return batch
    return {key: value[:pairs] if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def predict_caption_errors(
    model: COTSModel,
    editor: CaptionEditor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    image_global: torch.Tensor,
    image_patches: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[EditedCaptions, ErrorPredictions]:
    """ViLEM (METHOD §7): edit the captions, then let the model find and correct the edits against the images.

    Args:
        input_ids, attention_mask: (B, L) clean captions.
        image_global, image_patches: (B, W_v) and (B, P, W_v), the paired images' unmasked pass.
        generator: seeded edits (validation); None = the global RNG (training).
    """
    edited = editor(model, input_ids, attention_mask, image_global, generator)
    predicted = model.predict_errors(
        image_global, image_patches, edited.input_ids, edited.attention_mask, edited.replaced
    )
    return edited, predicted


class TrainingStep:
    """The objective and the pieces around it that one step uses, in the order it uses them.

    (A plain class, not a dataclass: Hydra would turn a dataclass argument into a config.)

    Args:
        objective: weighs and sums the terms.
        amf: the Adaptive Momentum Filter (its similarity queue is state: the LightningModule registers it).
        image_targets: CMVM's dVAE targets, when CMVM is on.
        caption_editor: ViLEM's error generator, when ViLEM is on.
    """

    def __init__(
        self,
        objective: COTSObjective,
        amf: AdaptiveMomentumFilter | None = None,
        image_targets: ImageTargets | None = None,
        caption_editor: CaptionEditor | None = None,
    ) -> None:
        self.objective = objective
        self.amf = amf
        self.image_targets = image_targets
        self.caption_editor = caption_editor

    @classmethod
    def from_config(cls, objective: COTSObjective, image_tokens: Mapping | None = None) -> TrainingStep:
        """The pieces the objective's switches ask for; ``image_tokens`` is ``data.image_tokens``."""
        amf = None
        if objective.amf.enabled:
            amf = AdaptiveMomentumFilter(objective.amf.queue_size, objective.amf.k)
        # Cached targets need no settings (the batch carries them); the online path needs the dVAE's.
        targets = ImageTargets(**dict(image_tokens or {})) if objective.cmvm.enabled else None
        editor = None
        if objective.vilem.enabled:
            vilem = objective.vilem
            if vilem.mask_id is None or vilem.special_ids is None or not vilem.vocab_size:
                raise ValueError(
                    "objective.vilem needs the caption tokenizer's mask_id, special_ids and vocab_size "
                    "(cots-train fills them in; set them when building the objective yourself)"
                )
            editor = CaptionEditor(
                vilem.ratio, vilem.top_k, vilem.generator, vilem.mask_id, vilem.special_ids, vilem.vocab_size
            )
        return cls(objective, amf, targets, editor)

    def __call__(self, model: COTSModel, batch: Mapping) -> StepOutput:
        """The losses of one training step (nothing enqueued yet: see :meth:`enqueue`).

        Args:
            batch: ``images`` (B, 3, H, W), ``input_ids`` / ``attention_mask`` (B, L); with CMVM
                ``patch_mask`` (B, P) and ``image_tokens`` (B, h, w) or ``images_dvae`` (B, 3, s, s);
                with CMLM ``mlm_input_ids`` / ``mlm_labels`` (B, L); with ``data.pair_groups``
                ``pair_groups`` (B,). The masked passes read the first ``objective.masked_pairs`` pairs.
        """
        objective = self.objective
        features = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch.get("pair_groups"))
        decision = (
            None if self.amf is None else self.amf(features.image_keys, features.text_keys, features.positive_index)
        )
        head = first_pairs(batch, objective.masked_pairs)  # B_m <= B pairs for the masked passes
        targets = self.image_targets(head) if objective.cmvm.enabled else None  # B_m x h x w dVAE ids
        masked = model.predict_masked(features, **masked_inputs(objective, head)) if objective.token_level else None
        errors = None
        if objective.vilem.enabled:  # training only: the retrieval features above never see ViLEM's interaction
            errors = predict_caption_errors(
                model,
                self.caption_editor,
                batch["input_ids"],
                batch["attention_mask"],
                features.image.cls,
                features.image.tokens,
            )
        weights = None if decision is None else decision.weights
        terms = objective(features, weights, masked, targets, errors)
        return StepOutput(terms, features, decision, masked, errors)

    @torch.no_grad()
    def enqueue(self, model: COTSModel, out: StepOutput) -> None:
        """Push the step's momentum keys and AMF similarities; filtered pairs too (they stay useful negatives)."""
        model.enqueue(out.features)
        if out.decision is not None:
            self.amf.enqueue(out.decision.similarities)  # after this step's decision
