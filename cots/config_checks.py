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
        raise ConfigError(f"data.image_size={image_size} is not a multiple of model.encoder.image_tower.patch_size={patch}")
    world = world_size_of(cfg.trainer)
    check_queue(cfg.model.queue_size, cfg.data.batch_size, world or 1)
    for key in ("batch_size", "image_size"):
        if cfg.data[key] <= 0:
            raise ConfigError(f"data.{key} must be positive, got {cfg.data[key]}")


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
