"""Token level in the trainer (METHOD §4): CMVM + CMLM wired through config, data, model, objective and step."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from cots import distributed
from cots.config_checks import ConfigError
from cots.data.synthetic import ensure_synthetic_dataset
from cots.image_targets import ImageTargets
from cots.masking import IGNORE_INDEX, BlockMaskGenerator, TextMasker, block_masks, sample_rng
from cots.models.cots_model import MaskedPredictions
from cots.prepare.token_cache_builder import build_token_cache
from cots.train import CONF_DIR, build_module, train
from cots.training_step import StepOutput, TrainingStep, masked_inputs
from cots_dvae import DalleTokenizer
from cots_dvae.weights import DVAEWeights, save_weights

TEXT_MASK = {"mask_prob": 0.15, "replace_prob": 0.8, "random_prob": 0.1}
TINY_DVAE = {"n_hid": 8, "n_blk_per_group": 1}
VOCAB = 64  # tiny dVAE vocabulary
# TINY (conftest) trains on 32-px images with 8-px patches: a 4x4 grid = a dVAE at 32 px.
ONLINE_TOKENS = {
    "source": "online",
    "dvae_input_size": 32,
    "vocab_size": VOCAB,
    "weights": None,
    "random_dvae": {**TINY_DVAE, "seed": 0},
    "block_mask": {"mask_ratio": 0.4, "min_num_patches": 2},
}


@pytest.fixture
def compose_run(tmp_path, data_dir):
    """The train config with ``overrides`` only (no TINY shrinking), writing under tmp_path."""

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(
                config_name="train",
                overrides=[
                    *overrides,
                    "~logger.tensorboard",
                    "trainer.enable_progress_bar=false",
                    "trainer.enable_model_summary=false",
                ],
            )
        with open_dict(cfg):
            cfg.paths.output_dir, cfg.paths.data_dir = str(tmp_path / "run"), str(data_dir)
            cfg.paths.log_dir = str(tmp_path / "logs")
        return cfg

    return _compose


def with_tokens(cfg, image_tokens: dict | None = None, text_mask: dict | None = TEXT_MASK):
    """Set data.image_tokens / data.text_mask on a composed config (the objective and model follow by interpolation)."""
    with open_dict(cfg):
        cfg.data.image_tokens = image_tokens
        cfg.data.text_mask = text_mask
    return cfg


class TermHistory(L.Callback):
    """Logged training terms after every step."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names, self.history = names, {name: [] for name in names}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        for name in self.names:
            self.history[name].append(float(trainer.callback_metrics[f"train/{name}"]))


def test_geometry_check_trains_one_step_on_576_patches_and_576_dvae_tokens(compose_run, monkeypatch):
    steps: list[StepOutput] = []
    tokens: list[torch.Size] = []
    run_step, tokenize = TrainingStep.__call__, ImageTargets.__call__

    def recording_step(self, *args) -> StepOutput:
        steps.append(run_step(self, *args))
        return steps[-1]

    def recording_tokenize(self, batch) -> torch.Tensor:
        ids = tokenize(self, batch)
        tokens.append(ids.shape)
        return ids

    monkeypatch.setattr(TrainingStep, "__call__", recording_step)
    monkeypatch.setattr(ImageTargets, "__call__", recording_tokenize)

    metrics, objects = train(compose_run("experiment=geometry_check"))
    module = objects["module"]
    assert objects["trainer"].global_step == 1 and len(steps) == 1
    assert module.model.encoder.image_tower.grid_size == (24, 24)
    assert tokens == [torch.Size([4, 24, 24])]  # the online dVAE at 192 px: 24 x 24 = 576 tokens per image
    assert steps[0].masked.patch_mask.shape == (4, 576)
    assert steps[0].masked.cmvm_logits.shape == (int(steps[0].masked.patch_mask.sum()), 8192)
    masked_fraction = steps[0].masked.patch_mask.float().mean().item()
    assert 0.3 < masked_fraction <= 0.4, masked_fraction  # BEiT blocks, about 40 %
    for name in ("cmvm", "cmvm_acc", "cmlm", "cmlm_acc", "loss"):
        assert math.isfinite(metrics[f"train/{name}"]), name
    assert abs(metrics["train/cmvm"] - math.log(8192)) < 0.5  # a fresh head over the 8192 codes
    # The dVAE is no part of the trained state.
    assert not any("tokenizer" in key or "online" in key for key in module.state_dict())


@pytest.mark.parametrize(
    "overrides,image_tokens,text_mask,keys",
    [
        (
            ["experiment=geometry_check", "data.image_tokens.dvae_input_size=128"],
            None,
            None,
            ["data.image_tokens.dvae_input_size", "model.encoder.image_tower.patch_size", "data.image_size"],
        ),
        (["objective=mvlm"], None, TEXT_MASK, ["objective.cmvm.enabled", "data.image_tokens"]),
        (["objective.cmlm.enabled=true"], None, None, ["objective.cmlm.enabled", "data.text_mask"]),
        (["objective=mvlm"], {**ONLINE_TOKENS, "block_mask": None}, TEXT_MASK, ["data.image_tokens.block_mask"]),
        (
            ["objective=mvlm", "model.encoder.image_tower.mask_embedding=false"],
            ONLINE_TOKENS,
            TEXT_MASK,
            ["model.encoder.image_tower.mask_embedding"],
        ),
        (
            ["objective=mvlm"],
            {**ONLINE_TOKENS, "random_dvae": None, "weights": "/nonexistent/dvae.safetensors"},
            TEXT_MASK,
            ["data.image_tokens.weights"],
        ),
    ],
)
def test_token_level_config_mistakes_fail_before_training(
    make_cfg, compose_run, monkeypatch, overrides, image_tokens, text_mask, keys
):
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    if overrides[0].startswith("experiment="):
        cfg = compose_run(*overrides)
    else:
        cfg = with_tokens(make_cfg(*overrides), image_tokens, text_mask)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    for key in keys:
        assert key in str(err.value), (key, str(err.value))


def test_heads_exist_only_while_their_terms_are_on(make_cfg):
    plain = build_module(make_cfg(), 200, None).state_dict()
    assert not any(k for k in plain if "cmvm" in k or "cmlm" in k or "mask_embedding" in k)

    module = build_module(with_tokens(make_cfg("objective=mvlm"), ONLINE_TOKENS), 200, None)
    model, state = module.model, module.state_dict()
    assert any(k.startswith("model.cmvm_head.") for k in state) and any(k.startswith("model.cmlm_head.") for k in state)
    assert not any(k.startswith("model.momentum_encoder.") and "head" in k for k in state)
    assert model.cmlm_head.decoder.weight is model.encoder.text_tower.word_embeddings.weight  # tied
    assert model.cmvm_head.classifier.out_features == VOCAB

    only_cmlm = build_module(with_tokens(make_cfg("objective.cmlm.enabled=true")), 200, None).model
    assert only_cmlm.cmvm_head is None and only_cmlm.encoder.image_tower.mask_embedding is None
    assert only_cmlm.cmlm_head is not None


def _hand_batch(model, batch: int = 4, length: int = 10, vocab: int = 200) -> dict:
    """A batch as MVLMCollate makes it (cached tokens), drawn at random."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (batch, length), generator=gen)
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP] in train_wordpiece's ids
    attention = torch.ones_like(ids)
    mlm_ids, mlm_labels = TextMasker(4, [0, 1, 2, 3], vocab)(ids, attention, gen)
    grid = model.encoder.image_tower.grid_size
    masks = BlockMaskGenerator(grid, mask_ratio=0.4, min_num_patches=2)
    return {
        "images": torch.randn(batch, 3, 32, 32, generator=gen),
        "input_ids": ids,
        "attention_mask": attention,
        "image_tokens": torch.randint(VOCAB, (batch, *grid), generator=gen),
        "patch_mask": block_masks(masks, batch, sample_rng(0)),
        "mlm_input_ids": mlm_ids,
        "mlm_labels": mlm_labels,
    }


def test_token_terms_train_the_mask_embedding_the_fusions_and_the_tied_decoder(make_cfg):
    torch.manual_seed(0)
    module = build_module(with_tokens(make_cfg("objective=mvlm"), {**ONLINE_TOKENS, "source": "cache"}), 200, None)
    model = module.model.train()
    terms = module.step(model, _hand_batch(model)).terms
    assert {"cmvm", "cmvm_acc", "cmlm", "cmlm_acc"} <= terms.keys()
    expected = terms["inst"] + terms["task"] + terms["cmvm"] + terms["cmlm"]
    assert torch.allclose(terms["loss"], expected)
    (terms["cmvm"] + terms["cmlm"]).backward()
    grads = {
        "[MASK] embedding": model.encoder.image_tower.mask_embedding.grad,
        "CMVM fusion": model.cmvm_head.fusion.proj.weight.grad,
        "CMLM fusion": model.cmlm_head.fusion.proj.weight.grad,
        "word embeddings (tied decoder)": model.encoder.text_tower.word_embeddings.weight.grad,
        "text [CLS] through the CMVM fusion": model.encoder.text_tower.bert.encoder.layer[0].output.dense.weight.grad,
    }
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
    # Retrieval never sees the heads: the embedding projections get no gradient from the token terms.
    assert model.encoder.image_proj.weight.grad is None and model.encoder.text_proj.weight.grad is None
    assert all(p.grad is None for p in model.momentum_encoder.parameters())


def test_masked_pairs_run_the_token_terms_on_the_first_pairs_with_their_own_fusion_rows(make_cfg):
    torch.manual_seed(0)
    cfg = with_tokens(make_cfg("objective=mvlm", "objective.masked_pairs=2"), {**ONLINE_TOKENS, "source": "cache"})
    module = build_module(cfg, 200, None)
    model, step = module.model.eval(), module.step  # eval: no dropout, each pair's pass its own
    with torch.no_grad():
        # The fusions start at zero, and BERT's initial [CLS] hardly depends on the caption: as built, any pair's
        # global feature would give the same terms. Weights that make the pairing visible:
        for head in (model.cmvm_head, model.cmlm_head):
            head.fusion.proj.weight.normal_(0.0, 0.3)
        for layer in model.encoder.text_tower.bert.encoder.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0.0, 0.2)
    batch = _hand_batch(model)  # 4 pairs
    with torch.no_grad():
        part = step(model, batch)
        assert part.masked.patch_mask.shape[0] == 2 and part.masked.mlm_labels.shape[0] == 2
        assert part.masked.cmvm_logits.shape[0] == batch["patch_mask"][:2].sum()
        # The same terms as a batch of those two pairs alone with every pair masked.
        step.objective.masked_pairs = None
        alone = step(model, {key: value[:2] for key, value in batch.items()})
    for name in ("cmvm", "cmlm", "cmvm_acc", "cmlm_acc"):
        assert torch.allclose(part.terms[name], alone.terms[name], atol=1e-6), name
    with pytest.raises(Exception, match="objective.masked_pairs must be a positive integer"):  # via hydra
        build_module(
            with_tokens(make_cfg("objective=mvlm", "objective.masked_pairs=0"), {**ONLINE_TOKENS, "source": "cache"}),
            200,
            None,
        )


def test_token_losses_divide_by_the_global_mean_count(make_cfg, monkeypatch):
    torch.manual_seed(0)
    module = build_module(with_tokens(make_cfg("objective=mvlm"), {**ONLINE_TOKENS, "source": "cache"}), 200, None)
    model, objective = module.model.eval(), module.step.objective
    batch = _hand_batch(model)
    with torch.no_grad():
        features = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        masked = model.predict_masked(features, **masked_inputs(objective, batch))
        single = objective(features, masked=masked, image_tokens=batch["image_tokens"])
        # Two ranks, the other holding twice this rank's masked positions: the mean count is 3/2 x the local one,
        # so that DDP's gradient mean is the mean over every masked position of both ranks.
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        monkeypatch.setattr(distributed, "all_reduce_sum", lambda x: 3 * x.detach())
        ddp = objective(features, masked=masked, image_tokens=batch["image_tokens"])
        for name in ("cmvm", "cmlm"):
            assert torch.allclose(ddp[name], single[name] / 1.5), name
            assert torch.equal(ddp[f"{name}_acc"], single[f"{name}_acc"])  # accuracy stays local
        # A rank with nothing masked contributes a zero term (with the others' denominator).
        nothing = MaskedPredictions(
            torch.randn(0, VOCAB),
            torch.zeros(4, 16, dtype=torch.bool),
            torch.randn(0, 200),
            torch.full((4, 10), IGNORE_INDEX),
        )
        empty = objective(features, masked=nothing, image_tokens=batch["image_tokens"])
        assert empty["cmvm"].item() == 0.0 and empty["cmlm"].item() == 0.0


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory, data_dir) -> dict:
    """A token cache of conftest's TINY synthetic training set (32 px, 4x4 tokens), built with the writer."""
    root = tmp_path_factory.mktemp("mvlm_cache")
    data = ensure_synthetic_dataset(
        data_dir / "synthetic-256-64", num_train=256, num_val=64, num_test=64, image_size=32
    )
    torch.manual_seed(0)
    dvae = DalleTokenizer(input_size=32, vocab_size=VOCAB, **TINY_DVAE)
    weights = save_weights(
        root / "dvae.safetensors", DVAEWeights(encoder=dvae.encoder.state_dict(), arch=dvae.arch, input_size=32)
    )
    out = build_token_cache(
        data / "train.json",
        DalleTokenizer(weights),
        root / "train_tokens.npy",
        image_size=32,
        crops=1,
        scale=(0.8, 1.0),
        weights=weights,
        log_every=0,
    )
    return {
        "source": "cache",
        "cache": str(out),
        "weights": str(weights),
        "dvae_input_size": 32,
        "vocab_size": VOCAB,
        "cache_crop": "any",
        "block_mask": {"mask_ratio": 0.4, "min_num_patches": 2},
    }


def test_tiny_run_on_the_token_cache_logs_falling_cmvm_and_cmlm(make_cfg, token_cache):
    cfg = with_tokens(
        make_cfg(
            "objective=mvlm",
            "trainer.max_steps=8",
            "optim.scheduler.warmup_steps=1",
            "optim.optimizer.lr=2e-3",
            "trainer.limit_val_batches=0",
        ),
        token_cache,
    )
    history = TermHistory(("cmvm", "cmlm", "cmvm_acc"))
    original = L.Trainer.__init__

    def with_history(self, *args, callbacks=None, **kwargs):
        original(self, *args, callbacks=[*(callbacks or []), history], **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(L.Trainer, "__init__", with_history)
        metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 8
    batch = next(iter(objects["datamodule"].train_dataloader()))
    assert batch["image_tokens"].shape == (16, 4, 4) and "images_dvae" not in batch
    assert batch["patch_mask"].shape == (16, 16) and batch["mlm_labels"].shape == batch["input_ids"].shape
    for name in ("cmvm", "cmlm"):
        values = history.history[name]
        assert all(math.isfinite(v) for v in values), (name, values)
        assert min(values[-3:]) < values[0], (name, values)
    assert objects["module"].step.image_targets._tokenizer is None  # targets came from the cache: no dVAE built


@pytest.mark.slow
def test_resume_reproduces_an_uninterrupted_run_with_mvlm_on(make_cfg, tmp_path):
    common = (
        "objective=mvlm",
        "trainer.deterministic=true",
        "trainer.check_val_every_n_epoch=null",
        "trainer.val_check_interval=null",
        "trainer.limit_val_batches=0",
        "trainer.max_epochs=-1",
        "data.train_transform.scale=[0.3,1.0]",
        "data.synthetic.num_train=64",
    )
    saving = (
        "callbacks.model_checkpoint.every_n_train_steps=5",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.filename='s{step}'",
    )
    _, full = train(with_tokens(make_cfg(*common, "trainer.max_steps=15"), ONLINE_TOKENS))
    train(with_tokens(make_cfg(*common, *saving, "trainer.max_steps=7"), ONLINE_TOKENS))
    ckpt = tmp_path / "run" / "checkpoints" / "s5.ckpt"
    _, resumed = train(with_tokens(make_cfg(*common, "trainer.max_steps=15", f"ckpt_path={ckpt}"), ONLINE_TOKENS))
    expected = {k: v.detach().clone() for k, v in full["module"].model.state_dict().items()}
    got = {k: v.detach().clone() for k, v in resumed["module"].model.state_dict().items()}
    assert expected.keys() == got.keys() and any(k.startswith("cmvm_head.") for k in got)
    diffs = {k: (expected[k].float() - got[k].float()).abs().max().item() for k in expected}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-5, (worst, diffs[worst])
    assert OmegaConf.select(OmegaConf.create(resumed["module"].run_config), "objective.cmvm.enabled") is True
