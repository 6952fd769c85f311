"""Two 'nodes' of one CPU process each, launched by torchrun on loopback (gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_nodes_on_loopback(tmp_path, data_dir):
    port = _free_port()
    run_dir = tmp_path / "run"
    overrides = [
        *TINY,
        "trainer=ddp_cpu",
        "trainer.num_nodes=2",
        "trainer.max_steps=3",
        "model.queue_size=256",
        "trainer.limit_val_batches=0",
        "trainer.check_val_every_n_epoch=null",
        "~callbacks.model_checkpoint",
        f"paths.data_dir={data_dir}",
        f"hydra.run.dir={run_dir}",
        "+callbacks.record._target_=test_ddp.RecordRun",
        f"+callbacks.record.out_dir={tmp_path / 'record'}",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
    ]
    nodes = [
        subprocess.Popen(
            [*torchrun, f"--node_rank={rank}", "-m", "cots.train", *overrides],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=False):
        assert node.returncode == 0, output[-3000:]
    rank0, rank1 = (torch.load(tmp_path / "record" / f"rank{r}.pt") for r in (0, 1))
    assert len(rank0["losses"]) == len(rank1["losses"]) == 3
    for key in ("feature_queue.image.data", "feature_queue.text.data"):
        assert torch.equal(rank0["state"][key], rank1["state"][key])
    assert int(rank0["state"]["feature_queue.image.filled"]) == 3 * 2 * 16  # 3 steps x 2 nodes x batch 16
