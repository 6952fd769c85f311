"""Each objective term of a real step against METHOD §3-7 written out by hand (float64).

The references read the towers directly (``test_wiring_common.encode``) and the queue rows the test
wrote itself, so a term fed the wrong tensor (a swapped modality, the online key instead of the
momentum key, another pair's feature, an empty queue slot) no longer matches.
"""

from __future__ import annotations

import pytest
import torch
from test_wiring_common import (
    BATCH,
    IMAGE_VOCAB,
    TEXT_VOCAB,
    assert_terms,
    build,
    encode,
    fill_queue,
    make_batch,
    own_targets,
    reference_inst,
    reference_task,
    reference_token_terms,
    run_step,
    set_similarity_queue,
    vilem_settings,
)

from cots.losses.task import TASK_DIRECTIONS
from cots.masking import IGNORE_INDEX
from cots.objective import COTSObjective
from cots.training_step import TrainingStep

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny towers: threads only add overhead

FILLED = 7  # of QUEUE_SIZE = 12 slots: five stay empty


def _tau(model) -> float:
    return float(model.temperature())


def test_inst_uses_the_other_modalitys_momentum_keys_then_its_queue():
    """L_inst, L_i2t and L_t2i: z^v against [zhat^t ; Q^t], z^t against [zhat^v ; Q^v], own key positive."""
    model, training_step = build()
    queue_v, queue_t = fill_queue(model, FILLED)
    batch = make_batch()
    terms = run_step(model, training_step, batch).terms
    enc = encode(model, batch)
    assert_terms(terms, reference_inst(enc, queue_v, queue_t, _tau(model)))
    swapped = reference_inst(enc, queue_t, queue_v, _tau(model))  # the test can tell the queues apart
    assert abs(float(swapped["inst"]) - float(terms["inst"])) > 1e-3


def test_task_reads_the_other_modalitys_queue_and_own_momentum_key():
    """L_task: p^{i2t} over [z^v.zhat^t_i ; z^v.Q^t], p^{t2i} over [z^t.zhat^v_i ; z^t.Q^v] (queues not swapped)."""
    model, training_step = build(task={"enabled": True})
    queue_v, queue_t = fill_queue(model, FILLED)
    batch = make_batch()
    terms = run_step(model, training_step, batch).terms
    enc = encode(model, batch)
    expected = reference_task(enc, queue_v, queue_t, _tau(model))
    assert_terms(terms, {"task": expected})
    swapped = reference_task(enc, queue_t, queue_v, _tau(model))
    assert abs(float(swapped) - float(expected)) > 1e-4  # swapping the queues would be seen


@pytest.mark.parametrize("direction", TASK_DIRECTIONS)
def test_task_direction_is_the_configured_one(direction):
    """objective.task.direction: KL(p_i2t || p_t2i), the reverse, or their mean; the three differ here."""
    model, training_step = build(task={"enabled": True, "direction": direction})
    queue_v, queue_t = fill_queue(model, FILLED)
    batch = make_batch()
    terms = run_step(model, training_step, batch).terms
    enc = encode(model, batch)
    values = {d: float(reference_task(enc, queue_v, queue_t, _tau(model), d)) for d in TASK_DIRECTIONS}
    assert len({round(v, 6) for v in values.values()}) == 3, values
    assert_terms(terms, {"task": torch.tensor(values[direction])})


def test_task_temperature_fixed_or_the_models():
    """objective.task.temperature: null follows the model's tau; a value fixes tau_task and leaves L_inst at tau."""
    model, training_step = build(task={"enabled": True}, temperature=0.2)
    queue_v, queue_t = fill_queue(model, FILLED)
    batch = make_batch()
    enc = encode(model, batch)

    def expected(tau_task: float, tau: float) -> dict[str, torch.Tensor]:
        return {"task": reference_task(enc, queue_v, queue_t, tau_task), **reference_inst(enc, queue_v, queue_t, tau)}

    assert_terms(run_step(model, training_step, batch).terms, expected(0.2, 0.2))

    fixed_objective = TrainingStep.from_config(COTSObjective(task={"enabled": True, "temperature": 0.45}))
    assert_terms(run_step(model, fixed_objective, batch).terms, expected(0.45, 0.2))
    with torch.no_grad():
        model.log_temperature.fill_(torch.tensor(0.05).log().item())  # the model's tau moves, tau_task does not
    assert_terms(run_step(model, fixed_objective, batch).terms, expected(0.45, 0.05))


def test_model_temperature_scales_inst_and_is_clamped():
    """model.temperature sets the initial tau of L_inst; tau is clamped to [0.001, 0.5]."""
    batch = make_batch()
    for initial, used in ((0.03, 0.03), (0.3, 0.3), (2.0, 0.5)):
        model, training_step = build(temperature=initial)
        queue_v, queue_t = fill_queue(model, FILLED)
        terms = run_step(model, training_step, batch).terms
        assert_terms(terms, reference_inst(encode(model, batch), queue_v, queue_t, used))
    with torch.no_grad():
        model.log_temperature.fill_(-20.0)
    assert float(model.temperature()) == pytest.approx(0.001)


def test_empty_queue_slots_are_never_keys():
    """Garbage written into the unfilled slots (and matching pair groups there) changes no term."""
    batch = {**make_batch(), "pair_groups": torch.tensor([7, 7, 3, -1])}
    model, training_step = build(task={"enabled": True, "direction": "symmetric"})
    enc = encode(model, batch)
    attractive = torch.nn.functional.normalize((enc.z_v + enc.z_t).sum(0).float(), dim=0)  # D: near every query
    groups = torch.tensor([3, 5, 7, 9, 1, 3, 2])  # FILLED rows: rows 2 (7) and 0, 5 (3) are positives of pairs 0-2
    queue_v, queue_t = fill_queue(model, FILLED, garbage=attractive, groups=groups)
    with torch.no_grad():
        model.feature_queue.groups.data[FILLED:] = 7  # empty slots whose group matches pairs 0 and 1
    terms = run_step(model, training_step, batch).terms

    # Positives of query i: its own key, then every filled key of its group (groups of -1 match nothing).
    key_groups = torch.cat([batch["pair_groups"], groups])  # (B + FILLED)
    same = (key_groups[None, :] == batch["pair_groups"][:, None]) & (batch["pair_groups"][:, None] >= 0)
    targets = (same | own_targets(BATCH, len(key_groups)).bool()).double()
    targets = targets / targets.sum(1, keepdim=True)
    expected = reference_inst(enc, queue_v, queue_t, _tau(model), targets=targets)
    expected["task"] = reference_task(enc, queue_v, queue_t, _tau(model), "symmetric")
    assert_terms(terms, expected)
    positives = (targets > 0).sum(1).double().mean()
    assert float(positives) > 1 and float(terms["inst_positives"]) == pytest.approx(float(positives))


def test_each_weight_scales_its_own_term_in_the_total():
    """loss = w_inst L_inst + w_task L_task + w_cmvm L_cmvm + w_cmlm L_cmlm, with the references' values."""
    weights = {"inst": 0.7, "task": 1.3, "cmvm": 0.4, "cmlm": 2.1}
    model, training_step = build(
        inst={"weight": weights["inst"]},
        task={"enabled": True, "weight": weights["task"]},
        cmvm={"enabled": True, "weight": weights["cmvm"]},
        cmlm={"enabled": True, "weight": weights["cmlm"]},
    )
    queue_v, queue_t = fill_queue(model, FILLED)
    batch = make_batch()
    terms = run_step(model, training_step, batch).terms
    enc = encode(model, batch)
    expected = {
        **reference_inst(enc, queue_v, queue_t, _tau(model)),
        "task": reference_task(enc, queue_v, queue_t, _tau(model)),
        **reference_token_terms(model, batch),
    }
    expected["loss"] = sum(weight * expected[name] for name, weight in weights.items())
    assert_terms(terms, expected)


@pytest.mark.parametrize("off", ["task", "cmvm", "cmlm"])
def test_a_switched_off_term_is_neither_computed_nor_added(off):
    """objective.<term>.enabled=false: the term leaves the total and the logged terms."""
    settings = {name: {"enabled": name != off, "weight": 3.0} for name in ("task", "cmvm", "cmlm")}
    model, training_step = build(**settings)
    queue_v, queue_t = fill_queue(model, FILLED)
    batch = make_batch()
    if off == "cmvm":
        del batch["patch_mask"], batch["image_tokens"]  # not needed when CMVM is off
    terms = run_step(model, training_step, batch).terms
    assert off not in terms and f"{off}_acc" not in terms
    enc = encode(model, batch)
    expected = {"inst": reference_inst(enc, queue_v, queue_t, _tau(model))["inst"]}
    expected.update(reference_token_terms(model, batch))
    if off != "task":
        expected["task"] = reference_task(enc, queue_v, queue_t, _tau(model))
    total = expected["inst"] + sum(3.0 * expected[name] for name in ("task", "cmvm", "cmlm") if name in expected)
    assert_terms(terms, {**expected, "loss": total})


def test_token_terms_predict_the_masked_positions_from_the_partners_global_feature():
    """L_cmvm and L_cmlm (and their accuracies) against METHOD §4 written out on every pair."""
    model, training_step = build(cmvm={"enabled": True}, cmlm={"enabled": True})
    batch = make_batch()
    step = run_step(model, training_step, batch)
    assert_terms(step.terms, reference_token_terms(model, batch))
    # targets set to the head's own best guesses: the accuracy must then be exactly 1
    batch["image_tokens"].view(BATCH, -1)[batch["patch_mask"]] = step.masked.cmvm_logits.argmax(1)
    assert_terms(run_step(model, training_step, batch).terms, {"cmvm_acc": torch.tensor(1.0)})


def test_masked_pairs_limit_the_token_terms_to_the_first_pairs():
    """objective.masked_pairs=2: CMVM/CMLM read pairs 0-1 (fused with rows 0-1); L_inst still reads all four."""
    model, training_step = build(cmvm={"enabled": True}, cmlm={"enabled": True}, masked_pairs=2)
    queue_v, queue_t = fill_queue(model, FILLED)
    batch = make_batch()
    step = run_step(model, training_step, batch)
    assert step.masked.patch_mask.shape[0] == 2 and step.masked.mlm_labels.shape[0] == 2
    expected = reference_inst(encode(model, batch), queue_v, queue_t, _tau(model))
    assert_terms(step.terms, {**expected, **reference_token_terms(model, batch, pairs=2)})
    later = dict(batch, images=batch["images"].clone(), mlm_input_ids=batch["mlm_input_ids"].clone())
    later["images"][2:] += 1.0
    later["mlm_input_ids"][2:, 1] = 5 + (later["mlm_input_ids"][2:, 1] + 7) % (TEXT_VOCAB - 5)  # other words
    moved = run_step(model, training_step, later).terms
    for name in ("cmvm", "cmlm"):
        torch.testing.assert_close(moved[name], step.terms[name], rtol=0, atol=1e-6, msg=name)
    assert abs(float(moved["inst"]) - float(step.terms["inst"])) > 1e-4


def test_amf_weights_reach_inst_and_task_but_not_the_token_terms():
    """METHOD §6: a filtered pair leaves L_inst and L_task (w_i = 0), while its masked tokens stay targets."""
    model, training_step = build(
        task={"enabled": True},
        amf={"enabled": True, "k": 1.0, "queue_size": 8},
        cmvm={"enabled": True},
        cmlm={"enabled": True},
    )
    queue_v, queue_t = fill_queue(model, FILLED)
    batch = make_batch()
    enc = encode(model, batch)
    s = enc.positive_similarity.float()
    low = s.sort().values
    threshold = float(low[1] + low[2]) / 2  # the two least similar pairs fall below it
    set_similarity_queue(training_step, mean=threshold + 0.1, std=0.1)  # mu - 1 sigma = threshold
    step = run_step(model, training_step, batch)
    keep = s >= threshold
    assert int(keep.sum()) == 2
    assert step.decision.weights.tolist() == keep.float().tolist()
    tau = _tau(model)
    expected = {
        **reference_inst(enc, queue_v, queue_t, tau, weights=keep),
        "task": reference_task(enc, queue_v, queue_t, tau, weights=keep),
        **reference_token_terms(model, batch),
    }
    assert_terms(step.terms, expected)
    unweighted = reference_inst(enc, queue_v, queue_t, tau)["inst"]
    assert abs(float(unweighted) - float(step.terms["inst"])) > 1e-4  # the filter changed L_inst


def test_amf_k_sets_the_threshold_on_the_momentum_similarities():
    """objective.amf.k: pair i is kept while zhat^v_i . zhat^t_i >= mu - k sigma of Q^s (two k, two keep sets)."""
    batch = make_batch()
    decisions = {}
    for k in (0.5, 2.0):
        model, training_step = build(amf={"enabled": True, "k": k, "queue_size": 8})
        enc = encode(model, batch)
        s = enc.positive_similarity.float().sort().values
        # mu - 0.5 sigma lies between the two most similar pairs, mu - 2 sigma between the two least similar
        sigma = float((s[2] + s[3]) / 2 - (s[0] + s[1]) / 2) / 1.5
        set_similarity_queue(training_step, mean=float(s[2] + s[3]) / 2 + 0.5 * sigma, std=sigma)
        step = run_step(model, training_step, batch)
        torch.testing.assert_close(step.decision.similarities.double(), enc.positive_similarity, rtol=0, atol=1e-6)
        decisions[k] = int(step.decision.keep.sum())
        expected = enc.positive_similarity >= float(step.decision.threshold)
        assert step.decision.keep.tolist() == expected.tolist()
        torch.testing.assert_close(
            float(step.decision.threshold), float(step.decision.mean) - k * sigma, rtol=0, atol=1e-6
        )
    assert decisions == {0.5: 1, 2.0: 3}


def test_vilem_terms_score_the_edits_against_their_labels():
    """L_vilem = BCE(detection) over real words + CE(correction) at replaced words, with its weight in the total."""
    model, training_step = build(text_layers=2, cmlm={"enabled": True}, vilem=vilem_settings(weight=0.6))
    batch = make_batch()
    step = run_step(model, training_step, batch)
    edited, predicted = step.errors
    scored = edited.detection_labels != IGNORE_INDEX
    x, y = predicted.detection_logits[scored].double(), edited.detection_labels[scored].double()
    detection = torch.nn.functional.binary_cross_entropy_with_logits(x, y)
    replaced = edited.replaced
    assert replaced.any() and not (replaced & ~scored).any()
    correction_targets = batch["input_ids"][replaced]  # the original words
    log_p = predicted.correction_logits.double().log_softmax(1)
    correction = -log_p.gather(1, correction_targets[:, None]).mean()
    expected = {
        "vilem_det": detection,
        "vilem_cor": correction,
        "vilem": detection + correction,
        "vilem_det_acc": ((x > 0).double() == y).double().mean(),
        "vilem_cor_acc": (predicted.correction_logits.argmax(1) == correction_targets).double().mean(),
    }
    cmlm_and_inst = step.terms["inst"] + step.terms["cmlm"]
    assert_terms(step.terms, {**expected, "loss": cmlm_and_inst.double() + 0.6 * expected["vilem"]})


def test_online_dvae_tokens_of_the_dvae_views_are_the_cmvm_targets():
    """Without cached tokens the targets are the dVAE's ids of ``images_dvae`` (of the pairs the masked pass reads)."""
    from cots_dvae import DalleTokenizer

    tokens_cfg = {
        "source": "online",
        "dvae_input_size": 32,
        "vocab_size": IMAGE_VOCAB,
        "weights": None,
        "random_dvae": {"n_hid": 8, "n_blk_per_group": 1, "seed": 3},
    }
    model, training_step = build(cmvm={"enabled": True}, masked_pairs=3, image_tokens=tokens_cfg)
    batch = make_batch()
    del batch["image_tokens"]
    batch["images_dvae"] = _rectangles(BATCH)  # a random dVAE gives varied ids to these, not to noise
    step = run_step(model, training_step, batch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        dvae = DalleTokenizer(input_size=32, vocab_size=IMAGE_VOCAB, n_hid=8, n_blk_per_group=1)
    tokens = dvae.tokenize(batch["images_dvae"][:3])  # 3 x 4 x 4
    assert tokens.unique().numel() > 4
    assert_terms(step.terms, reference_token_terms(model, {**batch, "image_tokens": tokens}, pairs=3))
    other = dvae.tokenize(batch["images"][:3].clamp(0, 1))  # what the ViT view would give: other targets
    assert not torch.equal(tokens, other)


def _rectangles(batch: int, seed: int = 5) -> torch.Tensor:
    """(B, 3, 32, 32) dVAE views in [0, 1]: three coloured rectangles per image on black."""
    gen = torch.Generator().manual_seed(seed)
    views = torch.zeros(batch, 3, 32, 32)
    for image in range(batch):
        for _ in range(3):
            channel = int(torch.randint(3, (1,), generator=gen))
            top, left = torch.randint(0, 24, (2,), generator=gen).tolist()
            views[image, channel, top : top + 9, left : left + 13] = 1.0
    return views
