"""The COTS network: online encoders, their momentum twins, the queues, the temperature and the MVLM heads.

It computes features, keys and masked-token logits; losses live in ``cots.losses`` and
``cots.step.compute_step`` orders forward -> filter -> masked passes -> objective -> enqueue.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cots import distributed
from cots.masking import IGNORE_INDEX
from cots.models.mvlm_heads import CMLMHead, CMVMHead
from cots.models.two_stream import TowerOutput, TwoStreamEncoder
from cots.models.vilem import ErrorModelingHead
from cots.momentum import ema_update_, momentum_copy, parameter_pairs
from cots.queues import PairedFeatureQueue

TEMPERATURE_MIN, TEMPERATURE_MAX = 0.001, 0.5


@dataclass
class PairFeatures:
    """Everything one step computes for a batch of B local pairs (G = B x world size)."""

    image: TowerOutput  # online, with gradient
    text: TowerOutput
    image_momentum: torch.Tensor  # B x D, no gradient
    text_momentum: torch.Tensor  # B x D
    image_keys: torch.Tensor  # G x D, momentum features of the global batch (rank order)
    text_keys: torch.Tensor  # G x D
    positive_index: torch.Tensor  # B, column of each local pair's own key among the G keys
    groups: torch.Tensor | None = None  # B long, pair group of each local pair (data.pair_groups); None = none
    key_groups: torch.Tensor | None = None  # G long, the groups of the global batch keys


@dataclass
class MaskedPredictions:
    """Logits of the masked positions (DESIGN §4); a field is None when its term is off."""

    cmvm_logits: torch.Tensor | None = None  # M_v x V_img, masked patches in row-major batch order
    patch_mask: torch.Tensor | None = None  # B_m x P bool (B_m <= B pairs read), True = patch replaced by [MASK]
    cmlm_logits: torch.Tensor | None = None  # M_t x V_txt, masked tokens in row-major batch order
    mlm_labels: torch.Tensor | None = None  # B_m x L, original id at masked tokens, -100 elsewhere


@dataclass
class ErrorPredictions:
    """ViLEM's logits on edited captions (DESIGN §7)."""

    detection_logits: torch.Tensor  # B x L, replaced vs kept
    correction_logits: torch.Tensor  # M x V_txt at the replaced positions, row-major


class COTSModel(nn.Module):
    """Online two-stream encoder + momentum copy + paired feature queues + learnable temperature + MVLM heads.

    The heads sit outside ``encoder``, so the momentum copy has none; each exists only while its
    term is on (DDP rejects parameters that get no gradient).

    Args:
        encoder: the online :class:`TwoStreamEncoder`.
        queue_size: K, past pairs kept in the image and text queues.
        temperature: initial tau (stored as log, clamped to [0.001, 0.5]).
        learn_temperature: whether tau is trained.
        cmvm_head: build the CMVM head (needs ``image_vocab_size`` and the tower's ``mask_embedding``).
        cmlm_head: build the CMLM head (its decoder is the text tower's word embedding matrix).
        image_vocab_size: dVAE vocabulary scored by the CMVM head (8192 for DALL-E).
        vilem_head: build ViLEM's interaction and heads (training only; see ``cots.models.vilem``).
        vilem_layers: M1, text layers run with the image injection and cross-attention; None = half the depth.
        vilem_heads: cross-attention heads; None = the text tower's.
    """

    def __init__(
        self,
        encoder: TwoStreamEncoder,
        queue_size: int = 65536,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        cmvm_head: bool = False,
        cmlm_head: bool = False,
        image_vocab_size: int | None = None,
        vilem_head: bool = False,
        vilem_layers: int | None = None,
        vilem_heads: int | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.momentum_encoder = momentum_copy(encoder)
        self.feature_queue = PairedFeatureQueue(queue_size, encoder.embed_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learn_temperature)
        self._ema_pairs: tuple[list, list] | None = None
        image_width, text_width = encoder.image_tower.width, encoder.text_tower.width
        self.cmvm_head: CMVMHead | None = None
        self.cmlm_head: CMLMHead | None = None
        if cmvm_head:
            if not image_vocab_size:
                raise ValueError("the CMVM head needs the dVAE vocabulary: set data.image_tokens.vocab_size")
            if encoder.image_tower.mask_embedding is None:
                raise ValueError("the CMVM head needs model.encoder.image_tower.mask_embedding=true")
            self.cmvm_head = CMVMHead(image_width, text_width, image_vocab_size)
        if cmlm_head:
            self.cmlm_head = CMLMHead(text_width, image_width, encoder.text_tower.word_embeddings)
        self.vilem_head: ErrorModelingHead | None = None
        if vilem_head:
            self.vilem_head = ErrorModelingHead(encoder.text_tower, image_width, vilem_layers, vilem_heads)

    @property
    def queue_size(self) -> int:
        return self.feature_queue.size

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(TEMPERATURE_MIN, TEMPERATURE_MAX)

    @torch.no_grad()
    def clamp_temperature_(self) -> None:
        """Put log tau back inside [log 0.001, log 0.5] after an optimizer step (as ALBEF does).

        The clamp in :meth:`temperature` alone has zero gradient outside the range: Adam's momentum
        could carry the parameter past a bound, where it would stick.
        """
        self.log_temperature.clamp_(math.log(TEMPERATURE_MIN), math.log(TEMPERATURE_MAX))

    def train(self, mode: bool = True) -> COTSModel:
        super().train(mode)
        # Keys come from the momentum encoder without dropout: stable targets for the queue.
        self.momentum_encoder.eval()
        return self

    def compile_towers(self, **options) -> None:
        """``torch.compile`` the forward of the four towers (online and momentum) in place.

        In place (``nn.Module.compile``), so parameter names and checkpoints stay those of the eager
        model; the losses, queues and EMA stay eager. ``options`` go to ``torch.compile`` (backend, mode,
        dynamic, ...); variable caption lengths make the text towers recompile once, then run dynamic.
        """
        for encoder in (self.encoder, self.momentum_encoder):
            encoder.image_tower.compile(**options)
            encoder.text_tower.compile(**options)

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """One EMA step of every momentum parameter; call once per optimizer step."""
        if self._ema_pairs is None:
            self._ema_pairs = parameter_pairs(self.encoder, self.momentum_encoder)
        ema_update_(*self._ema_pairs, m)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                groups: torch.Tensor | None = None) -> PairFeatures:
        """Online features and gathered momentum keys for a batch.

        Args:
            images: (B, 3, H, W); input_ids, attention_mask: (B, L).
            groups: (B,) long pair groups (pairs of one group are positives of each other), or None.
        """
        image = self.encoder.encode_image(images)
        text = self.encoder.encode_text(input_ids, attention_mask)
        with torch.no_grad():
            image_m = self.momentum_encoder.encode_image(images).embedding  # B x D
            text_m = self.momentum_encoder.encode_text(input_ids, attention_mask).embedding  # B x D
            image_keys = distributed.all_gather_no_grad(image_m)  # G x D
            text_keys = distributed.all_gather_no_grad(text_m)  # G x D
            key_groups = None if groups is None else distributed.all_gather_no_grad(groups)  # G
        batch = images.shape[0]
        positive_index = distributed.rank() * batch + torch.arange(batch, device=images.device)
        return PairFeatures(image, text, image_m, text_m, image_keys, text_keys, positive_index, groups, key_groups)

    def predict_masked(
        self,
        features: PairFeatures,
        images: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
        mlm_input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
    ) -> MaskedPredictions:
        """Masked forward passes of the online towers and the heads' logits (DESIGN §4).

        Each masked state is fused with the paired modality's global feature from the unmasked
        pass of ``features`` (with gradient). Retrieval embeddings never pass through here.
        The masked inputs may hold the first B_m <= B pairs of the batch (``objective.masked_pairs``);
        they are fused with the same rows of ``features``.

        Args:
            features: this step's unmasked pass (``forward``) of B pairs.
            images, patch_mask: (B_m, 3, H, W) and (B_m, P) bool for CMVM (both or neither).
            mlm_input_ids, attention_mask, mlm_labels: (B_m, L) each for CMLM (all or none).
        """
        out = MaskedPredictions()
        if patch_mask is not None:
            if self.cmvm_head is None:
                raise ValueError("a patch mask was given but the model has no CMVM head (model.cmvm_head=false)")
            _, patches = self.encoder.image_tower(images, patch_mask)  # B_m x P x W_v
            text_global = features.text.cls[: len(patch_mask)]  # B_m x W_t
            out.cmvm_logits = self.cmvm_head(patches, text_global, patch_mask)  # M_v x V_img
            out.patch_mask = patch_mask
        if mlm_labels is not None:
            if self.cmlm_head is None:
                raise ValueError("MLM labels were given but the model has no CMLM head (model.cmlm_head=false)")
            _, states = self.encoder.text_tower(mlm_input_ids, attention_mask)  # B_m x L x W_t
            image_global = features.image.cls[: len(mlm_labels)]  # B_m x W_v
            out.cmlm_logits = self.cmlm_head(states, image_global, mlm_labels != IGNORE_INDEX)  # M_t x V_txt
            out.mlm_labels = mlm_labels
        return out

    @torch.no_grad()
    def cmlm_generator_logits(self, masked_ids: torch.Tensor, attention_mask: torch.Tensor,
                              image_global: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The CMLM head as ViLEM's error generator: (M, V_txt) logits at the chosen [MASK] positions.

        Args:
            masked_ids, attention_mask: (B, L) captions with [MASK] at the chosen positions.
            image_global: (B, W_v) image [CLS]; chosen: (B, L) bool.
        """
        if self.cmlm_head is None:
            raise ValueError("objective.vilem.generator=cmlm uses the CMLM head: set objective.cmlm.enabled=true "
                             "(with data.text_mask), or point objective.vilem.generator to a local masked-LM directory")
        _, states = self.encoder.text_tower(masked_ids, attention_mask)  # B x L x W_t
        return self.cmlm_head(states, image_global, chosen).float()  # M x V_txt

    def predict_errors(self, image_global: torch.Tensor, image_patches: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor, replaced: torch.Tensor) -> ErrorPredictions:
        """ViLEM's detection and correction logits for edited captions against their images.

        Args:
            image_global: (B, W_v) online image [CLS] of the unmasked pass (with gradient in training).
            image_patches: (B, P, W_v) its patch tokens.
            input_ids, attention_mask: (B, L) the edited captions; replaced: (B, L) bool.
        """
        if self.vilem_head is None:
            raise ValueError("objective.vilem is on but the model has no ViLEM head (model.vilem_head=false)")
        detection, correction = self.vilem_head(self.encoder.text_tower, input_ids, attention_mask,
                                                image_global, image_patches, replaced)
        return ErrorPredictions(detection, correction)

    def queue_keys(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queues Q^v, Q^t (K, D) and their validity mask (K,): False for slots not yet written."""
        queue = self.feature_queue
        return queue.image.data, queue.text.data, queue.valid_mask()

    def keys_with_queue(self, features: PairFeatures) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[global batch keys ; queue] for both modalities and the validity mask: (G+K, D), (G+K, D), (G+K,)."""
        image_queue, text_queue, queue_valid = self.queue_keys()
        image_keys = torch.cat([features.image_keys, image_queue.to(features.image_keys.dtype)])
        text_keys = torch.cat([features.text_keys, text_queue.to(features.text_keys.dtype)])
        batch_valid = torch.ones(features.image_keys.shape[0], dtype=torch.bool, device=image_keys.device)
        return image_keys, text_keys, torch.cat([batch_valid, queue_valid])

    def key_groups_with_queue(self, features: PairFeatures) -> torch.Tensor | None:
        """The pair groups of [global batch keys ; queue] (G+K,), None when the batch carries no groups."""
        if features.key_groups is None:
            return None
        return torch.cat([features.key_groups, self.feature_queue.groups.data])

    @torch.no_grad()
    def enqueue(self, features: PairFeatures) -> None:
        """Push the global batch's momentum features; identical on every rank."""
        self.feature_queue.enqueue(features.image_keys, features.text_keys, features.key_groups)
