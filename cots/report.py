"""A one-page PNG report of a run: text queries with their top-5 images, and the training curves."""

from __future__ import annotations

import csv
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from cots.data.images import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402


@torch.no_grad()
def embed_gallery(encoder, loaders) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image embeddings (N, D), the images (N, 3, H, W), caption embeddings (M, D), text_to_image (M,)."""
    encoder.eval()
    device = next(encoder.parameters()).device
    image_emb, images, text_emb, text_to_image = [], [], [], []
    for batch in loaders[0]:
        image_emb.append(encoder.encode_image(batch["images"].to(device)).embedding.float().cpu())
        images.append(batch["images"])
    for batch in loaders[1]:
        out = encoder.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        text_emb.append(out.embedding.float().cpu())
        text_to_image.append(batch["image_index"])
    return torch.cat(image_emb), torch.cat(images), torch.cat(text_emb), torch.cat(text_to_image)


def read_curves(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of a Lightning CSVLogger file, one per column."""
    series: dict[str, list[tuple[int, float]]] = {}
    if not metrics_csv.is_file():
        return series
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            step = int(row.get("step") or 0)
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def _unnormalize(image: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (image * std + mean).clamp(0, 1).permute(1, 2, 0)


def side_panel(curves: dict[str, list[tuple[int, float]]]) -> tuple[str, list[str]]:
    """Title and curves of the panel beside the losses: validation rsum, or, for a run without
    validation, the temperature and the AMF's filtered fraction."""
    if "val/rsum" in curves:
        return "validation rsum", ["val/rsum"]
    keys = [k for k in ("train/temperature", "amf/filtered_fraction") if k in curves]
    return "no validation run: temperature and AMF filtered fraction", keys


def write_report(
    encoder, loaders, captions: list[str], metrics_csv: Path, out_png: Path, num_queries: int = 6, title: str = ""
) -> Path:
    """Draw ``num_queries`` evenly spaced gallery captions with their top-5 images (ground truth framed
    green, others red) above the loss curves and :func:`side_panel`."""
    image_emb, images, text_emb, text_to_image = embed_gallery(encoder, loaders)
    picks = torch.linspace(0, len(captions) - 1, num_queries).long().tolist()
    curves = read_curves(metrics_csv)
    fig = plt.figure(figsize=(12, 2.0 * num_queries + 3.5))
    grid = fig.add_gridspec(num_queries + 2, 6, height_ratios=[1] * num_queries + [0.2, 2.2])
    for row, t in enumerate(picks):
        top5 = (text_emb[t] @ image_emb.T).topk(5).indices.tolist()
        label = fig.add_subplot(grid[row, 0])
        label.axis("off")
        label.text(0, 0.5, textwrap.fill(captions[t], 26), fontsize=10, va="center")
        for col, i in enumerate(top5):
            ax = fig.add_subplot(grid[row, col + 1])
            ax.imshow(_unnormalize(images[i]))
            ax.set_xticks([])
            ax.set_yticks([])
            colour = "green" if i == int(text_to_image[t]) else "red"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
    loss_ax = fig.add_subplot(grid[num_queries + 1, :3])
    for key in ("train/loss", "train/inst", "train/task", "train/cmvm", "train/cmlm", "train/vilem"):
        if key in curves:
            steps, values = zip(*curves[key], strict=False)
            loss_ax.plot(steps, values, label=key)
    loss_ax.set_xlabel("step")
    loss_ax.set_title("training losses")
    loss_ax.legend(fontsize=8)
    side_ax = fig.add_subplot(grid[num_queries + 1, 3:])
    side_title, side_keys = side_panel(curves)
    for key in side_keys:
        steps, values = zip(*curves[key], strict=False)
        side_ax.plot(steps, values, marker="o" if key == "val/rsum" else None, label=key)
    side_ax.set_xlabel("step")
    side_ax.set_title(side_title)
    if side_keys:
        side_ax.legend(fontsize=8)
    fig.suptitle(title or "text queries -> top-5 images (green: ground truth)")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png
