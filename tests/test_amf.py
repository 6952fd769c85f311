"""Adaptive Momentum Filter: warm-up, the exact Gaussian threshold, the step's order, checkpoints."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from cots.amf import AdaptiveMomentumFilter, amf_filter, noise_confusion, precision_recall


def _pairs_with_similarity(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image/text keys (G, 2) whose dot products are exactly ``s`` (G,)."""
    angle = torch.arccos(s.double().clamp(-1, 1))
    image = torch.stack([torch.ones_like(angle), torch.zeros_like(angle)], 1)
    return image.float(), torch.stack([angle.cos(), angle.sin()], 1).float()


def test_keeps_every_pair_until_the_queue_is_full():
    amf = AdaptiveMomentumFilter(queue_size=8, k=0.0)
    amf.enqueue(torch.tensor([0.9, 0.8, 0.9, 0.85, 0.9, 0.9, 0.8]))  # 7 of 8
    image, text = _pairs_with_similarity(torch.tensor([-0.5, 0.0, 0.95]))
    decision = amf(image, text, torch.arange(3))
    assert not bool(decision.active) and bool(decision.keep.all()) and decision.weights.tolist() == [1, 1, 1]
    amf.enqueue(torch.tensor([0.9]))  # full now: the same pairs meet the filter
    decision = amf(image, text, torch.arange(3))
    assert bool(decision.active) and decision.keep.tolist() == [False, False, True]


def test_filters_exactly_the_pairs_below_mu_minus_k_sigma():
    g = torch.Generator().manual_seed(0)
    queue_values = (0.5 + 0.1 * torch.randn(64, generator=g)).clamp(-1, 1)
    amf = AdaptiveMomentumFilter(queue_size=64, k=1.5)
    amf.enqueue(queue_values[:40])
    amf.enqueue(queue_values[40:])  # in two parts: the order in the ring does not matter
    mu = statistics.fmean(queue_values.double().tolist())
    sigma = statistics.pstdev(queue_values.double().tolist())
    threshold = mu - 1.5 * sigma
    s = torch.tensor([threshold - 0.05, threshold - 1e-3, threshold + 1e-3, mu, 0.9, -0.2, 0.2, threshold + 0.05])
    image, text = _pairs_with_similarity(s)
    decision = amf(image, text, torch.tensor([4, 5, 6, 7]))  # this rank's pairs are the second half
    expected = (decision.similarities.double() >= threshold).tolist()
    assert expected == [False, False, True, True, True, False, False, True]
    assert decision.keep.tolist() == expected
    assert decision.weights.tolist() == [1.0, 0.0, 0.0, 1.0]
    assert math.isclose(float(decision.mean), mu, abs_tol=1e-6) and math.isclose(
        float(decision.std), sigma, abs_tol=1e-6
    )
    assert math.isclose(float(decision.threshold), threshold, abs_tol=1e-6)
    assert float(decision.filtered_fraction()) == pytest.approx(4 / 8)
    # the pure function agrees without the module
    keep, *_ = amf_filter(
        decision.similarities, queue_values, torch.ones(64, dtype=torch.bool), torch.tensor(True), 1.5
    )
    assert keep.tolist() == expected


def test_precision_and_recall_count_only_active_steps():
    keep = torch.tensor([False, False, True, True, False])
    noisy = torch.tensor([True, False, True, False, True])
    assert noise_confusion(keep, noisy, torch.tensor(False)).tolist() == [0, 0, 0, 0]
    counts = noise_confusion(keep, noisy, torch.tensor(True))
    assert counts.tolist() == [2, 1, 1, 1]  # filtered & noisy, filtered & clean, kept & noisy, kept & clean
    precision, recall = precision_recall(counts)
    assert float(precision) == pytest.approx(2 / 3) and float(recall) == pytest.approx(2 / 3)
    assert torch.isnan(precision_recall(torch.zeros(4))[0])


def test_training_step_zeroes_filtered_positives_but_enqueues_their_features(make_cfg):
    from hydra.utils import instantiate

    from cots.train import build_module

    cfg = make_cfg("objective.amf.queue_size=16", "objective.amf.k=1.0")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    module = build_module(cfg, datamodule.text_tokenizer.vocab_size, None)
    model, objective, amf = module.model, module.step.objective, module.amf
    with torch.no_grad():
        s = (lambda f: (f.image_keys * f.text_keys).sum(-1))(
            model(batch["images"], batch["input_ids"], batch["attention_mask"])
        )
    cut = s.median()
    amf.enqueue(torch.full((16,), float(cut)))  # a full queue with sigma 0: threshold = the median
    keep = s >= cut
    assert 0 < int(keep.sum()) < len(s)

    with torch.no_grad():
        features = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        expected = objective(features, weights=keep.float())["loss"]
        unfiltered = objective(features)["loss"]
    loss = module.training_step(batch, 0)
    torch.testing.assert_close(loss, expected)  # the step used w = keep
    assert not torch.isclose(loss, unfiltered)
    # every pair's momentum features went into the feature queues, filtered ones included
    g = len(s)
    torch.testing.assert_close(model.feature_queue.image.data[:g], features.image_keys)
    torch.testing.assert_close(model.feature_queue.text.data[:g], features.text_keys)
    assert int(model.feature_queue.image.filled) == g
    # and their similarities went into Q^s after the decision
    torch.testing.assert_close(amf.similarity_queue.ordered()[-g:], s)


def test_similarity_queue_and_noise_counts_survive_save_and_resume(make_cfg, tmp_path):
    from cots.train import train

    common = (
        "trainer.deterministic=true",
        "trainer.check_val_every_n_epoch=null",
        "trainer.limit_val_batches=0",
        "trainer.max_epochs=-1",
        "objective.amf.queue_size=24",
        "data.noise_rate=0.3",
        "callbacks.amf_histogram.every_n_steps=2",
    )
    saving = (
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.filename='s{step}'",
    )
    _, full = train(make_cfg(*common, *saving, "trainer.max_steps=4"))
    run = tmp_path / "run"
    assert (run / "amf" / "step_000002.png").is_file() and (run / "amf" / "step_000004.png").is_file()
    record = json.loads((run / "noisy_pairs.json").read_text())
    assert record["num_noisy"] == round(0.3 * record["num_pairs"])
    checkpoint = torch.load(run / "checkpoints" / "s2.ckpt", map_location="cpu", weights_only=True)
    assert int(checkpoint["state_dict"]["amf.similarity_queue.filled"]) == 24  # 2 steps x 16 > 24
    # a checkpoint from before the AMF left the objective ("objective.amf.*") resumes the same way
    checkpoint["state_dict"] = {
        k.replace("amf.", "objective.amf.", 1) if k.startswith("amf.") else k: v
        for k, v in checkpoint["state_dict"].items()
    }
    torch.save(checkpoint, run / "checkpoints" / "old_names.ckpt")

    _, resumed = train(make_cfg(*common, "trainer.max_steps=4", f"ckpt_path={run / 'checkpoints' / 'old_names.ckpt'}"))
    a, b = full["module"], resumed["module"]
    for name, buffer in a.amf.similarity_queue.named_buffers():
        torch.testing.assert_close(dict(b.amf.similarity_queue.named_buffers())[name], buffer, atol=1e-5, rtol=0)
    assert a.amf_noise_counts.sum() > 0
    torch.testing.assert_close(a.amf_noise_counts, b.amf_noise_counts)
