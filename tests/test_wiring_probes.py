"""Invariance and sensitivity probes of the masked passes and of ViLEM: what each prediction may and may not see.

A prediction is probed by changing one input and checking which logit rows move: the masked
patches must not leak into their own CMVM prediction, CMLM must read the masked caption, each pair
must be fused with its own partner, and ViLEM must read the edited caption against its own image.
"""

from __future__ import annotations

import functools

import pytest
import torch
from test_wiring_common import (
    BATCH,
    MASK,
    PATCH,
    SPECIAL_IDS,
    TEXT_VOCAB,
    build,
    changed_pairs,
    encode,
    make_batch,
    rows_of_pair,
    run_step,
    vilem_settings,
)

from cots.error_generation import choose_error_positions
from cots.lit_module import COTSLitModule
from cots.masking import IGNORE_INDEX

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny towers: threads only add overhead

UNCHANGED = dict(rtol=0.0, atol=1e-6)


def _masked_logits(model, training_step, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(M_v, V_img) CMVM and (M_t, V_txt) CMLM logits of one step."""
    masked = run_step(model, training_step, batch).masked
    return masked.cmvm_logits, masked.cmlm_logits


def _patch_pixels(images: torch.Tensor, pair: int, patch: int) -> tuple:
    """The index of the pixels of one patch (row-major patch order, like the ViT's sequence)."""
    row, col = divmod(patch, images.shape[-1] // PATCH)
    return pair, slice(None), slice(row * PATCH, (row + 1) * PATCH), slice(col * PATCH, (col + 1) * PATCH)


def _other_words(ids: torch.Tensor) -> torch.Tensor:
    """Another word id for each of ``ids`` (never a special id)."""
    return 5 + (ids - 5 + 11) % (TEXT_VOCAB - 5)


@pytest.fixture(scope="module")
def token_model():
    model, training_step = build(cmvm={"enabled": True}, cmlm={"enabled": True})
    return model, training_step


def test_cmvm_never_sees_the_pixels_of_the_patches_it_predicts(token_model):
    """New pixels in every masked patch leave the CMVM logits as they were; one visible patch moves its pair."""
    model, training_step = token_model
    batch = make_batch()
    before, _ = _masked_logits(model, training_step, batch)
    hidden = dict(batch, images=batch["images"].clone())
    noise = torch.Generator().manual_seed(9)
    for pair, patch in batch["patch_mask"].nonzero().tolist():
        index = _patch_pixels(hidden["images"], pair, patch)
        hidden["images"][index] = 5 * torch.randn(hidden["images"][index].shape, generator=noise)
    torch.testing.assert_close(_masked_logits(model, training_step, hidden)[0], before, **UNCHANGED)

    visible = dict(batch, images=batch["images"].clone())
    patch = int((~batch["patch_mask"][1]).nonzero()[0])
    visible["images"][_patch_pixels(visible["images"], 1, patch)] += 3.0
    after, _ = _masked_logits(model, training_step, visible)
    assert changed_pairs(before, after, rows_of_pair(batch["patch_mask"])) == {1}


def test_cmlm_reads_the_masked_caption_not_the_clean_one(token_model):
    """The clean caption's words at the masked positions do not reach CMLM; a word of the masked caption does."""
    model, training_step = token_model
    batch = make_batch()
    _, before = _masked_logits(model, training_step, batch)
    predicted = batch["mlm_labels"] != IGNORE_INDEX
    clean = dict(batch, input_ids=batch["input_ids"].clone())
    clean["input_ids"][predicted] = _other_words(clean["input_ids"][predicted])
    torch.testing.assert_close(_masked_logits(model, training_step, clean)[1], before, **UNCHANGED)

    masked = dict(batch, mlm_input_ids=batch["mlm_input_ids"].clone())
    masked["mlm_input_ids"][2, 1] = _other_words(masked["mlm_input_ids"][2, 1])  # a word, masked or not
    _, after = _masked_logits(model, training_step, masked)
    assert changed_pairs(before, after, rows_of_pair(predicted)) == {2}


def test_each_pair_is_fused_with_its_own_partner(token_model):
    """Image j moves CMLM rows of pair j only; clean caption j moves CMVM rows of pair j only.

    The masked caption does not reach CMVM (its text feature is the unmasked pass's).
    """
    model, training_step = token_model
    batch = make_batch()
    cmvm_rows, cmlm_rows = rows_of_pair(batch["patch_mask"]), rows_of_pair(batch["mlm_labels"] != IGNORE_INDEX)
    cmvm, cmlm = _masked_logits(model, training_step, batch)
    for pair in range(BATCH):
        image = dict(batch, images=batch["images"].clone())
        image["images"][pair] = torch.randn(image["images"][pair].shape, generator=torch.Generator().manual_seed(pair))
        assert changed_pairs(cmlm, _masked_logits(model, training_step, image)[1], cmlm_rows) == {pair}

        text = dict(batch, input_ids=batch["input_ids"].clone())
        text["input_ids"][pair, 1] = _other_words(text["input_ids"][pair, 1])
        moved_cmvm, moved_cmlm = _masked_logits(model, training_step, text)
        assert changed_pairs(cmvm, moved_cmvm, cmvm_rows) == {pair}
        torch.testing.assert_close(moved_cmlm, cmlm, **UNCHANGED)

    masked_text = dict(batch, mlm_input_ids=_other_words(batch["mlm_input_ids"]))
    torch.testing.assert_close(_masked_logits(model, training_step, masked_text)[0], cmvm, **UNCHANGED)


def test_momentum_keys_come_from_the_momentum_encoder_and_embeddings_from_the_online_one(token_model):
    """features: z from the online encoder, zhat (keys) from its momentum twin, image and text each in place."""
    model, training_step = token_model
    batch = make_batch()
    features = run_step(model, training_step, batch).features
    enc = encode(model, batch)
    for got, expected in (
        (features.image.embedding, enc.z_v),
        (features.text.embedding, enc.z_t),
        (features.image_momentum, enc.zhat_v),
        (features.text_momentum, enc.zhat_t),
        (features.image_keys, enc.zhat_v),
        (features.text_keys, enc.zhat_t),
        (features.image.cls, enc.cls_v),
        (features.text.cls, enc.cls_t),
    ):
        torch.testing.assert_close(got.double(), expected, **UNCHANGED)
    assert (enc.zhat_v - enc.z_v).abs().max() > 1e-3  # the two encoders differ, so a swap would be seen


# -- ViLEM ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vilem_model():
    """Two text layers, M1 = 1: the layer above M1 must not take part in ViLEM."""
    return build(text_layers=2, cmlm={"enabled": True}, vilem=vilem_settings(top_k=1, ratio=0.3))


def _errors(model, image_global, image_patches, input_ids, attention_mask, replaced):
    """ViLEM's (B, L) detection and (M, V) correction logits of (B, L) captions against (B, W_v), (B, P, W_v) images."""
    with torch.no_grad():
        predicted = model.predict_errors(
            image_global.float(), image_patches.float(), input_ids, attention_mask, replaced
        )
    return predicted.detection_logits, predicted.correction_logits


def _rows_moved(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    """Rows of (B, L) logits that moved."""
    return set(((after - before).abs().amax(1) > 1e-5).nonzero()[:, 0].tolist())


def test_vilem_reads_its_own_images_global_feature_and_patches(vilem_model):
    """Detection of caption j moves with image j's [CLS] and with image j's patches, with no other image's."""
    model, _ = vilem_model
    batch = make_batch()
    replaced = batch["mlm_labels"] != IGNORE_INDEX
    enc = encode(model, batch)
    captions = batch["input_ids"], batch["attention_mask"], replaced
    detection, _ = _errors(model, enc.cls_v, enc.patches_v, *captions)
    for pair in range(BATCH):
        image_global = enc.cls_v.clone()
        image_global[pair] += 1.0
        assert _rows_moved(detection, _errors(model, image_global, enc.patches_v, *captions)[0]) == {pair}
        patches = enc.patches_v.clone()
        noise = torch.randn(patches[pair].shape, generator=torch.Generator().manual_seed(pair), dtype=patches.dtype)
        patches[pair] += noise
        assert _rows_moved(detection, _errors(model, enc.cls_v, patches, *captions)[0]) == {pair}


def test_vilem_runs_only_the_first_m1_text_layers(vilem_model):
    """objective.vilem.layers=1: the second text layer's weights do not change ViLEM's logits; the first's do."""
    model, _ = vilem_model
    batch = make_batch()
    replaced = batch["mlm_labels"] != IGNORE_INDEX
    enc = encode(model, batch)
    inputs = enc.cls_v, enc.patches_v, batch["input_ids"], batch["attention_mask"], replaced
    detection, correction = _errors(model, *inputs)
    layers = model.encoder.text_tower.bert.encoder.layer
    for index, moves in ((1, False), (0, True)):
        weight = layers[index].attention.self.value.weight
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.add_(0.5)
        moved_detection, moved_correction = _errors(model, *inputs)
        with torch.no_grad():
            weight.copy_(saved)
        differs = [(moved_detection - detection).abs().max() > 1e-4, (moved_correction - correction).abs().max() > 1e-4]
        assert [bool(d) for d in differs] == [moves, moves], index


def _reproduce_edit_positions(batch: dict, ratio: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions and [MASK]-ed captions the step draws after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    forbidden = sorted(set(SPECIAL_IDS) | {MASK})
    return choose_error_positions(batch["input_ids"], batch["attention_mask"], MASK, forbidden, TEXT_VOCAB, ratio)


def _generator_logits(model, masked_ids, attention, image_cls, chosen, originals) -> torch.Tensor:
    """(M, V) the CMLM head's scores at the chosen positions, specials and each original word at -inf."""
    head = model.cmlm_head
    with torch.no_grad():
        _, states = model.encoder.text_tower(masked_ids, attention)  # B x L x W_t
        fused = states if image_cls is None else states + (image_cls.float() @ head.fusion.proj.weight.T)[:, None, :]
        logits = head.decoder(head.norm(head.activation(head.dense(fused))))[chosen]  # M x V
    logits[:, SPECIAL_IDS] = float("-inf")
    logits[torch.arange(len(logits)), originals] = float("-inf")
    return logits


@pytest.mark.parametrize("generator", ["cmlm", "cmlm_image"])
def test_vilem_edits_come_from_the_generator_on_the_masked_caption_and_its_own_image(generator):
    """With top_k=1 each replacement is the CMLM head's best word for the [MASK]-ed caption: read alone (``cmlm``,
    the default: errors plausible as text) or fused with its own image (``cmlm_image``)."""
    model, training_step = build(
        text_layers=2, cmlm={"enabled": True}, vilem=vilem_settings(top_k=1, ratio=0.3, generator=generator)
    )
    batch = make_batch(batch=6)
    torch.manual_seed(11)
    edited, predicted = run_step(model, training_step, batch).errors
    masked_ids, originals = _reproduce_edit_positions(batch, 0.3, 11)
    chosen = originals != IGNORE_INDEX
    assert torch.equal(edited.replaced, chosen)
    enc = encode(model, batch)
    attention, words = batch["attention_mask"], originals[chosen]
    image = enc.cls_v if generator == "cmlm_image" else None
    expected = _generator_logits(model, masked_ids, attention, image, chosen, words).argmax(1)
    assert edited.input_ids[chosen].tolist() == expected.tolist()
    clean = _generator_logits(model, batch["input_ids"], attention, image, chosen, words).argmax(1)
    other = enc.cls_v.roll(1, 0) if generator == "cmlm_image" else enc.cls_v  # another pair's image; or any image
    seeing = _generator_logits(model, masked_ids, attention, other, chosen, words).argmax(1)
    assert clean.tolist() != expected.tolist() and seeing.tolist() != expected.tolist()  # both wirings would be seen
    # and the predictions were made on the edited captions against their own images
    detection, correction = _errors(
        model, enc.cls_v, enc.patches_v, edited.input_ids, batch["attention_mask"], edited.replaced
    )
    torch.testing.assert_close(predicted.detection_logits, detection, **UNCHANGED)
    torch.testing.assert_close(predicted.correction_logits, correction, **UNCHANGED)


@pytest.mark.parametrize("ratio", [0.15, 0.5])
def test_vilem_ratio_sets_the_number_of_edited_words_per_caption(ratio):
    """objective.vilem.ratio: a caption of n words gets max(1, floor(ratio n)) or max(1, ceil(ratio n)) edits."""
    model, training_step = build(cmlm={"enabled": True}, vilem=vilem_settings(ratio=ratio))
    batch = make_batch(batch=8)
    edited, _ = run_step(model, training_step, batch).errors
    words = (batch["attention_mask"].bool() & ~torch.isin(batch["input_ids"], torch.tensor(SPECIAL_IDS))).sum(1)
    edits = edited.replaced.sum(1)
    low = torch.clamp(torch.floor(ratio * words), min=1)
    high = torch.clamp(torch.ceil(ratio * words), min=1)
    assert ((edits >= low) & (edits <= high)).all(), (edits.tolist(), words.tolist())
    changed = edited.input_ids != batch["input_ids"]
    assert torch.equal(changed, edited.replaced)  # every edit is a real change, nothing else changed


def test_vilem_top_k_bounds_the_candidates():
    """objective.vilem.top_k: 1 always draws the generator's best word; 3 draws among its three best, not always
    the best."""
    batch = make_batch(batch=8)
    picks = {}
    for top_k in (1, 3):
        model, training_step = build(cmlm={"enabled": True}, vilem=vilem_settings(top_k=top_k, ratio=0.5))
        torch.manual_seed(4)
        edited, _ = run_step(model, training_step, batch).errors
        masked_ids, originals = _reproduce_edit_positions(batch, 0.5, 4)
        chosen = originals != IGNORE_INDEX
        logits = _generator_logits(model, masked_ids, batch["attention_mask"], None, chosen, originals[chosen])
        picks[top_k] = (logits > logits.gather(1, edited.input_ids[chosen][:, None])).sum(1)  # rank, 0 = the best
    assert (picks[1] == 0).all()
    assert (picks[3] < 3).all() and (picks[3] > 0).any()


def test_vilem_validation_scores_each_caption_against_its_own_image(vilem_model, monkeypatch):
    """Validation's ViLEM accuracies: seeded edits of the captions of the first ``val_images`` gallery images, each
    caption read against its own image's [CLS] and patches (``image_index``), the others left out."""
    model, training_step = vilem_model
    module = COTSLitModule(model, training_step, optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    monkeypatch.setattr(training_step.objective.vilem, "val_images", 3)
    read = []  # the images predict_errors was given
    predict_errors = model.predict_errors
    monkeypatch.setattr(model, "predict_errors", lambda *args: read.append(args[:2]) or predict_errors(*args))
    gallery, captions = make_batch(seed=0), make_batch(seed=1, batch=8)
    image_index = torch.tensor([2, 0, 1, 3, 1, 2, 0, 3])  # (8,) the gallery image of each caption; image 3 not kept
    module.validation_step({"images": gallery["images"]}, 0, 0)
    module.validation_step(
        {"input_ids": captions["input_ids"], "attention_mask": captions["attention_mask"], "image_index": image_index},
        0,
        1,
    )
    module.on_validation_epoch_end()

    enc, own = encode(model, gallery), image_index < 3
    ((image_global, image_patches),) = read
    torch.testing.assert_close(image_global.double(), enc.cls_v[image_index[own]], **UNCHANGED)
    torch.testing.assert_close(image_patches.double(), enc.patches_v[image_index[own]], **UNCHANGED)
    ids, attention = captions["input_ids"][own], captions["attention_mask"][own]
    generator = torch.Generator().manual_seed(1000003)  # the module's seed of caption batch 0
    with torch.no_grad():
        edited = training_step.caption_editor(model, ids, attention, enc.cls_v[image_index[own]].float(), generator)
        detection, correction = _errors(
            model,
            enc.cls_v[image_index[own]],
            enc.patches_v[image_index[own]],
            edited.input_ids,
            attention,
            edited.replaced,
        )
    scored = edited.detection_labels != IGNORE_INDEX
    right = ((detection > 0).long() == edited.detection_labels)[scored]
    originals = edited.correction_labels[edited.replaced]
    accuracy = module.last_error_accuracy
    assert accuracy["vilem_det_acc"] == pytest.approx(100 * right.double().mean().item(), abs=1e-4)
    assert accuracy["vilem_cor_acc"] == pytest.approx(
        100 * (correction.argmax(1) == originals).double().mean().item(), abs=1e-4
    )
