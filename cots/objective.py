"""The pretraining objective: each term of DESIGN §3–7 with its own switch and weight."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from cots import distributed
from cots.amf import AdaptiveMomentumFilter, AMFDecision
from cots.losses.instance import instance_contrastive_loss
from cots.losses.task import TASK_DIRECTIONS, task_kl_loss
from cots.models.cots_model import COTSModel, PairFeatures


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


def _settings(cls, value, default_enabled: bool):
    if isinstance(value, cls):
        return value
    if value is None:
        return cls(enabled=default_enabled)
    return cls(**(dict(value) if isinstance(value, Mapping) else value))


class COTSObjective(nn.Module):
    """L = w_inst * L_inst + w_task * L_task (+ the token and ViLEM terms as they are switched on).

    A module because the AMF's similarity queue is state that must live in checkpoints.
    Terms left out of the config are off (old run configs keep their meaning).

    Args:
        inst: switch and weight of the instance-level contrast.
        task: switch, weight, direction and temperature of the task-level KL.
        amf: switch, ``k`` and ``queue_size`` of the Adaptive Momentum Filter.
    """

    def __init__(self, inst: Mapping | LossTerm | None = None, task: Mapping | TaskTerm | None = None,
                 amf: Mapping | AMFSettings | None = None) -> None:
        super().__init__()
        self.inst = _settings(LossTerm, inst, default_enabled=True)
        self.task = _settings(TaskTerm, task, default_enabled=False)
        self.amf_settings = _settings(AMFSettings, amf, default_enabled=False)
        if not self.inst.enabled:
            raise ValueError("objective.inst.enabled=false leaves no retrieval objective; the queues need it")
        if self.task.direction not in TASK_DIRECTIONS:
            raise ValueError(f"objective.task.direction must be one of {TASK_DIRECTIONS}, got {self.task.direction!r}")
        if self.task.temperature is not None and not self.task.temperature > 0:
            raise ValueError(f"objective.task.temperature must be positive or null, got {self.task.temperature}")
        self.amf: AdaptiveMomentumFilter | None = None
        if self.amf_settings.enabled:
            self.amf = AdaptiveMomentumFilter(self.amf_settings.queue_size, self.amf_settings.k)

    def filter_pairs(self, features: PairFeatures) -> AMFDecision | None:
        """The AMF decision for this step (before the losses and the enqueue); None when AMF is off."""
        if self.amf is None:
            return None
        return self.amf(features.image_keys, features.text_keys, features.positive_index)

    def forward(self, model: COTSModel, features: PairFeatures, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss terms for one step; ``loss`` is the weighted total, the rest are for logging.

        Args:
            weights: (B,) per-pair positive weights (AMF), None = all ones.
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
        )
        terms = {"inst": inst["loss"], "inst_i2t": inst["i2t"], "inst_t2i": inst["t2i"]}
        terms["loss"] = self.inst.weight * inst["loss"]
        if self.task.enabled:
            # The queue rows of the concatenated keys: a copy, so the enqueue after this step cannot
            # overwrite what backward needs.
            batch = features.image_keys.shape[0]
            queues = (image_keys[batch:], text_keys[batch:], key_mask[batch:])
            task = self._task_loss(features, queues, temperature, weights, weight_sum)
            terms["task"] = task
            terms["loss"] = terms["loss"] + self.task.weight * task
        return terms

    def _task_loss(self, features: PairFeatures, queues: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                   temperature: torch.Tensor, weights: torch.Tensor | None, weight_sum: torch.Tensor | None) -> torch.Tensor:
        image_queue, text_queue, queue_mask = queues  # (K, D), (K, D), (K,)
        if self.task.temperature is not None:
            temperature = torch.tensor(self.task.temperature, device=image_queue.device)
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
