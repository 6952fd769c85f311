"""One training step's losses, shared by ``COTSLitModule.training_step`` and ``bench/step.py``.

forward (online + momentum keys) -> AMF filter -> masked passes (CMVM / CMLM) -> ViLEM edits -> objective,
then, once the losses exist, the enqueue. Backward, the optimizer and the momentum update stay
with the caller (Lightning, or the benchmark's own loop).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from cots.amf import AMFDecision
from cots.error_generation import EditedCaptions
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
        inputs.update(mlm_input_ids=_field(batch, "mlm_input_ids", "data.text_mask"),
                      attention_mask=batch["attention_mask"], mlm_labels=_field(batch, "mlm_labels", "data.text_mask"))
    return inputs


def first_pairs(batch: Mapping, pairs: int | None) -> Mapping:
    """The batch's first ``pairs`` pairs (every tensor cut along dim 0); the batch itself when None."""
    if pairs is None:
        return batch
    return {key: value[:pairs] if isinstance(value, torch.Tensor) else value for key, value in batch.items()}


def compute_step(model: COTSModel, objective: COTSObjective, batch: Mapping) -> StepOutput:
    """The losses of one training step (nothing enqueued yet: see :func:`enqueue_step`).

    Args:
        batch: ``images`` (B, 3, H, W), ``input_ids`` / ``attention_mask`` (B, L); with CMVM
            ``patch_mask`` (B, P) and ``image_tokens`` (B, h, w) or ``images_dvae`` (B, 3, s, s);
            with CMLM ``mlm_input_ids`` / ``mlm_labels`` (B, L); with ``data.pair_groups``
            ``pair_groups`` (B,). The masked passes read the first ``objective.masked_pairs`` pairs.
    """
    features = model(batch["images"], batch["input_ids"], batch["attention_mask"], batch.get("pair_groups"))
    decision = objective.filter_pairs(features)
    masked, image_tokens = None, None
    if objective.token_level:
        head = first_pairs(batch, objective.masked_pairs)  # B_m <= B pairs
        masked = model.predict_masked(features, **masked_inputs(objective, head))
        image_tokens = objective.image_targets(head) if objective.cmvm.enabled else None
    errors = None
    if objective.vilem.enabled:  # training only: retrieval features above never see ViLEM's interaction
        edited = objective.edit_captions(model, batch["input_ids"], batch["attention_mask"], features.image.cls)
        predicted = model.predict_errors(features.image.cls, features.image.tokens, edited.input_ids,
                                         edited.attention_mask, edited.replaced)
        errors = (edited, predicted)
    weights = None if decision is None else decision.weights
    terms = objective(model, features, weights=weights, masked=masked, image_tokens=image_tokens, errors=errors)
    return StepOutput(terms, features, decision, masked, errors)


@torch.no_grad()
def enqueue_step(model: COTSModel, objective: COTSObjective, step: StepOutput) -> None:
    """Push the step's momentum keys and AMF similarities; filtered pairs too (they stay useful negatives)."""
    model.enqueue(step.features)
    if step.decision is not None:
        objective.amf.enqueue(step.decision.similarities)  # after this step's decision
