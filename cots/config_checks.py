"""Start-up validation: a config that cannot work fails before any training, naming the key."""

from __future__ import annotations

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A configuration mistake; the message names the offending key."""


def _as_int(value) -> int | None:
    return value if isinstance(value, int) and value > 0 else None


def world_size_of(trainer_cfg: DictConfig) -> int | None:
    """Processes the trainer config asks for, when it says so explicitly (None for 'auto' / -1)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, (list, tuple)) or hasattr(devices, "__len__") and not isinstance(devices, str):
        devices = len(devices)
    devices = _as_int(devices)
    nodes = _as_int(trainer_cfg.get("num_nodes", 1))
    return devices * nodes if devices and nodes else None


def check_config(cfg: DictConfig) -> None:
    """Checks that need no data and no model: raise :class:`ConfigError` on the first problem."""
    import timm

    tower = cfg.model.encoder.image_tower
    if not timm.is_model(tower.name):
        raise ConfigError(f"model.encoder.image_tower.name: unknown timm model '{tower.name}'")
    patch = tower.get("patch_size") or _default_patch_size(tower.name)
    image_size = cfg.data.image_size
    if patch and image_size % patch != 0:
        raise ConfigError(
            f"data.image_size={image_size} is not a multiple of model.encoder.image_tower.patch_size={patch}"
        )
    world = world_size_of(cfg.trainer)
    check_queue(cfg.model.queue_size, cfg.data.batch_size, world or 1)
    for key in ("batch_size", "image_size"):
        if cfg.data[key] <= 0:
            raise ConfigError(f"data.{key} must be positive, got {cfg.data[key]}")
    check_token_level(cfg, patch)
    check_vilem(cfg)
    check_fused_optimizer(cfg)


def check_fused_optimizer(cfg: DictConfig) -> None:
    """A fused optimizer unscales fp16 gradients itself, so Lightning cannot clip them first."""
    fused = cfg.optim.optimizer.get("fused")
    fp16 = str(cfg.trainer.get("precision")) in ("16", "16-mixed")
    if fused and fp16 and cfg.trainer.get("gradient_clip_val"):
        raise ConfigError(
            "optim.optimizer.fused=true cannot be combined with trainer.precision=16-mixed and "
            "trainer.gradient_clip_val: use bf16-mixed, optim.optimizer.fused=null, or gradient_clip_val=null"
        )


def check_vilem(cfg: DictConfig) -> None:
    """ViLEM (METHOD §7): a generator that exists and a model that has the head."""
    if not _enabled(cfg, "vilem"):
        return
    vilem = cfg.objective.vilem
    if not cfg.model.get("vilem_head"):
        raise ConfigError(
            "objective.vilem.enabled=true needs model.vilem_head=true (its default follows the objective)"
        )
    generator = vilem.get("generator", "cmlm")
    if generator in ("cmlm", "cmlm_image") and not _enabled(cfg, "cmlm"):
        raise ConfigError(
            f"objective.vilem.generator={generator} draws errors from the CMLM head: set objective.cmlm.enabled=true "
            "(and data.text_mask), or objective.vilem.generator=<local masked-LM directory>"
        )
    if generator not in ("cmlm", "cmlm_image"):
        from cots.local_paths import resolve_local_dir

        try:
            directory = resolve_local_dir(generator)
        except FileNotFoundError as err:
            raise ConfigError(f"objective.vilem.generator: {err}") from err
        if not (directory / "config.json").is_file():
            raise ConfigError(
                f"objective.vilem.generator: no config.json in {directory} (a Hugging Face masked-LM dir)"
            )
    if not 0 < float(vilem.get("ratio", 0.15)) <= 1:
        raise ConfigError(f"objective.vilem.ratio must be in (0, 1], got {vilem.get('ratio')}")
    if int(vilem.get("top_k", 10)) < 1:
        raise ConfigError(f"objective.vilem.top_k must be at least 1, got {vilem.get('top_k')}")


def _enabled(cfg: DictConfig, term: str) -> bool:
    settings = cfg.objective.get(term)
    return bool(settings is not None and settings.get("enabled", False))


def check_token_level(cfg: DictConfig, patch: int | None) -> None:
    """CMVM / CMLM (METHOD §4): the data provides what the terms need, and the ViT and dVAE grids agree."""
    tokens, text_mask = cfg.data.get("image_tokens"), cfg.data.get("text_mask")
    cmvm, cmlm = _enabled(cfg, "cmvm"), _enabled(cfg, "cmlm")
    if cmvm and tokens is None:
        raise ConfigError(
            "objective.cmvm.enabled=true needs dVAE targets: set data.image_tokens "
            "(e.g. {source: online, dvae_input_size: ..., weights: ..., vocab_size: ..., block_mask: ...}) "
            "or objective.cmvm.enabled=false"
        )
    if cmlm and text_mask is None:
        raise ConfigError(
            "objective.cmlm.enabled=true needs masked captions: set data.text_mask "
            "(e.g. {mask_prob: 0.15, replace_prob: 0.8, random_prob: 0.1}) or objective.cmlm.enabled=false"
        )
    for term, on in (("cmvm", cmvm), ("cmlm", cmlm)):
        if on and not cfg.model.get(f"{term}_head"):
            raise ConfigError(
                f"objective.{term}.enabled=true needs model.{term}_head=true (its default follows the objective)"
            )
    if text_mask is not None:
        probs = {
            k: float(text_mask.get(k, d)) for k, d in (("mask_prob", 0.15), ("replace_prob", 0.8), ("random_prob", 0.1))
        }
        if not (
            0 < probs["mask_prob"] <= 1
            and probs["replace_prob"] >= 0
            and probs["random_prob"] >= 0
            and probs["replace_prob"] + probs["random_prob"] <= 1
        ):
            raise ConfigError(
                f"data.text_mask: need 0 < mask_prob <= 1 and replace_prob + random_prob <= 1, got {probs}"
            )
    if tokens is not None:
        _check_image_tokens(cfg, tokens, patch, cmvm)


def _check_image_tokens(cfg: DictConfig, tokens: DictConfig, patch: int | None, cmvm: bool) -> None:
    from cots.geometry import check_grid
    from cots.masking import BlockMaskGenerator
    from cots_dvae.arch import DOWNSAMPLE

    source = tokens.get("source", "online")
    if source not in ("cache", "online"):
        raise ConfigError(f"data.image_tokens.source must be 'cache' or 'online', got {source!r}")
    size = tokens.get("dvae_input_size")
    if not isinstance(size, int) or size <= 0:
        raise ConfigError(
            f"data.image_tokens.dvae_input_size must be a positive int (the ViT patch grid x 8), got {size!r}"
        )
    if patch:
        try:
            grid = check_grid(cfg.data.image_size, patch, size)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    else:
        grid = size // DOWNSAMPLE
    if source == "cache" and not str(tokens.get("cache") or "").endswith(".npy"):
        raise ConfigError(f"data.image_tokens.cache must be the token cache's .npy file, got {tokens.get('cache')!r}")
    if source == "online" and not tokens.get("weights") and tokens.get("random_dvae") is None:
        raise ConfigError("data.image_tokens.source=online needs data.image_tokens.weights (a dVAE .safetensors)")
    if tokens.get("block_mask") is not None:
        try:
            BlockMaskGenerator(grid, **tokens.block_mask)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"data.image_tokens.block_mask: {err}") from None
    if not cmvm:
        return
    if tokens.get("block_mask") is None:
        raise ConfigError("objective.cmvm.enabled=true needs data.image_tokens.block_mask (which patches to mask)")
    vocab = tokens.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 2:
        raise ConfigError(
            f"objective.cmvm.enabled=true needs data.image_tokens.vocab_size (the dVAE's codes), got {vocab!r}"
        )
    if not cfg.model.encoder.image_tower.get("mask_embedding"):
        raise ConfigError("objective.cmvm.enabled=true needs model.encoder.image_tower.mask_embedding=true")


def check_queue(queue_size: int, batch_size: int, world_size: int) -> None:
    """The queue must hold at least one global batch (it wraps around otherwise)."""
    global_batch = batch_size * world_size
    if queue_size < global_batch:
        raise ConfigError(
            f"model.queue_size={queue_size} is smaller than the global batch "
            f"(data.batch_size={batch_size} x {world_size} processes = {global_batch})"
        )


def _default_patch_size(name: str) -> int | None:
    for token in name.split("_"):
        if token.startswith("patch") and token[5:].isdigit():
            return int(token[5:])
    return None
