"""Tiny data folders, caches and run configs for the entry-function tests (loop, evaluate, predict, ablate).

data_dir, posts = make_data(tmp_path)                 # train/valid/test.txt, 10/4/4 posts
cache_dir = make_cache(tmp_path, posts)               # tests.train.factories.make_cache
cfg = run_config(tmp_path / "run", cache_dir, data_dir, epochs=2)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mner.cache.conll import Post, write_split
from mner.cache.datasets import DataConfig, resolve_data
from mner.cache.reader import CacheReader
from mner.train.engine.config import ModelConfig, RunConfig, TrainConfig
from mner.train.engine.metrics import write_conll
from mner.train.engine.run_files import make_record, write_json
from tests.cache.factories import make_cache


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Autouse in the modules that import it: torch on one thread. The tiny models gain nothing from
    more, and on a small shared machine extra threads only contend (a 2-thread Linear ran 20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Learning rates high enough that 1-2 epochs on 10 posts move the tiny model.
FAST_LR = {"lr_encoder": 1e-3, "lr_fusion": 3e-3, "lr_crf": 5e-2}


def make_posts_learnable(n: int, prefix: str, offset: int = 0) -> list[Post]:
    """n posts where the tag is a function of the word (paris/london LOC, obama/george PER)."""
    vocabulary = [
        ("paris", "LOC"),
        ("london", "LOC"),
        ("obama", "PER"),
        ("george", "PER"),
        ("the", None),
        ("game", None),
    ]
    posts = []
    for i in range(n):
        words, tags = [], []
        for j in range(3 + (i + offset) % 4):
            word, kind = vocabulary[(i * 7 + j * 3 + offset) % len(vocabulary)]
            words.append(word)
            tags.append("O" if kind is None else f"B-{kind}")
        posts.append(Post(key=f"{prefix}{i}", words=tuple(words), tags=tuple(tags), line=1))
    return posts


def make_data(
    tmp_path: Path, n_train: int = 10, n_valid: int = 4, n_test: int | None = 4
) -> tuple[Path, list[Post]]:
    """A data folder tmp_path/"data" with train/valid(/test).txt; returns it and every post written.

    Keys are "tr0".., "va0".., "te0"..; n_test None writes no test.txt.
    """
    data_dir = Path(tmp_path) / "data"
    data_dir.mkdir(parents=True)
    everything = []
    for name, n, prefix in (("train", n_train, "tr"), ("valid", n_valid, "va"), ("test", n_test, "te")):
        if n is None:
            continue
        posts = make_posts_learnable(n, prefix, offset=len(everything))
        write_split(data_dir / f"{name}.txt", posts)
        everything.extend(posts)
    return data_dir, everything


def run_config(
    out_dir: Path,
    cache_dir,
    data_dir,
    epochs: int = 2,
    seed: int = 0,
    resume: bool = False,
    train=None,
    **model,
) -> RunConfig:
    """RunConfig on tiny-bert (2 heads, 2 slots per type, 32 sub-words), batch 4, CPU."""
    model_cfg = ModelConfig(
        **{"text_encoder": "tiny-bert", "qfnet_heads": 2, "slots_per_type": 2, "max_length": 32, **model}
    )
    train_cfg = TrainConfig(
        **{
            "epochs": epochs,
            "batch_size": 4,
            "seed": seed,
            "device": "cpu",
            "patience": 5,
            **FAST_LR,
            **(train or {}),
        }
    )
    return RunConfig(
        model=model_cfg,
        train=train_cfg,
        cache_dir=None if cache_dir is None else str(cache_dir),
        data=DataConfig(data_dir=str(data_dir)),
        out_dir=str(out_dir),
        resume=resume,
    )


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` -> its bytes (None for a folder): a snapshot to compare against."""
    return {
        str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes()
        for path in sorted(Path(folder).rglob("*"))
    }


def make_images(image_dir: Path, keys, size: tuple[int, int] = (40, 32)) -> Path:
    """A solid-colour JPEG `<key>.jpg` per key (colour cycles with the key's position)."""
    from PIL import Image

    colours = [(220, 30, 30), (30, 160, 40), (40, 60, 210), (240, 200, 20)]
    image_dir.mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(keys):
        Image.new("RGB", size, colours[i % len(colours)]).save(image_dir / f"{key}.jpg")
    return image_dir


def extract_cache(tmp_path: Path, data_dir: Path, **changes) -> Path:
    """A real cache of data_dir's images through extract_features with the tiny-clip / tiny-frcnn presets;
    `changes`: other ExtractConfig fields (vision_trainable_blocks=2)."""
    from mner.extract.config import ExtractConfig
    from mner.extract.run import extract_features

    cfg = ExtractConfig(
        data=DataConfig(data_dir=str(data_dir)),
        out=str(Path(tmp_path) / "cache"),
        num_workers=0,
        device="cpu",
        topk=4,
        **changes,
    )
    return extract_features(cfg)


def make_prediction_pair(tmp_path: Path, posts, cache_a=False, cache_b=True, statuses=None, images=True):
    """Data folder + two run folders A and B, each with a real config.json (runs.make_record) and a
    pred_test.conll (metrics.write_conll) and a results.json that marks it finished, nothing trained. posts: (key, words, gold, A's tags, B's
    tags), each a space-separated string. B (A) records a synthetic cache of every key when cache_b
    (cache_a); statuses as make_cache's; images: a JPEG per key under data/images.
    Returns (run_a, run_b, data_dir)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    split = [
        Post(key=key, words=tuple(words.split()), tags=tuple(gold.split()), line=1 + 5 * i)
        for i, (key, words, gold, _, _) in enumerate(posts)
    ]
    write_split(data_dir / "test.txt", split)
    keys = [post.key for post in split]
    if images:
        make_images(data_dir / "images", keys)
    (data_dir / "images").mkdir(exist_ok=True)
    cache_dir = make_cache(tmp_path, keys=keys, statuses=statuses or {}) if cache_a or cache_b else None
    source = resolve_data(data_dir)
    runs = []
    for name, column, cached in (("a", 3, cache_a), ("b", 4, cache_b)):
        run_dir = tmp_path / "runs" / name
        run_dir.mkdir(parents=True)
        cfg = run_config(run_dir, cache_dir if cached else None, data_dir, text_only=not cached)
        reader = CacheReader(cache_dir) if cached else None
        labels = ["O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER"]
        write_json(run_dir / "config.json", make_record(cfg, source, labels, tmp_path, reader))
        write_conll(run_dir / "pred_test.conll", split, [post[column].split() for post in posts])
        write_json(run_dir / "results.json", {"best_epoch": 1})  # finished (the scores are not read)
        runs.append(run_dir)
    return runs[0], runs[1], data_dir


# Another mner command writing a folder: takes its lock, says so, and waits to be killed.
_HOLD_LOCK = """
import sys, time
from mner.runtime import lock_folder
lock = lock_folder(sys.argv[1], command=sys.argv[2])
print("locked", flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def held_by_another_process(folder: Path, command: str):
    """`folder` (made if absent) locked by a live process running as `command`; yields its pid."""
    folder.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(folder), command], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        yield holder.pid
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
