"""Test helpers for WebDataset / img2dataset shards: images, a range-serving HTTP server, img2dataset itself,
the same pairs as a manifest, and a data module that replays a recorded batch order over that manifest."""

from __future__ import annotations

import csv
import http.server
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Sampler

from cots.data.datamodule import ImageTextDataModule
from cots.data.datasets import ImageTextPairs
from cots.data.images import load_rgb
from cots.data.shard_set import build_shard_set
from cots.data.tar_reader import read_shard
from cots.prepare.manifest_writer import write_manifest

# img2dataset input: url i is served as a good JPEG unless i % PERIOD is one of these.
PERIOD = 16
TRUNCATED, GARBAGE, NOT_SERVED, EMPTY_CAPTION = 3, 5, 7, 9


def jpeg_bytes(seed: int, width: int = 40, height: int = 32, quality: int = 90) -> bytes:
    """A JPEG of smooth colour gradients plus noise (seeded), like a photo at small scale."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = rng.uniform(0, 255, size=(3, 1, 1)) * (1 - x) + rng.uniform(0, 255, size=(3, 1, 1)) * y
    pixels = np.clip(base + rng.normal(0, 12, size=(3, height, width)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels.transpose(1, 2, 0)).save(out, "JPEG", quality=quality)
    return out.getvalue()


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """GET / HEAD of the files under ``server.root`` with single byte ranges (206), ETag and Content-Length.

    Every request is appended to ``server.requests`` as (method, path, range header, bytes sent).
    """

    def _serve(self, send_body: bool) -> None:
        path = Path(self.server.root) / self.path.split("?")[0].lstrip("/")
        if not path.is_file():
            self.send_error(404)
            self.server.requests.append((self.command, self.path, None, 0))
            return
        stat = path.stat()
        size, header = stat.st_size, self.headers.get("Range")
        lo, hi = 0, size - 1
        if header and header.startswith("bytes="):
            first, _, last = header[6:].partition("-")
            lo = int(first) if first else max(0, size - int(last))
            hi = min(size - 1, int(last)) if first and last else size - 1
        body = b""
        if send_body:
            with open(path, "rb") as f:
                f.seek(lo)
                body = f.read(hi - lo + 1)
        self.send_response(206 if header else 200)
        self.send_header("Content-Length", str(hi - lo + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{stat.st_size}-{stat.st_mtime_ns}"')
        if header:
            self.send_header("Content-Range", f"bytes {lo}-{hi}/{size}")
        self.end_headers()
        if send_body:
            self.wfile.write(body)
        self.server.requests.append((self.command, self.path, header, len(body)))

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._serve(True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(False)

    def log_message(self, *args) -> None:  # quiet
        pass


@contextmanager
def http_server(root: Path):
    """Serve ``root`` on 127.0.0.1 (a free port) in a thread; yields the server (``.url``, ``.requests``)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.root, server.requests = str(root), []
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def make_url_images(root: Path, count: int, base_url: str) -> Path:
    """``count`` images under ``root/www`` (some truncated, some garbage, some not there) and a CSV of url, caption."""
    www = root / "www"
    www.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        data = jpeg_bytes(i, width=40 + i % 7, height=32 + i % 5)
        if i % PERIOD == TRUNCATED:
            data = data[: len(data) // 2]
        elif i % PERIOD == GARBAGE:
            data = b"this is not an image " * 8
        if i % PERIOD != NOT_SERVED:
            (www / f"{i:04d}.jpg").write_bytes(data)
        caption = "" if i % PERIOD == EMPTY_CAPTION else f"a picture number {i} with colours {i % 5}"
        rows.append((f"{base_url}/{i:04d}.jpg", caption))
    with open(root / "urls.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "caption"])
        writer.writerows(rows)
    return root / "urls.csv"


def run_img2dataset(url_list: Path, out: Path, samples_per_shard: int) -> None:
    """img2dataset's own download into WebDataset tars, original bytes kept (``disable_all_reencoding``:
    corrupt downloads reach the tars, as they do for anyone who keeps the originals)."""
    code = (
        "from img2dataset import download; "
        f"download(url_list={str(url_list)!r}, input_format='csv', url_col='url', caption_col='caption', "
        f"output_format='webdataset', output_folder={str(out)!r}, processes_count=1, thread_count=4, "
        f"number_sample_per_shard={samples_per_shard}, disable_all_reencoding=True, timeout=10, retries=0)"
    )
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def truncate_shard(path: Path, keep_samples: int) -> None:
    """Cut a tar by hand in the middle of the image data of sample ``keep_samples`` (0-based)."""
    keys, cut = [], None
    with tarfile.open(path) as tar:
        for member in tar:
            key = member.name.split(".")[0]
            if key not in keys:
                keys.append(key)
            if len(keys) == keep_samples + 1 and member.name.endswith(".jpg"):
                cut = member.offset_data + member.size // 2
                break
    assert cut is not None, (path, keep_samples)
    with open(path, "r+b") as f:
        f.truncate(cut)


URLS, PER_SHARD = 80, 16  # 5 shards of 15 samples (one url in 16 is not served)
KEEP_IN_CUT_SHARD = 6  # 00004.tar is cut inside its 7th sample


def img2dataset_folder(tmp_path_factory) -> Path:
    """img2dataset output (5 shards + parquet + _stats.json), the last shard cut by hand, indexed beside.

    Built once per test session (under the session's base folder) for every module that asks.
    """
    from cots.prepare.cli import main as cots_data

    root = tmp_path_factory.getbasetemp() / "img2dataset"
    shards = root / "shards"
    if (shards / "cots-index.json").is_file():
        return shards
    (root / "www").mkdir(parents=True, exist_ok=True)
    with http_server(root / "www") as server:
        url_list = make_url_images(root, URLS, server.url)
        run_img2dataset(url_list, shards, PER_SHARD)
    assert sorted(p.name for p in shards.glob("*.tar")) == [f"{i:05d}.tar" for i in range(5)]
    truncate_shard(shards / "00004.tar", KEEP_IN_CUT_SHARD)
    assert cots_data(["index-shards", str(shards), "--workers", "2"]) == 0
    return shards


def shard_pairs_to_manifest(shards, out: Path) -> Path:
    """The samples of the shards, in sample-id order, as image files + ``manifest.json``: the same pairs.

    Bad ones included as they are (corrupt bytes, empty captions): the manifest path must deal with them too.
    """
    shard_set = build_shard_set(shards) if not hasattr(shards, "sources") else shards
    (out / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for shard in shard_set.shards:
        for i, sample in enumerate(read_shard(shard.url, 0, shard.samples, shard.record, shard_set.stride)):
            name = f"images/{shard.first_id + i:06d}.jpg"
            (out / name).write_bytes(sample.get("jpg", b""))
            entries.append({"image": name, "caption": sample.get("txt", b"").decode("utf-8")})
    write_manifest(out / "manifest.json", entries)
    return out / "manifest.json"


def usable(path: Path, caption: str) -> str | None:
    """None for a usable pair, else the reason the training paths give."""
    if not " ".join(caption.split()):
        return "empty_caption"
    try:
        load_rgb(path)
    except Exception as err:  # BadSample
        return getattr(err, "reason", "undecodable")
    return None


class RecordBatches(L.Callback):
    """Writes each rank's training batches (their ``index`` tensors) to ``<out_dir>/rank{r}.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.batches = out_dir, []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.batches.append(batch["index"].tolist())

    def on_train_end(self, trainer, module) -> None:
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.batches))


class ReplayPairs(ImageTextPairs):
    """ImageTextPairs whose crop is seeded by the sample id (= manifest entry), as the shard path seeds it."""

    def load_pair(self, pair_index: int, epoch: int) -> dict:
        with torch.random.fork_rng(devices=[]):
            image = self.pairs[pair_index][0]
            torch.default_generator.manual_seed(hash((self.seed, epoch, image)) & 0x7FFF_FFFF_FFFF_FFFF)
            return {"image": self.transform(load_rgb(self.entries[image].image))}


class ReplaySampler(Sampler):
    """Yields (pair index, epoch) of a recorded order of sample ids, batch after batch; epochs follow the batches."""

    def __init__(self, batches: list[list[int]], pair_of: dict[int, int], steps_per_epoch: int) -> None:
        self.batches, self.pair_of, self.steps = batches, pair_of, steps_per_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps * len(self.batches[0])

    def __iter__(self):
        chunk = self.batches[self.epoch * self.steps : (self.epoch + 1) * self.steps]
        return iter([(self.pair_of[i], self.epoch) for batch in chunk for i in batch])


class ReplayDataModule(ImageTextDataModule):
    """The manifest path, fed the order of a recorded shard run (``replay``: the folder of rank*.json)."""

    def __init__(self, *args, replay: str, steps_per_epoch: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.replay, self.steps_per_epoch = replay, steps_per_epoch

    def train_dataloader(self):
        from cots.data.images import build_train_transform

        pairs = ReplayPairs(
            self.entries("train"), build_train_transform(self.image_size, **self.train_transform_args), self.seed
        )
        pair_of = {image: pair for pair, (image, _) in enumerate(pairs.pairs)}
        rank, _ = self._rank_world()
        batches = json.loads((Path(self.replay) / f"rank{rank}.json").read_text())
        self.train_sampler = ReplaySampler(batches, pair_of, self.steps_per_epoch)
        return self._loader(
            pairs, self.batch_size, self.train_sampler, drop_last=True, collate_fn=self._train_collate()
        )
