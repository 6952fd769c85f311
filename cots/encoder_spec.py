"""The online encoder's architecture as plain data (an export's config.json) and the towers built back from it.

Two ways in: :func:`encoder_from_run_config` builds the towers a checkpoint's run built (from its resolved
Hydra config, no Hydra involved); :func:`build_encoder` builds them from :func:`describe_encoder`'s dict,
with nothing read from disk or the network (timm without pretrained weights, BERT from its config dict).
Both give a :class:`TwoStreamEncoder` in float32 whose weights are then loaded.
"""

from __future__ import annotations

from cots.models.image_tower import ImageTower
from cots.models.text_tower import TextTower
from cots.models.two_stream import TwoStreamEncoder

TOWER_TARGETS = {
    "encoder": "cots.models.two_stream.TwoStreamEncoder",
    "image_tower": "cots.models.image_tower.ImageTower",
    "text_tower": "cots.models.text_tower.TextTower",
}
# What an export's bert_config leaves out: where the weights were read from on the training machine.
DROPPED_BERT_KEYS = ("_name_or_path",)


def _square(value) -> int | list[int]:
    value = [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * 2
    return value[0] if value[0] == value[1] else value


def describe_encoder(encoder: TwoStreamEncoder) -> dict:
    """The architecture of a built encoder: ``{"embed_dim", "image_tower": {...}, "text_tower": {...}}``.

    ``image_tower`` holds :class:`ImageTower`'s arguments (the timm name and the five overrides, read from the
    built ViT); ``text_tower`` holds the pooling and the BERT config dict (``BertConfig.to_dict()``).
    """
    vit = encoder.image_tower.vit
    bert_config = encoder.text_tower.bert.config.to_dict()
    for key in DROPPED_BERT_KEYS:
        bert_config.pop(key, None)
    return {
        "embed_dim": int(encoder.embed_dim),
        "image_tower": {
            "name": encoder.image_tower.name,
            "img_size": _square(vit.patch_embed.img_size),
            "patch_size": _square(vit.patch_embed.patch_size),
            "embed_dim": int(vit.embed_dim),
            "depth": len(vit.blocks),
            "num_heads": int(vit.blocks[0].attn.num_heads),
        },
        "text_tower": {"pooling": encoder.text_tower.pooling, "bert_config": bert_config},
    }


def build_encoder(spec: dict) -> TwoStreamEncoder:
    """A :class:`TwoStreamEncoder` of :func:`describe_encoder`'s architecture, random weights, eval mode."""
    image = ImageTower(**spec["image_tower"])
    text = TextTower(bert_config=spec["text_tower"]["bert_config"], pooling=spec["text_tower"]["pooling"])
    return TwoStreamEncoder(image, text, spec["embed_dim"]).eval()


def encoder_from_run_config(encoder_config: dict, text_vocab_size: int) -> TwoStreamEncoder:
    """The online encoder a run built, from its resolved ``model.encoder`` config, for its weights to be loaded.

    Training-only switches are off (gradient checkpointing, frozen layers, drop-path, the CMVM ``[MASK]``
    embedding) and no timm checkpoint is read; a pretrained text tower is read from its local directory,
    as ``cots-eval`` does. ``text_vocab_size`` (from the run's tokenizer) sizes a from-scratch text tower.

    Raises:
        ValueError: a tower class other than this package's (the export format describes only these).
    """
    for part, target in TOWER_TARGETS.items():
        found = (encoder_config if part == "encoder" else encoder_config.get(part, {})).get("_target_", target)
        if found != target:
            raise ValueError(f"model.encoder{'' if part == 'encoder' else '.' + part} is {found}, expected {target}")
    image_args = {k: v for k, v in encoder_config["image_tower"].items() if k != "_target_"}
    image_args.update(checkpoint_path=None, grad_checkpointing=False, drop_path_rate=0.0, mask_embedding=False)
    text_args = {k: v for k, v in encoder_config["text_tower"].items() if k != "_target_"}
    text_args.update(grad_checkpointing=False, trainable_layers=None)
    if not text_args.get("pretrained"):
        text_args["vocab_size"] = text_vocab_size
    encoder = TwoStreamEncoder(ImageTower(**image_args), TextTower(**text_args), encoder_config["embed_dim"])
    return encoder.eval()
