"""The report PNG: queries with their top-5 images, the loss curves, and a side panel that fits the run."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cots.models.two_stream import TowerOutput
from cots.report import read_curves, side_panel, write_report


class MeanColourEncoder(nn.Module):
    """Embeds an image by its mean colour and a caption by its first three ids: enough to rank."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def encode_image(self, images: torch.Tensor) -> TowerOutput:
        z = F.normalize(images.mean(dim=(2, 3)) * self.scale, dim=-1)  # B x 3
        return TowerOutput(z, z, z[:, None])

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TowerOutput:
        z = F.normalize(input_ids[:, :3].float(), dim=-1)  # B x 3
        return TowerOutput(z, z, z[:, None])


def _write_csv(path: Path, rows: list[dict]) -> Path:
    keys = sorted({k for row in rows for k in row})
    lines = [",".join(keys)] + [",".join(str(row.get(k, "")) for k in keys) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_side_panel_shows_validation_or_what_a_run_without_it_has(tmp_path: Path):
    with_val = read_curves(
        _write_csv(tmp_path / "a.csv", [{"step": 4, "train/loss": 5.0}, {"step": 9, "val/rsum": 80.0}])
    )
    assert side_panel(with_val) == ("validation rsum", ["val/rsum"])
    without = read_curves(
        _write_csv(
            tmp_path / "b.csv",
            [{"step": 4, "train/loss": 5.0, "train/temperature": 0.07, "amf/filtered_fraction": 0.1}],
        )
    )
    title, keys = side_panel(without)
    assert keys == ["train/temperature", "amf/filtered_fraction"] and "no validation" in title


def test_report_png_is_written_for_a_run_without_validation(tmp_path: Path):
    colours = torch.eye(3)[torch.tensor([0, 1, 2, 0, 1, 2])] + 0.1  # 6 images, mean colour = class
    images = colours[:, :, None, None].expand(6, 3, 8, 8).contiguous()
    ids = torch.cat([(colours * 10).long(), torch.ones(6, 2, dtype=torch.long)], dim=1)
    loaders = [
        [{"images": images}],
        [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "image_index": torch.arange(6)}],
    ]
    metrics = _write_csv(
        tmp_path / "metrics.csv",
        [{"step": s, "train/loss": 6 - s / 10, "train/temperature": 0.07} for s in range(0, 30, 5)],
    )
    png = write_report(
        MeanColourEncoder(),
        loaders,
        [f"caption {i}" for i in range(6)],
        metrics,
        tmp_path / "report.png",
        num_queries=3,
    )
    with Image.open(png) as im:
        assert im.size[0] > 500 and im.size[1] > 500
