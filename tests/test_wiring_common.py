"""Shared pieces of the wiring tests (tests/test_wiring_*.py); this module holds no test.

A tiny :class:`COTSModel` and :class:`TrainingStep` (the objective and its AMF, targets and caption
editor) built in Python, hand-made batches, and the
equations of METHOD §3-7 written out in float64 from the towers' own outputs (:func:`encode`). The
step is reached only through :func:`run_step`, :func:`run_and_enqueue` and :func:`step_loss`: when the
step's call signature changes, adapt those helpers, not the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cots.masking import IGNORE_INDEX, mask_text_tokens
from cots.models.cots_model import COTSModel
from cots.models.image_tower import ImageTower
from cots.models.text_tower import TextTower
from cots.models.two_stream import TwoStreamEncoder
from cots.objective import COTSObjective
from cots.training_step import StepOutput, TrainingStep

TEXT_VOCAB, IMAGE_VOCAB = 60, 32
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL_IDS = [PAD, UNK, CLS, SEP, MASK]
IMAGE_SIZE, PATCH = 32, 8
GRID = IMAGE_SIZE // PATCH  # 4 x 4 patches
NUM_PATCHES = GRID * GRID
WIDTH_V, WIDTH_T, EMBED_DIM = 24, 32, 16  # all different: a swapped tensor fails on its shape
BATCH, LENGTH = 4, 9
QUEUE_SIZE = 12

# -- building -----------------------------------------------------------------------------------------


def vilem_settings(**overrides) -> dict:
    """ViLEM settings with this file's caption ids (what cots-train fills in from the tokenizer)."""
    return {
        "enabled": True,
        "mask_id": MASK,
        "special_ids": SPECIAL_IDS,
        "vocab_size": TEXT_VOCAB,
        "layers": 1,
        **overrides,
    }


def build(
    *,
    queue_size: int = QUEUE_SIZE,
    temperature: float = 0.07,
    learn_temperature: bool = True,
    text_layers: int = 1,
    text_dropout: float = 0.0,
    seed: int = 0,
    image_tokens: dict | None = None,
    **objective,
) -> tuple[COTSModel, TrainingStep]:
    """A tiny model and training step; ``objective`` holds COTSObjective's arguments (inst, task, amf, cmvm, ...),
    ``image_tokens`` the ``data.image_tokens`` settings of the CMVM targets.

    The momentum encoder is moved away from the online one and the zero-initialised cross-modal maps
    (fusions, ViLEM injection and cross-attention output) get random weights: a key taken from the
    wrong encoder, or a global feature taken from the wrong pair, then changes the numbers.
    """
    torch.manual_seed(seed)
    enabled = {name: bool(dict(objective.get(name) or {}).get("enabled", False)) for name in ("cmvm", "cmlm", "vilem")}
    image_tower = ImageTower(
        "vit_tiny_patch16_224",
        img_size=IMAGE_SIZE,
        patch_size=PATCH,
        embed_dim=WIDTH_V,
        depth=1,
        num_heads=2,
        mask_embedding=enabled["cmvm"],
    )
    text_tower = TextTower(
        vocab_size=TEXT_VOCAB,
        hidden_size=WIDTH_T,
        num_layers=text_layers,
        num_heads=2,
        max_length=16,
        dropout=text_dropout,
    )
    spread_text_features(text_tower)
    vilem = dict(objective.get("vilem") or {})
    model = COTSModel(
        TwoStreamEncoder(image_tower, text_tower, EMBED_DIM),
        queue_size=queue_size,
        temperature=temperature,
        learn_temperature=learn_temperature,
        cmvm_head=enabled["cmvm"],
        cmlm_head=enabled["cmlm"],
        image_vocab_size=IMAGE_VOCAB,
        vilem_head=enabled["vilem"],
        vilem_layers=vilem.get("layers"),
        vilem_heads=vilem.get("num_heads"),
    )
    with torch.no_grad():
        for param in model.momentum_encoder.parameters():
            param.add_(0.1 * torch.randn_like(param))
        maps = [head.fusion.proj.weight for head in (model.cmvm_head, model.cmlm_head) if head is not None]
        if model.vilem_head is not None:
            maps += [model.vilem_head.inject.proj.weight, model.vilem_head.corrector.fusion.proj.weight]
            maps += [block.out.weight for block in model.vilem_head.cross_attention]
        for weight in maps:
            weight.normal_(0.0, 0.3)
    return model.train(), TrainingStep.from_config(COTSObjective(**objective), image_tokens)


def spread_text_features(text_tower: TextTower) -> None:
    """Give BERT's layers weights of std 0.2 instead of 0.02.

    At BERT's initialisation the [CLS] state of a one-layer tower hardly depends on the caption (the
    captions' global features differ by 0.2 % of their size): a text feature taken from another pair
    would change the terms below any tolerance. With these weights they differ by about 20 %.
    """
    with torch.no_grad():
        for module in text_tower.bert.encoder.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, 0.2)


def make_batch(seed: int = 0, batch: int = BATCH, mask_prob: float = 0.3) -> dict[str, torch.Tensor]:
    """Images, captions ([CLS] w.. [SEP] [PAD].., two of them padded), BERT-masked captions, patch masks, dVAE ids.

    Shapes: images (B, 3, 32, 32); input_ids, attention_mask, mlm_input_ids, mlm_labels (B, L);
    patch_mask (B, P) with at least one masked and one visible patch per image; image_tokens (B, 4, 4).
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TEXT_VOCAB, (batch, LENGTH), generator=gen)
    lengths = torch.tensor([LENGTH - (i % 2) * (1 + i % 3) for i in range(batch)])  # B
    attention = (torch.arange(LENGTH)[None] < lengths[:, None]).long()  # B x L
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids[attention == 0] = PAD
    mlm_ids, mlm_labels = mask_text_tokens(ids, attention, MASK, SPECIAL_IDS, TEXT_VOCAB, gen, mask_prob=mask_prob)
    patch_mask = torch.rand(batch, NUM_PATCHES, generator=gen) < 0.4
    patch_mask[:, 0], patch_mask[:, -1] = True, False
    return {
        "images": torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen),
        "input_ids": ids,
        "attention_mask": attention,
        "mlm_input_ids": mlm_ids,
        "mlm_labels": mlm_labels,
        "patch_mask": patch_mask,
        "image_tokens": torch.randint(IMAGE_VOCAB, (batch, GRID, GRID), generator=gen),
    }


def unit_rows(n: int, seed: int, dim: int = EMBED_DIM) -> torch.Tensor:
    """(n, dim) random L2-normalised rows."""
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def fill_queue(
    model: COTSModel, rows: int, seed: int = 1, garbage: torch.Tensor | None = None, groups: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Enqueue ``rows`` known pairs into an empty feature queue; returns them (Q^v, Q^t), (rows, D) each.

    ``garbage`` (D,) is then written into every slot not yet filled (image and text), so that a loss
    that reads an empty slot changes.
    """
    dim = model.feature_queue.image.data.shape[1]
    image_rows, text_rows = unit_rows(rows, seed, dim), unit_rows(rows, seed + 1000, dim)
    model.feature_queue.enqueue(image_rows, text_rows, groups)
    if garbage is not None:
        with torch.no_grad():
            model.feature_queue.image.data[rows:] = garbage
            model.feature_queue.text.data[rows:] = garbage
    return image_rows, text_rows


def set_similarity_queue(training_step: TrainingStep, mean: float, std: float) -> None:
    """Fill Q^s with values of exactly this mean and (population) standard deviation: mean -/+ std alternating."""
    size = training_step.amf.similarity_queue.size
    assert size % 2 == 0, "an even Q^s size gives the exact mean and std"
    training_step.amf.enqueue(torch.tensor([mean - std, mean + std] * (size // 2), dtype=torch.float64).float())


# -- the step's entry points (adapt here when the step's API changes) -----------------------------------


def run_step(model: COTSModel, training_step: TrainingStep, batch: dict) -> StepOutput:
    """One step's terms, features, AMF decision, masked logits and ViLEM edits (no gradient, nothing enqueued)."""
    with torch.no_grad():
        return training_step(model, batch)


def step_loss(model: COTSModel, training_step: TrainingStep, batch: dict) -> torch.Tensor:
    """The step's weighted total loss, with its gradient graph."""
    return training_step(model, batch).terms["loss"]


def run_and_enqueue(model: COTSModel, training_step: TrainingStep, batch: dict) -> StepOutput:
    """:func:`run_step`, then the enqueue the training step does after the losses."""
    out = run_step(model, training_step, batch)
    training_step.enqueue(model, out)
    return out


@dataclass
class Encoded:
    """The towers' outputs for a batch, computed here and not by the step (float64 copies).

    z_v, z_t: (B, D) online embeddings; zhat_v, zhat_t: (B, D) momentum embeddings;
    cls_v (B, W_v), cls_t (B, W_t): the online global features; patches_v (B, P, W_v).
    """

    z_v: torch.Tensor
    z_t: torch.Tensor
    zhat_v: torch.Tensor
    zhat_t: torch.Tensor
    cls_v: torch.Tensor
    cls_t: torch.Tensor
    patches_v: torch.Tensor

    @property
    def positive_similarity(self) -> torch.Tensor:
        """(B,) s_i = zhat^v_i . zhat^t_i (METHOD §6)."""
        return (self.zhat_v * self.zhat_t).sum(1)


def encode(model: COTSModel, batch: dict) -> Encoded:
    """Online and momentum encodings of a batch, straight from the two encoders."""
    images, ids, attention = batch["images"], batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        image, text = model.encoder.encode_image(images), model.encoder.encode_text(ids, attention)
        image_m = model.momentum_encoder.encode_image(images)
        text_m = model.momentum_encoder.encode_text(ids, attention)
    return Encoded(
        image.embedding.double(),
        text.embedding.double(),
        image_m.embedding.double(),
        text_m.embedding.double(),
        image.cls.double(),
        text.cls.double(),
        image.tokens.double(),
    )


# -- METHOD §3-7 in float64 -----------------------------------------------------------------------------


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None, denominator: float | None = None) -> torch.Tensor:
    """sum_i w_i v_i / sum_i w_i (``denominator`` replaces sum_i w_i)."""
    w = torch.ones_like(values) if weights is None else weights.double()
    return (w * values).sum() / (w.sum() if denominator is None else denominator)


def contrast_nll(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor, tau: float) -> torch.Tensor:
    """(B,) -sum_j t_ij log softmax_j(q_i . k_j / tau) for a (B, N) target distribution t."""
    log_p = (queries.double() @ keys.double().T / tau).log_softmax(dim=1)  # B x N
    return -(targets.double() * log_p).sum(1)


def own_targets(batch: int, num_keys: int, offset: int = 0) -> torch.Tensor:
    """(B, N) one-hot on column offset + i: each query's own key."""
    return F.one_hot(torch.arange(batch) + offset, num_keys).double()


def reference_inst(
    enc: Encoded,
    queue_v: torch.Tensor,
    queue_t: torch.Tensor,
    tau: float,
    weights: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    denominator: float | None = None,
) -> dict[str, torch.Tensor]:
    """METHOD §3: i2t against [zhat^t ; Q^t], t2i against [zhat^v ; Q^v], AMF-weighted, averaged.

    queue_v, queue_t: (K', D) the filled queue rows only. targets: (B, B+K') positives; None = own key.
    """
    keys_t = torch.cat([enc.zhat_t, queue_t.double()])  # (B+K') x D
    keys_v = torch.cat([enc.zhat_v, queue_v.double()])
    targets = own_targets(len(enc.z_v), len(keys_t)) if targets is None else targets
    i2t = weighted_mean(contrast_nll(enc.z_v, keys_t, targets, tau), weights, denominator)
    t2i = weighted_mean(contrast_nll(enc.z_t, keys_v, targets, tau), weights, denominator)
    return {"inst": (i2t + t2i) / 2, "inst_i2t": i2t, "inst_t2i": t2i}


def reference_task(
    enc: Encoded,
    queue_v: torch.Tensor,
    queue_t: torch.Tensor,
    tau: float,
    direction: str = "i2t||t2i",
    weights: torch.Tensor | None = None,
    denominator: float | None = None,
) -> torch.Tensor:
    """METHOD §5: KL between p^{i2t} over [z^v.zhat^t_i ; z^v.Q^t] and p^{t2i} over [z^t.zhat^v_i ; z^t.Q^v]."""

    def log_dist(queries, own_keys, queue):
        own = (queries * own_keys).sum(1, keepdim=True)  # B x 1
        return (torch.cat([own, queries @ queue.double().T], 1) / tau).log_softmax(1)  # B x (1+K')

    log_i2t, log_t2i = log_dist(enc.z_v, enc.zhat_t, queue_t), log_dist(enc.z_t, enc.zhat_v, queue_v)

    def kl(log_p, log_q):
        return (log_p.exp() * (log_p - log_q)).sum(1)  # B

    value = {
        "i2t||t2i": lambda: kl(log_i2t, log_t2i),
        "t2i||i2t": lambda: kl(log_t2i, log_i2t),
        "symmetric": lambda: (kl(log_i2t, log_t2i) + kl(log_t2i, log_i2t)) / 2,
    }[direction]()
    return weighted_mean(value, weights, denominator)


def masked_ce(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy of (M, V) logits against (M,) targets, float64."""
    log_p = logits.double().log_softmax(1)
    return -log_p.gather(1, targets[:, None]).mean(), (logits.argmax(1) == targets).double().mean()


def reference_cmvm_logits(model: COTSModel, batch: dict, pairs: int | None = None) -> torch.Tensor:
    """METHOD §4: (M_v, V_img) head_v(H^v_j + W h^t) at the masked patches of the first ``pairs`` pairs.

    H^v: the image tower on the [MASK]-ed patches; h^t: the text [CLS] of the clean caption of the same pair.
    """
    n = pairs or len(batch["images"])
    mask = batch["patch_mask"][:n]  # n x P
    head = model.cmvm_head
    with torch.no_grad():
        _, patches = model.encoder.image_tower(batch["images"][:n], mask)  # n x P x W_v
        text_cls, _ = model.encoder.text_tower(batch["input_ids"][:n], batch["attention_mask"][:n])  # n x W_t
        fused = patches + (text_cls @ head.fusion.proj.weight.T)[:, None, :]
        return head.classifier(head.norm(fused))[mask]


def reference_cmlm_logits(model: COTSModel, batch: dict, pairs: int | None = None) -> torch.Tensor:
    """METHOD §4: (M_t, V_txt) head_t(H^t_j + W h^v) at the masked tokens of the first ``pairs`` pairs.

    H^t: the text tower on ``mlm_input_ids``; h^v: the image [CLS] of the unmasked image of the same pair;
    head_t: dense, GELU, LayerNorm, decoder tied to the word embeddings.
    """
    n = pairs or len(batch["images"])
    labels = batch["mlm_labels"][:n]
    head = model.cmlm_head
    with torch.no_grad():
        _, states = model.encoder.text_tower(batch["mlm_input_ids"][:n], batch["attention_mask"][:n])  # n x L x W_t
        image_cls, _ = model.encoder.image_tower(batch["images"][:n])  # n x W_v
        fused = states + (image_cls @ head.fusion.proj.weight.T)[:, None, :]
        hidden = head.norm(F.gelu(head.dense(fused)))
        logits = hidden @ model.encoder.text_tower.word_embeddings.weight.T + head.decoder.bias
        return logits[labels != IGNORE_INDEX]


def reference_token_terms(model: COTSModel, batch: dict, pairs: int | None = None) -> dict[str, torch.Tensor]:
    """cmvm, cmvm_acc, cmlm, cmlm_acc of the first ``pairs`` pairs (the heads that exist)."""
    n = pairs or len(batch["images"])
    out = {}
    if model.cmvm_head is not None:
        targets = batch["image_tokens"][:n].flatten(1)[batch["patch_mask"][:n]]
        out["cmvm"], out["cmvm_acc"] = masked_ce(reference_cmvm_logits(model, batch, n), targets)
    if model.cmlm_head is not None:
        labels = batch["mlm_labels"][:n]
        out["cmlm"], out["cmlm_acc"] = masked_ce(reference_cmlm_logits(model, batch, n), labels[labels != IGNORE_INDEX])
    return out


def assert_terms(terms: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rtol: float = 2e-5) -> None:
    """Each expected term equals the step's term (float64 reference against the float32 step)."""
    for name, value in expected.items():
        assert name in terms, (name, sorted(terms))
        torch.testing.assert_close(terms[name].double(), value.double(), rtol=rtol, atol=1e-6, msg=name)


def rows_of_pair(mask: torch.Tensor) -> torch.Tensor:
    """(M,) pair index of each row of (M, V) logits taken at a (B, T) mask in row-major order."""
    return mask.nonzero()[:, 0]


def changed_pairs(before: torch.Tensor, after: torch.Tensor, pair_of_row: torch.Tensor, tol: float = 1e-5) -> set[int]:
    """The pairs with at least one logit row that moved by more than ``tol``."""
    moved = (before - after).abs().amax(dim=1) > tol  # M
    return set(pair_of_row[moved].tolist())
