"""Grid geometry shared by the ViT and the dVAE (METHOD §4): image_size / patch_size == dvae_size / 8.

The 8 is the dVAE's downsampling, ``cots_dvae.arch.DOWNSAMPLE``.
"""

from __future__ import annotations

from cots_dvae.arch import DOWNSAMPLE

# Config keys named in the messages; callers with other layouts pass their own.
IMAGE_SIZE_KEY = "data.image_size"
PATCH_SIZE_KEY = "model.encoder.image_tower.patch_size"
DVAE_SIZE_KEY = "data.image_tokens.dvae_input_size"


def check_grid(
    image_size: int,
    patch_size: int,
    dvae_input_size: int,
    downsample: int = DOWNSAMPLE,
    keys: tuple[str, str, str] = (IMAGE_SIZE_KEY, PATCH_SIZE_KEY, DVAE_SIZE_KEY),
) -> int:
    """Check that the ViT patch grid and the dVAE token grid are the same size.

    Args:
        image_size: ViT input side in pixels (e.g. 384).
        patch_size: ViT patch side (e.g. 16).
        dvae_input_size: dVAE input side in pixels (e.g. 192).
        downsample: dVAE downsampling factor (8 for DALL-E).
        keys: config keys of (image_size, patch_size, dvae_input_size) for the message.
    Returns:
        the grid side (e.g. 24).
    Raises:
        ValueError: naming the keys and the fix, when the grids differ or a size does not divide.
    """
    image_key, patch_key, dvae_key = keys
    if image_size % patch_size:
        raise ValueError(f"{image_key}={image_size} is not a multiple of {patch_key}={patch_size}")
    if dvae_input_size % downsample:
        raise ValueError(f"{dvae_key}={dvae_input_size} is not a multiple of the dVAE downsampling {downsample}")
    vit_grid, dvae_grid = image_size // patch_size, dvae_input_size // downsample
    if vit_grid != dvae_grid:
        raise ValueError(
            f"{image_key} / {patch_key} = {image_size} / {patch_size} = {vit_grid} patches per side, but the dVAE "
            f"grid is {dvae_key} / {downsample} = {dvae_input_size} / {downsample} = {dvae_grid} tokens per side; "
            f"set {dvae_key}={vit_grid * downsample} (or change {image_key} / {patch_key})"
        )
    return vit_grid
