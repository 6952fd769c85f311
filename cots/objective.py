"""The pretraining objective: each term of DESIGN §3–7 with its own switch and weight."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cots import distributed
from cots.losses.instance import instance_contrastive_loss
from cots.models.cots_model import COTSModel, PairFeatures


@dataclass
class LossTerm:
    """A switch and a weight; ``enabled: false`` skips the term's computation entirely."""

    enabled: bool = True
    weight: float = 1.0


class COTSObjective:
    """L = w_inst * L_inst (+ the token, task and ViLEM terms as they are switched on).

    Args:
        inst: switch and weight of the instance-level contrast.
    """

    def __init__(self, inst: dict | LossTerm | None = None) -> None:
        self.inst = inst if isinstance(inst, LossTerm) else LossTerm(**(inst or {}))
        if not self.inst.enabled:
            raise ValueError("objective.inst.enabled=false leaves no retrieval objective; the queues need it")

    def __call__(self, model: COTSModel, features: PairFeatures, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss terms for one step; ``loss`` is the weighted total, the rest are for logging.

        Args:
            weights: (B,) per-pair positive weights (AMF), None = all ones.
        """
        image_keys, text_keys, key_mask = model.keys_with_queue(features)
        weight_sum = None
        if weights is not None:
            # Normalise by the global number of kept pairs so that DDP's gradient mean equals the 1-process loss.
            weight_sum = distributed.all_reduce_sum(weights.sum()) / distributed.world_size()
        inst = instance_contrastive_loss(
            features.image.embedding,
            features.text.embedding,
            image_keys,
            text_keys,
            features.positive_index,
            model.temperature(),
            weights=weights,
            key_mask=key_mask,
            weight_sum=weight_sum,
        )
        terms = {"inst": inst["loss"], "inst_i2t": inst["i2t"], "inst_t2i": inst["t2i"]}
        terms["loss"] = self.inst.weight * inst["loss"]
        return terms
