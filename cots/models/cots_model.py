"""The COTS network: online encoders, their momentum twins, the queues, the temperature and the MVLM heads.

It computes features, the keys every query is scored against, the temperature and masked-token logits;
the losses live in ``cots.losses`` and ``cots.training_step`` orders forward -> filter -> targets -> masked
passes -> edits -> objective -> enqueue.
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
class KeySet:
    """What every query of a step is scored against (METHOD §3): this step's gathered momentum keys, then the
    queue as it was before the step (a copy: the enqueue after the losses cannot change what backward reads).

    G = global batch, K = queue size; row G + j of both modalities is queue row j, i.e. one past pair.
    """

    image: torch.Tensor  # (G+K) x D
    text: torch.Tensor  # (G+K) x D
    valid: torch.Tensor  # G+K bool, False for queue slots never written
    groups: torch.Tensor | None  # G+K long pair groups (data.pair_groups), None when the batch carries none
    num_batch: int  # G

    def queue(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q^v, Q^t (K, D) and their validity (K,): the rows after the batch keys."""
        g = self.num_batch
        return self.image[g:], self.text[g:], self.valid[g:]


@dataclass
class PairFeatures:
    """Everything the model computes for a batch of B local pairs (G = B x world size): what the filter,
    the objective and the enqueue of the step read, so that none of them calls back into the model."""

    image: TowerOutput  # online, with gradient
    text: TowerOutput
    image_momentum: torch.Tensor  # B x D, no gradient
    text_momentum: torch.Tensor  # B x D
    keys: KeySet  # [gathered batch keys ; queue] of both modalities
    positive_index: torch.Tensor  # B, column of each local pair's own key among the keys
    temperature: torch.Tensor  # 0-dim tau, clamped to [0.001, 0.5] (with gradient when learned)
    groups: torch.Tensor | None = None  # B long, pair group of each local pair (data.pair_groups); None = none

    @property
    def image_keys(self) -> torch.Tensor:
        """G x D momentum image features of the global batch (rank order): what the step enqueues."""
        return self.keys.image[: self.keys.num_batch]

    @property
    def text_keys(self) -> torch.Tensor:
        """G x D momentum text features of the global batch."""
        return self.keys.text[: self.keys.num_batch]

    @property
    def key_groups(self) -> torch.Tensor | None:
        """G pair groups of the global batch keys."""
        return None if self.keys.groups is None else self.keys.groups[: self.keys.num_batch]


@dataclass
class MaskedPredictions:
    """Logits of the masked positions (METHOD §4); a field is None when its term is off."""

    cmvm_logits: torch.Tensor | None = None  # M_v x V_img, masked patches in row-major batch order
    patch_mask: torch.Tensor | None = None  # B_m x P bool (B_m <= B pairs read), True = patch replaced by [MASK]
    cmlm_logits: torch.Tensor | None = None  # M_t x V_txt, masked tokens in row-major batch order
    mlm_labels: torch.Tensor | None = None  # B_m x L, original id at masked tokens, -100 elsewhere


@dataclass
class ErrorPredictions:
    """ViLEM's logits on edited captions (METHOD §7)."""

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
        init_from, init_heads: the config's fine-tuning start (``model.init_from``), loaded by ``cots-train``
            (``cots/init_from.py``) once the source's caption tokenizer has sized the text tower. Accepted so that
            ``instantiate(cfg.model)`` builds the model of any config; refused when set, as no weights load here.
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
        init_from: str | None = None,
        init_heads: bool = False,
    ) -> None:
        if init_from:
            raise ValueError(
                f"model.init_from={init_from}: COTSModel loads no weights; cots-train does (cots.train.start_source)"
            )
        super().__init__()
        self.encoder = encoder
        self.momentum_encoder = momentum_copy(encoder)
        self.feature_queue = PairedFeatureQueue(queue_size, encoder.embed_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learn_temperature)
        self._ema_pairs: tuple[list, list] | None = None
        image_width, text_width = encoder.image_tower.width, encoder.text_tower.width
        self.cmvm_head: CMVMHead | None = None
        self.cmlm_head: CMLMHead | None = None
        if cmvm_head:  # its vocabulary and the tower's [MASK] embedding are checked at start-up (config_checks)
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

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        groups: torch.Tensor | None = None,
    ) -> PairFeatures:
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
            keys = self._key_set(image_keys, text_keys, key_groups)
        batch = images.shape[0]
        positive_index = distributed.rank() * batch + torch.arange(batch, device=images.device)
        return PairFeatures(image, text, image_m, text_m, keys, positive_index, self.temperature(), groups)

    def _key_set(self, image_keys: torch.Tensor, text_keys: torch.Tensor, key_groups: torch.Tensor | None) -> KeySet:
        """[batch keys (G, D) ; queue (K, D)] of both modalities, their validity and groups."""
        queue = self.feature_queue
        image = torch.cat([image_keys, queue.image.data.to(image_keys.dtype)])  # (G+K) x D
        text = torch.cat([text_keys, queue.text.data.to(text_keys.dtype)])  # (G+K) x D
        batch_valid = torch.ones(image_keys.shape[0], dtype=torch.bool, device=image.device)
        valid = torch.cat([batch_valid, queue.valid_mask()])  # G+K
        groups = None if key_groups is None else torch.cat([key_groups, queue.groups.data])  # G+K
        return KeySet(image, text, valid, groups, image_keys.shape[0])

    def predict_masked(
        self,
        features: PairFeatures,
        images: torch.Tensor | None = None,
        patch_mask: torch.Tensor | None = None,
        mlm_input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
    ) -> MaskedPredictions:
        """Masked forward passes of the online towers and the heads' logits (METHOD §4).

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
    def cmlm_generator_logits(
        self,
        masked_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_global: torch.Tensor | None,
        chosen: torch.Tensor,
    ) -> torch.Tensor:
        """The CMLM head as ViLEM's error generator: (M, V_txt) logits at the chosen [MASK] positions.

        Args:
            masked_ids, attention_mask: (B, L) captions with [MASK] at the chosen positions.
            image_global: (B, W_v) image [CLS], or None for the text-only generator (no fusion with the image).
            chosen: (B, L) bool.
        """
        if self.cmlm_head is None:
            raise ValueError(
                "objective.vilem.generator=cmlm uses the CMLM head: set objective.cmlm.enabled=true "
                "(with data.text_mask), or point objective.vilem.generator to a local masked-LM directory"
            )
        _, states = self.encoder.text_tower(masked_ids, attention_mask)  # B x L x W_t
        return self.cmlm_head(states, image_global, chosen).float()  # M x V_txt

    def predict_errors(
        self,
        image_global: torch.Tensor,
        image_patches: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        replaced: torch.Tensor,
    ) -> ErrorPredictions:
        """ViLEM's detection and correction logits for edited captions against their images.

        Args:
            image_global: (B, W_v) online image [CLS] of the unmasked pass (with gradient in training).
            image_patches: (B, P, W_v) its patch tokens.
            input_ids, attention_mask: (B, L) the edited captions; replaced: (B, L) bool.
        """
        if self.vilem_head is None:
            raise ValueError("objective.vilem is on but the model has no ViLEM head (model.vilem_head=false)")
        detection, correction = self.vilem_head(
            self.encoder.text_tower, input_ids, attention_mask, image_global, image_patches, replaced
        )
        return ErrorPredictions(detection, correction)

    @torch.no_grad()
    def enqueue(self, features: PairFeatures) -> None:
        """Push the global batch's momentum features (G, D) and groups; identical on every rank."""
        self.feature_queue.enqueue(features.image_keys, features.text_keys, features.key_groups)
