"""train_from_cache under torchrun: 2 CPU processes (gloo) on tiny data write one sane run folder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from mner.cache.datasets import read_split
from mner.train.metrics import entities, entity_scores
from tests.train.factories import make_cache
from tests.train.run_factories import make_data, run_config

# Subprocess / end-to-end: outside the `pytest -m "not slow"` inner loop.
pytestmark = pytest.mark.slow

# Each rank rebuilds the RunConfig from JSON and calls the entry function, as the CLI would.
SCRIPT = """
import json, sys
from mner.train.config import RunConfig
from mner.train.loop import train_from_cache

cfg = RunConfig.from_dict(json.load(open(sys.argv[1])))
train_from_cache(cfg)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_run_writes_one_sane_run_folder(tmp_path):
    data_dir, posts = make_data(tmp_path, n_train=10, n_valid=5, n_test=3)
    cache_dir = make_cache(tmp_path, posts)
    cfg = run_config(tmp_path / "run", cache_dir, data_dir, epochs=2)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "script.py").write_text(SCRIPT)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", str(tmp_path / "script.py"), str(tmp_path / "cfg.json"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    run_dir = tmp_path / "run"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # Rank 0 alone writes: one line per epoch, not one per rank.
    assert [line["epoch"] for line in lines] == [1, 2]
    assert all(0 <= line["dev_f1"] <= 1 and line["train_loss"] > 0 for line in lines)

    # Every post of a split is predicted exactly once, in file order, although each rank decoded a share
    # (5 valid posts on 2 ranks: DistributedSampler repeats one to even the shares).
    results = json.loads((run_dir / "results.json").read_text())
    for split in ("valid", "test"):
        gold_posts = read_split(data_dir / f"{split}.txt").posts
        rows = [
            block.splitlines()
            for block in (run_dir / f"pred_{split}.conll").read_text().strip().split("\n\n")
        ]
        assert [[line.split(" ")[:2] for line in block] for block in rows] == [
            [[w, t] for w, t in zip(p.words, p.tags)] for p in gold_posts
        ]
        pred = [[line.split(" ")[2] for line in block] for block in rows]
        scores = entity_scores([list(p.tags) for p in gold_posts], pred)
        assert results[split] == scores
        assert scores["micro"]["support"] == sum(len(entities(p.tags)) for p in gold_posts)
