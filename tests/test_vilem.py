"""ViLEM error modeling (METHOD §7): edits and labels, the loss, the interaction's isolation from retrieval."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict
from transformers import BertConfig, BertForMaskedLM

from cots import distributed
from cots.config_checks import ConfigError
from cots.error_generation import apply_errors, choose_error_positions, sample_replacements
from cots.losses.vilem import vilem_loss
from cots.masking import IGNORE_INDEX
from cots.train import build_module, train
from cots.training_step import predict_caption_errors

TEXT_MASK = {"mask_prob": 0.15, "replace_prob": 0.8, "random_prob": 0.1}
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4  # train_wordpiece's special ids
SPECIAL = [PAD, UNK, CLS, SEP, MASK]
VOCAB = 200


def _captions(batch: int = 64, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] w .. w [SEP] [PAD].., with a few [UNK] among the words and ragged lengths."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, length), generator=gen)
    ids[torch.rand(batch, length, generator=gen) < 0.05] = UNK
    lengths = torch.randint(3, length + 1, (batch,), generator=gen)
    positions = torch.arange(length)[None]
    attention = (positions < lengths[:, None]).long()
    ids[:, 0] = CLS
    ids[torch.arange(batch), lengths - 1] = SEP
    ids[attention == 0] = PAD
    return ids, attention


def _edit(ids, attention, logits_fn, ratio=0.15, top_k=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    masked, originals = choose_error_positions(ids, attention, MASK, SPECIAL, VOCAB, ratio, gen)
    chosen = originals != IGNORE_INDEX
    logits = logits_fn(masked, chosen)
    replacements = sample_replacements(logits, originals[chosen], top_k, SPECIAL, gen)
    return masked, logits, apply_errors(ids, attention, originals, replacements, SPECIAL)


def test_edits_match_their_labels_and_never_touch_special_tokens_or_keep_the_original():
    ids, attention = _captions(batch=256)

    # A generator that prefers the original token and the special ids: both must still never be drawn.
    def biased(masked, chosen):
        logits = torch.randn(int(chosen.sum()), VOCAB, generator=torch.Generator().manual_seed(1))
        logits[:, SPECIAL] += 50.0
        logits[torch.arange(len(logits)), ids[chosen]] += 100.0
        return logits

    masked, logits, edited = _edit(ids, attention, biased, ratio=0.15, top_k=5)
    replaced = edited.replaced
    special = torch.isin(ids, torch.tensor(SPECIAL)) | (attention == 0)
    assert replaced.any()
    assert not (replaced & special).any(), "a special or padding token was chosen"
    assert torch.equal(edited.input_ids[~replaced], ids[~replaced])  # nothing else changes
    assert (edited.input_ids[replaced] != ids[replaced]).all(), "a replacement equals the original token"
    assert not torch.isin(edited.input_ids[replaced], torch.tensor(SPECIAL)).any()
    assert torch.equal(masked[replaced], torch.full_like(masked[replaced], MASK))  # the generator read [MASK]
    # Labels: detection 1/0 on every real word, ignored on special and padding; correction = the original id.
    assert torch.equal(
        edited.detection_labels[special], torch.full_like(edited.detection_labels[special], IGNORE_INDEX)
    )
    assert torch.equal(edited.detection_labels[~special], replaced[~special].long())
    assert torch.equal(edited.correction_labels[replaced], ids[replaced])
    assert (edited.correction_labels[~replaced] == IGNORE_INDEX).all()
    # Each replacement is among the top-5 once the original and the special ids are removed.
    allowed = logits.clone()
    allowed[:, SPECIAL] = float("-inf")
    allowed[torch.arange(len(allowed)), ids[replaced]] = float("-inf")
    top5 = allowed.topk(5, dim=1).indices
    assert (top5 == edited.input_ids[replaced][:, None]).any(dim=1).all()
    # About 15% of each caption's words, at least one per caption that has a word.
    words = (~special).sum(1)
    assert (replaced.sum(1)[words > 0] >= 1).all()
    long_captions = words >= 8  # there 0.15 n >= 1.2: the at-least-one rule does not bias the count
    fraction = replaced[long_captions].sum() / words[long_captions].sum()
    assert 0.11 < float(fraction) < 0.19, float(fraction)


def test_sampling_follows_the_generator_within_the_top_k():
    # Three allowed candidates with probabilities 0.7 / 0.2 / 0.1 after the softmax; top_k=2 keeps two.
    logits = torch.full((20000, 8), -30.0)
    logits[:, 5], logits[:, 6], logits[:, 7] = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    logits[:, 4] = 10.0  # the original: removed
    originals = torch.full((20000,), 4)
    picks = sample_replacements(
        logits, originals, top_k=2, forbidden_ids=[0], generator=torch.Generator().manual_seed(0)
    )
    counts = torch.bincount(picks, minlength=8).float() / len(picks)
    assert counts[7] == 0 and counts[4] == 0
    assert abs(float(counts[5]) - 0.7 / 0.9) < 0.02, counts


def test_a_diverging_generator_still_gives_valid_edits():
    logits = torch.full((6, 12), float("nan"))
    logits[0] = float("inf")
    originals = torch.arange(6) + 5
    picks = sample_replacements(
        logits, originals, top_k=3, forbidden_ids=SPECIAL, generator=torch.Generator().manual_seed(0)
    )
    assert (picks != originals).all() and not torch.isin(picks, torch.tensor(SPECIAL)).any()
    with pytest.raises(ValueError, match="no allowed replacement"):
        sample_replacements(torch.randn(2, 6), torch.tensor([5, 5]), 3, forbidden_ids=SPECIAL)


def test_vilem_loss_matches_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    ids, attention = _captions(batch=6)
    _, _, edited = _edit(ids, attention, lambda m, c: torch.randn(int(c.sum()), VOCAB, generator=gen))
    det = torch.randn(ids.shape, generator=gen)
    cor = torch.randn(int(edited.replaced.sum()), VOCAB, generator=gen)
    out = vilem_loss(det, edited.detection_labels, cor, edited.correction_labels)

    scored = edited.detection_labels != IGNORE_INDEX
    x, y = det[scored].double(), edited.detection_labels[scored].double()
    bce = -(y * torch.log(torch.sigmoid(x)) + (1 - y) * torch.log(1 - torch.sigmoid(x))).mean()
    targets = ids[edited.replaced]
    ce = -cor.double().log_softmax(-1).gather(1, targets[:, None]).mean()
    assert torch.allclose(out["detection"].double(), bce, atol=1e-6)
    assert torch.allclose(out["correction"].double(), ce, atol=1e-6)
    assert torch.allclose(out["loss"].double(), bce + ce, atol=1e-6)
    assert torch.isclose(out["detection_accuracy"], ((x > 0).double() == y).double().mean().float())
    assert torch.isclose(out["correction_accuracy"], (cor.argmax(1) == targets).float().mean())
    # A global denominator (DDP) rescales each term by local count / denominator.
    scaled = vilem_loss(
        det, edited.detection_labels, cor, edited.correction_labels, 2.0 * scored.sum(), 2.0 * edited.replaced.sum()
    )
    assert torch.allclose(scaled["loss"], out["loss"] / 2)


def _vilem_cfg(make_cfg, *overrides: str):
    cfg = make_cfg(
        "objective=vilem",
        "model.encoder.text_tower.num_layers=2",
        "objective.vilem.layers=1",
        "objective.vilem.num_heads=4",
        *overrides,
    )
    with open_dict(cfg):
        cfg.data.text_mask = TEXT_MASK
    return cfg


def _build(cfg):
    return build_module(cfg, VOCAB, None, MASK, SPECIAL)


def _batch(batch: int = 8):
    ids, attention = _captions(batch=batch, length=10)
    images = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return {
        "images": images,
        "input_ids": ids,
        "attention_mask": attention,
        "mlm_input_ids": ids.clone(),
        "mlm_labels": torch.where(ids > SEP, ids, torch.full_like(ids, IGNORE_INDEX)),
    }


def test_interaction_trains_only_through_vilem_and_only_the_first_m1_text_layers(make_cfg):
    torch.manual_seed(0)
    module = _build(_vilem_cfg(make_cfg))
    model = module.model.train()
    head = model.vilem_head
    assert head is not None and len(head.cross_attention) == 1
    assert head.corrector.decoder.weight is model.encoder.text_tower.word_embeddings.weight  # tied
    # The block starts as the identity (zero output projection): queries and keys get a gradient once it moves.
    torch.nn.init.normal_(head.cross_attention[0].out.weight, std=0.02)
    terms = module.step(model, _batch()).terms
    assert {"vilem", "vilem_det", "vilem_cor", "vilem_det_acc", "vilem_cor_acc"} <= terms.keys()
    assert torch.allclose(terms["loss"], terms["inst"] + terms["task"] + terms["cmlm"] + terms["vilem"])

    terms["inst"].backward(retain_graph=True)  # the retrieval objective never reaches the interaction
    assert all(p.grad is None for p in head.parameters() if p is not model.encoder.text_tower.word_embeddings.weight)
    model.zero_grad(set_to_none=True)

    terms["vilem"].backward()
    layers = model.encoder.text_tower.bert.encoder.layer
    for name, param in (
        ("cross-attention query", head.cross_attention[0].query.weight),
        ("cross-attention out", head.cross_attention[0].out.weight),
        ("global injection", head.inject.proj.weight),
        ("detector", head.detector[1].weight),
        ("text layer 0", layers[0].attention.self.query.weight),
        ("image tower (patches and [CLS])", model.encoder.image_tower.vit.blocks[0].attn.qkv.weight),
    ):
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert layers[1].attention.self.query.weight.grad is None, "a text layer above M1 got a ViLEM gradient"
    assert model.encoder.text_proj.weight.grad is None and model.encoder.image_proj.weight.grad is None


def test_retrieval_embeddings_are_bit_identical_with_vilem_on_and_off(make_cfg):
    torch.manual_seed(0)
    with_vilem = _build(_vilem_cfg(make_cfg)).model
    without = _build(_vilem_cfg(make_cfg, "objective.vilem.enabled=false")).model
    assert without.vilem_head is None
    state = {k: v for k, v in with_vilem.state_dict().items() if not k.startswith("vilem_head.")}
    without.load_state_dict(state)
    batch = _batch()
    with_vilem.eval(), without.eval()
    with torch.no_grad():
        on = with_vilem(batch["images"], batch["input_ids"], batch["attention_mask"])
        off = without(batch["images"], batch["input_ids"], batch["attention_mask"])
    assert torch.equal(on.image.embedding, off.image.embedding)
    assert torch.equal(on.text.embedding, off.text.embedding)
    assert torch.equal(on.text_keys, off.text_keys) and torch.equal(on.image_keys, off.image_keys)


def test_vilem_terms_divide_by_the_global_mean_counts(make_cfg, monkeypatch):
    torch.manual_seed(0)
    module = _build(_vilem_cfg(make_cfg))
    model, objective = module.model.eval(), module.step.objective
    batch = _batch()
    with torch.no_grad():
        features = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        edited, predicted = predict_caption_errors(
            model,
            module.step.caption_editor,
            batch["input_ids"],
            batch["attention_mask"],
            features.image.cls,
            features.image.tokens,
        )
        single = objective.error_terms(edited, predicted)
        # Two ranks, the other with twice this rank's counts: mean count 3/2 x local, accuracies stay local.
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        monkeypatch.setattr(distributed, "all_reduce_sum", lambda x: 3 * x.detach())
        ddp = objective.error_terms(edited, predicted)
    for name in ("detection", "correction", "loss"):
        assert torch.allclose(ddp[name], single[name] / 1.5), name
    assert torch.equal(ddp["detection_accuracy"], single["detection_accuracy"])


def test_first_layers_path_equals_the_tower_with_every_layer(make_cfg):
    model = _build(_vilem_cfg(make_cfg)).model.eval()
    tower = model.encoder.text_tower
    ids, attention = _captions(batch=5)
    with torch.no_grad():
        _, reference = tower(ids, attention)
        manual = tower.forward_first_layers(ids, attention, num_layers=len(tower.bert.encoder.layer))
    real = attention.bool()
    assert torch.allclose(manual[real], reference[real], atol=1e-5)


def test_a_local_masked_lm_can_generate_the_errors(make_cfg, tmp_path):
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")
    module = _build(
        _vilem_cfg(make_cfg, f"objective.vilem.generator={tmp_path / 'mlm'}", "objective.cmlm.enabled=false")
    )
    assert module.model.cmlm_head is None
    ids, attention = _captions(batch=8)
    edited = module.step.caption_editor(module.model, ids, attention, torch.zeros(8, 48))
    assert edited.replaced.any() and (edited.input_ids[edited.replaced] != ids[edited.replaced]).all()

    BertForMaskedLM(
        BertConfig(
            vocab_size=VOCAB + 1, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
        )
    ).save_pretrained(tmp_path / "other")
    other = _build(
        _vilem_cfg(make_cfg, f"objective.vilem.generator={tmp_path / 'other'}", "objective.cmlm.enabled=false")
    )
    with pytest.raises(ValueError, match="vocabulary"):
        other.step.caption_editor(other.model, ids, attention, torch.zeros(8, 48))


def test_a_generator_that_cannot_work_is_refused_at_start_up(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="objective.cmlm.enabled=true"):
        train(_vilem_cfg(make_cfg, "objective.cmlm.enabled=false"))
    with pytest.raises(ConfigError, match="objective.vilem.generator: model directory not found"):
        train(_vilem_cfg(make_cfg, f"objective.vilem.generator={tmp_path / 'missing'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        train(_vilem_cfg(make_cfg, f"objective.vilem.generator={tmp_path / 'empty'}"))


def test_training_with_vilem_logs_its_terms_and_validation_accuracies(make_cfg):
    metrics, objects = train(
        _vilem_cfg(make_cfg, "trainer.max_steps=3", "trainer.val_check_interval=3", "objective.vilem.val_images=20")
    )
    for name in (
        "train/vilem",
        "train/vilem_det_acc",
        "train/vilem_cor_acc",
        "val/vilem_det_acc",
        "val/vilem_cor_acc",
        "val/vilem_det_majority",
    ):
        assert name in metrics, (name, sorted(metrics))
    assert metrics["train/vilem"] > 0  # and finite
    # The validation accuracies are those of the final model on seeded edits of the captions of the first
    # val_images gallery images, each caption against its own image (the edits of caption batch i are seeded
    # with 1000003 * (i + 1), as the module does).
    module, datamodule = objects["module"], objects["datamodule"]
    model = module.model.eval()
    images, captions = datamodule.val_dataloader()
    counts = torch.zeros(4)  # detection right, scored, correction right, replaced
    with torch.no_grad():
        encoded = [model.encoder.encode_image(batch["images"]) for batch in images]
        image_global, image_patches = (torch.cat([getattr(e, f) for e in encoded])[:20] for f in ("cls", "tokens"))
        for batch_idx, batch in enumerate(captions):
            own = batch["image_index"] < 20
            if not own.any():
                continue
            index = batch["image_index"][own]
            generator = torch.Generator().manual_seed(1000003 * (batch_idx + 1))
            edited, predicted = predict_caption_errors(
                model,
                module.step.caption_editor,
                batch["input_ids"][own],
                batch["attention_mask"][own],
                image_global[index],
                image_patches[index],
                generator,
            )
            scored = edited.detection_labels != IGNORE_INDEX
            right = (predicted.detection_logits > 0).long() == edited.detection_labels
            originals = edited.correction_labels[edited.replaced]
            counts += torch.tensor(
                [
                    right[scored].sum(),
                    scored.sum(),
                    (predicted.correction_logits.argmax(1) == originals).sum(),
                    len(originals),
                ]
            ).float()
    assert counts[1] > counts[3] > 0
    assert metrics["val/vilem_det_acc"] == pytest.approx(100 * float(counts[0] / counts[1]), abs=1e-3)
    assert metrics["val/vilem_cor_acc"] == pytest.approx(100 * float(counts[2] / counts[3]), abs=1e-3)
    assert metrics["val/vilem_det_majority"] == pytest.approx(100 * float(1 - counts[3] / counts[1]), abs=1e-3)
