"""README.md of an export: towers, data, training, the retrieval tables known for the weights, how to load it."""

from __future__ import annotations

from cots.export import IMAGE_ONNX_FILE, TEXT_ONNX_FILE

TABLE_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def human_size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1000
    raise AssertionError("unreachable")


def _evaluations(evaluations: list[dict]) -> list[str]:
    if not evaluations:
        return [
            "No retrieval table is known for these weights (the checkpoint stored no evaluation and has no",
            "`retrieval.json` beside it): score them with `cots-eval ckpt_path=<checkpoint>`.",
        ]
    lines = [
        "| source | split | step | gallery | " + " | ".join(TABLE_KEYS) + " |",
        "|---" * (4 + len(TABLE_KEYS)) + "|",
    ]
    for item in evaluations:
        table = item.get("table") or {}
        split = item.get("split") or item.get("stage") or ""
        gallery = f"{item['images']} images, {item['captions']} captions" if "images" in item else ""
        values = " | ".join(f"{table[k]:.2f}" if isinstance(table.get(k), (int, float)) else "" for k in TABLE_KEYS)
        lines.append(f"| {item.get('source', '')} | {split} | {item.get('global_step', '')} | {gallery} | {values} |")
    lines += ["", "Recall@K in percent (i2t: image query, caption gallery; t2i: the reverse); rsum is their sum."]
    return lines


def model_card(config: dict, files: dict[str, int]) -> str:
    """The card's markdown. ``files``: name -> size in bytes of what the folder holds (the card excepted)."""
    meta = config["metadata"]
    image, text = config["image_tower"], config["text_tower"]
    bert = text["bert_config"]
    data = {k: v for k, v in meta["data"].items() if v is not None}
    has_onnx = IMAGE_ONNX_FILE in files
    lines = [
        f"# {config['model_id']}",
        "",
        "A COTS two-stream image-text retrieval encoder: images and captions are embedded separately into",
        f"R^{config['embed_dim']}, L2-normalised; the score of a pair is the dot product of their embeddings.",
        f"Exported from `{meta['source_checkpoint']}` of run `{meta['task_name']}` after {meta['global_step']}"
        f" optimizer steps (epoch {meta['epoch']}, {meta['samples_seen']} pairs seen), seed {meta['seed']}.",
        "",
        "## Towers",
        "",
        "| | |",
        "|---|---|",
        f"| image | timm `{image['name']}` (no pretrained weights loaded): {image['img_size']} px, patch "
        f"{image['patch_size']}, width {image['embed_dim']}, depth {image['depth']}, {image['num_heads']} heads; "
        "[CLS] feature |",
        f"| text | BERT: width {bert['hidden_size']}, {bert['num_hidden_layers']} layers, "
        f"{bert['num_attention_heads']} heads, vocabulary {bert['vocab_size']}; {text['pooling']} pooling; "
        f"captions up to {config['max_length']} tokens |",
        f"| embedding | D = {config['embed_dim']}, linear projection of each tower's feature, L2-normalised |",
        f"| weights | {config['dtype']}; checksum (sha256 of the float32 weights) `{config['checksum']}` |",
        "",
        "## Training",
        "",
        f"Objective terms: {', '.join(meta['objective']) or 'none recorded'}; precision {meta['precision']}.",
        "Data: " + ("; ".join(f"{k} `{v}`" for k, v in data.items()) or "not recorded") + ".",
        f"Software: {', '.join(f'{k} {v}' for k, v in meta['software'].items() if v)}.",
        "",
        "## Retrieval",
        "",
        *_evaluations(meta["evaluations"]),
        "",
        "## Use",
        "",
        "```python",
        "import cots",
        "",
        'model = cots.load("path/to/this/folder")  # device="cuda" to run on a GPU',
        'images = model.encode_images(["a.jpg", "b.png"])  # (2, D) float32, L2-normalised',
        'texts = model.encode_texts(["a red circle", "a dog on a beach"])  # (2, D)',
        "scores = texts @ images.T  # rank images per caption",
        "```",
        "",
        f"Images are preprocessed as `preprocess.json` says (resize the short side to {config['image_size']}, "
        "centre crop, ImageNet mean/std); captions with `tokenizer.json` (Hugging Face `tokenizers`).",
        "Weights stored in float16 / bfloat16 are upcast to float32 when loaded; the towers compute in float32.",
    ]
    if has_onnx:
        lines += [
            "",
            f"ONNX (opset 18, float32, dynamic batch and caption length): `{IMAGE_ONNX_FILE}` takes `images` "
            f"(B, 3, {config['image_size']}, {config['image_size']}) float32; `{TEXT_ONNX_FILE}` takes `input_ids` "
            "and `attention_mask` (B, L) int64; both output `embeddings` (B, D), L2-normalised.",
        ]
    lines += ["", "## Files", "", "| file | size |", "|---|---:|"]
    lines += [f"| `{name}` | {human_size(size)} |" for name, size in sorted(files.items())]
    return "\n".join(lines) + "\n"
