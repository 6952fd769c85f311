"""ViLEM's plausible caption errors (METHOD §7): choose positions, replace each from a masked-LM's top-k.

Pure tensor functions, and :class:`CaptionEditor`, which applies them to a batch with the
configured generator (the model's own CMLM head, or :class:`MaskedLMGenerator`, a local Hugging
Face masked LM). The training step and validation's detection scores both edit through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from cots.masking import IGNORE_INDEX, mask_text_tokens, maskable_positions


@dataclass
class EditedCaptions:
    """Captions with generated errors and their labels. B = batch, L = tokens."""

    input_ids: torch.Tensor  # B x L, the edited caption
    attention_mask: torch.Tensor  # B x L, unchanged
    detection_labels: torch.Tensor  # B x L long: 1 replaced, 0 kept, IGNORE_INDEX at special and padding tokens
    correction_labels: torch.Tensor  # B x L long: the original id at replaced positions, IGNORE_INDEX elsewhere

    @property
    def replaced(self) -> torch.Tensor:
        """(B, L) bool, True where a token was replaced."""
        return self.correction_labels != IGNORE_INDEX


def choose_error_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_id: int,
    special_ids: Iterable[int],
    vocab_size: int,
    ratio: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions to edit: about ``ratio`` of each caption's real, non-special tokens (at least one).

    Returns:
        generator_input: (B, L) the caption with [MASK] at the chosen positions (what the masked LM reads);
        originals: (B, L) the original id at chosen positions, IGNORE_INDEX elsewhere.
    """
    return mask_text_tokens(
        input_ids,
        attention_mask,
        mask_id,
        special_ids,
        vocab_size,
        generator,
        mask_prob=ratio,
        replace_prob=1.0,
        random_prob=0.0,
    )


def sample_replacements(
    logits: torch.Tensor,
    originals: torch.Tensor,
    top_k: int,
    forbidden_ids: Iterable[int],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One replacement per position, drawn from the softmax over the generator's top-k ids.

    The original token and ``forbidden_ids`` (special tokens) are removed before the top-k, so a
    replacement never equals the original and is never a special token. Non-finite scores (a
    diverging generator) count as 0, so such a step still gets valid edits and the non-finite
    guard of the training step, not this function, decides what happens to it.

    Args:
        logits: (M, V) the generator's scores at the M chosen positions.
        originals: (M,) the original ids there.
        top_k: candidates kept per position.
        forbidden_ids: ids never drawn ([CLS], [SEP], [PAD], [MASK], ...).
    Returns:
        (M,) long replacement ids.
    """
    scores = logits.detach().float()  # M x V
    scores = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores))
    forbidden = [i for i in set(int(i) for i in forbidden_ids) if 0 <= i < scores.shape[1]]
    if scores.shape[1] - len(forbidden) < 2:  # from the shapes: no host sync in the training step
        raise ValueError("the caption vocabulary has no allowed replacement (every other id is special)")
    scores[:, forbidden] = float("-inf")
    scores.scatter_(1, originals[:, None], float("-inf"))
    values, candidates = scores.topk(min(top_k, scores.shape[1]), dim=1)  # M x k
    probs = values.softmax(dim=1)  # -inf candidates (fewer allowed ids than k) get probability 0
    pick = torch.multinomial(
        probs.to(generator.device if generator is not None else probs.device), 1, generator=generator
    ).to(candidates.device)  # M x 1
    return candidates.gather(1, pick).squeeze(1)


def apply_errors(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    originals: torch.Tensor,
    replacements: torch.Tensor,
    special_ids: Iterable[int],
) -> EditedCaptions:
    """Write the replacements into the captions and build the detection / correction labels.

    Args:
        input_ids, attention_mask: (B, L) the clean captions.
        originals: (B, L) original id at chosen positions, IGNORE_INDEX elsewhere (``choose_error_positions``).
        replacements: (M,) ids for the chosen positions in row-major order.
        special_ids: tokens that get no detection label.
    """
    chosen = originals != IGNORE_INDEX  # B x L
    edited = input_ids.clone()
    edited[chosen] = replacements.to(edited.dtype)
    scored = maskable_positions(input_ids, attention_mask, special_ids)  # B x L
    detection = torch.where(scored, chosen.long(), torch.full_like(input_ids, IGNORE_INDEX))
    return EditedCaptions(edited, attention_mask, detection, originals.clone())


class MaskedLMGenerator:
    """A frozen local Hugging Face masked LM as the error generator (no gradient, not in checkpoints).

    Args:
        path: a local directory with a ``*ForMaskedLM`` checkpoint whose vocabulary is the captions'.
        vocab_size: the caption tokenizer's vocabulary, checked against the generator's.
    """

    def __init__(self, path: str, vocab_size: int) -> None:
        from transformers import AutoModelForMaskedLM

        from cots.local_paths import resolve_local_dir

        directory = resolve_local_dir(path)
        if not (Path(directory) / "config.json").is_file():
            raise FileNotFoundError(f"objective.vilem.generator: no config.json in {directory}")
        self.model = AutoModelForMaskedLM.from_pretrained(str(directory)).eval().requires_grad_(False)
        if self.model.config.vocab_size != vocab_size:
            raise ValueError(
                f"objective.vilem.generator {path} has a vocabulary of {self.model.config.vocab_size} "
                f"ids but the caption tokenizer has {vocab_size}: they must be the same tokenizer"
            )

    @torch.no_grad()
    def __call__(self, masked_ids: torch.Tensor, attention_mask: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """(M, V) float32 logits at the chosen positions of (B, L) masked captions."""
        self.model.to(masked_ids.device)
        with torch.autocast(masked_ids.device.type, enabled=False):
            logits = self.model(input_ids=masked_ids, attention_mask=attention_mask).logits  # B x L x V
        return logits[chosen].float()


# The model's own CMLM head as the generator: text only (the default), or fused with the paired image.
CMLM_GENERATORS = ("cmlm", "cmlm_image")


class CaptionEditor:
    """Edits a batch of captions: about ``ratio`` of the tokens replaced by a draw from the generator's top-k.

    Args:
        ratio: fraction of each caption's real, non-special tokens replaced (at least one).
        top_k: a replacement is drawn from the generator's ``top_k`` ids other than the original.
        generator: ``cmlm``: the model's own CMLM head, text only (the image feature left out), without
            gradient; ``cmlm_image``: the same head fused with the paired image, as CMLM trains it; or a
            local Hugging Face masked-LM directory sharing the caption vocabulary. ViLEM wants errors that
            are plausible as text and that the image contradicts: a generator that sees the image draws
            words the image supports, which are then labelled as errors, so the default is text only.
        mask_id, special_ids, vocab_size: from the caption tokenizer.
    """

    def __init__(
        self, ratio: float, top_k: int, generator: str, mask_id: int, special_ids: Sequence[int], vocab_size: int
    ) -> None:
        self.ratio, self.top_k, self.generator = ratio, top_k, generator
        self.mask_id, self.vocab_size = mask_id, vocab_size
        self.forbidden = sorted(set(int(i) for i in special_ids) | {mask_id})  # never chosen, never drawn
        self._masked_lm: MaskedLMGenerator | None = None  # a plain attribute: frozen, not checkpointed

    def __call__(
        self,
        model,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_global: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> EditedCaptions:
        """The edited captions and their labels.

        Args:
            model: the ``COTSModel`` whose CMLM head generates (``generator=cmlm``).
            input_ids, attention_mask: (B, L) clean captions.
            image_global: (B, W_v) the paired images' [CLS] (the CMLM head's fusion input).
            generator: torch Generator for reproducible edits (validation); None = the global RNG.
        """
        masked_ids, originals = choose_error_positions(
            input_ids, attention_mask, self.mask_id, self.forbidden, self.vocab_size, self.ratio, generator
        )
        chosen = originals != IGNORE_INDEX  # B x L
        if self.generator in CMLM_GENERATORS:
            image = image_global.detach() if self.generator == "cmlm_image" else None
            logits = model.cmlm_generator_logits(masked_ids, attention_mask, image, chosen)
        else:
            if self._masked_lm is None:
                self._masked_lm = MaskedLMGenerator(self.generator, self.vocab_size)
            logits = self._masked_lm(masked_ids, attention_mask, chosen)  # M x V
        replacements = sample_replacements(logits, originals[chosen], self.top_k, self.forbidden, generator)
        return apply_errors(input_ids, attention_mask, originals, replacements, self.forbidden)
