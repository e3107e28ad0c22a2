"""train_from_cache under torchrun: 2 CPU processes (gloo) on tiny data write one sane run folder, and
train as one process does at the same global batch (per-step losses and final weights)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mner.cache.conll import read_split
from mner.train.engine.metrics import entities, entity_scores
from mner.train.zoo.text import resolve_text_encoder
from tests.torchrun import tail, torchrun
from tests.train.factories import make_cache
from tests.train.run_factories import extract_cache, make_data, make_images, run_config

# Subprocess / end-to-end: outside the `pytest -m "not slow"` inner loop.
pytestmark = pytest.mark.slow

# Each rank rebuilds the RunConfig from JSON and calls the entry function, as the CLI would.
SCRIPT = """
import json, sys
from mner.train.engine.config import RunConfig
from mner.train.engine.loop import train_from_cache

cfg = RunConfig.from_dict(json.load(open(sys.argv[1])))
train_from_cache(cfg)
"""


def test_two_process_gloo_run_writes_one_sane_run_folder(tmp_path):
    data_dir, posts = make_data(tmp_path, n_train=10, n_valid=5, n_test=3)
    cache_dir = make_cache(tmp_path, posts)
    cfg = run_config(tmp_path / "run", cache_dir, data_dir, epochs=2)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "script.py").write_text(SCRIPT)
    done = torchrun(tmp_path / "script.py", str(tmp_path / "cfg.json"))
    assert done.returncode == 0, tail(done)

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


# As SCRIPT, recording the loss of every optimiser step of this rank into <run>/steps.<rank>.json.
RECORDING = """
import json, os, sys
import torch
import mner.train.engine.loop as loop
from mner.train.engine.config import RunConfig

cfg = RunConfig.from_dict(json.load(open(sys.argv[1])))
steps, real_step = [], loop.train_step

def recording_step(*args, **kwargs):
    seed = torch.initial_seed()  # what dropout draws from on this rank
    steps.append([real_step(*args, **kwargs), seed])
    return steps[-1][0]

loop.train_step = recording_step
loop.train_from_cache(cfg)
with open(os.path.join(cfg.out_dir, f"steps.{os.environ.get('RANK', '0')}.json"), "w") as f:
    json.dump(steps, f)
"""


def _train(tmp_path, name: str, processes: int, cfg) -> tuple[list[list[float]], dict]:
    """Run `cfg` (out_dir replaced) in `processes` gloo processes; (per-rank step losses, final weights)."""
    run_dir = tmp_path / name
    cfg.out_dir = str(run_dir)
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "recording.py").write_text(RECORDING)
    done = torchrun(
        tmp_path / "recording.py", str(tmp_path / f"{name}.json"), processes=processes, timeout=600
    )
    assert done.returncode == 0, tail(done)
    steps = [json.loads((run_dir / f"steps.{rank}.json").read_text()) for rank in range(processes)]
    return steps, load_file(str(run_dir / "model.safetensors"))


def _losses(steps: list) -> list[float]:
    return [loss for loss, _ in steps]


def test_two_processes_train_as_one_at_the_same_global_batch(tmp_path):
    """16 posts, global batch 4: one process with batch 4 against two with batch 2 each. Each step's
    loss of one process is the mean of the two ranks' losses (DDP averages their gradients), and after
    2 epochs the weights agree. Dropout is off everywhere (the fusion's and tiny-bert's own), since
    ranks draw other masks than one process does; the alignment loss is on, so its negatives must come
    from both ranks (train/zoo/losses.py gathers them)."""
    data_dir, posts = make_data(tmp_path, n_train=16, n_valid=4, n_test=None)
    cache_dir = make_cache(tmp_path, posts)
    encoder = tmp_path / "tiny-bert-no-dropout"
    shutil.copytree(resolve_text_encoder("tiny-bert"), encoder)
    settings = json.loads((encoder / "config.json").read_text())
    settings.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (encoder / "config.json").write_text(json.dumps(settings))
    common = dict(
        epochs=2, dropout=0.0, image_dropout=0.0, alignment_loss_weight=0.5, text_encoder=str(encoder)
    )
    one_steps, one = _train(
        tmp_path, "one", 1, run_config(tmp_path, cache_dir, data_dir, train={"batch_size": 4}, **common)
    )
    two_steps, two = _train(
        tmp_path, "two", 2, run_config(tmp_path, cache_dir, data_dir, train={"batch_size": 2}, **common)
    )

    single = _losses(one_steps[0])
    assert len(single) == len(two_steps[0]) == len(two_steps[1]) == 8  # 4 steps per epoch, 2 epochs
    union = [(a + b) / 2 for a, b in zip(*map(_losses, two_steps))]
    torch.testing.assert_close(torch.tensor(union), torch.tensor(single), rtol=1e-4, atol=1e-5)
    assert one.keys() == two.keys()
    for name in one:
        # Weights moved by training (lr up to 5e-2 for 8 steps) agree far below the size of the moves.
        torch.testing.assert_close(two[name], one[name], rtol=1e-3, atol=1e-4, msg=name)
    # With dropout on, the ranks would draw their own masks: their RNGs are seeded apart, per epoch.
    seeds = [[seed for _, seed in rank_steps] for rank_steps in two_steps]
    assert all(a != b for a, b in zip(*seeds))
    assert len({seeds[0][0], seeds[0][-1]}) == 2  # epoch 1 and epoch 2


# As SCRIPT, saving this rank's vision blocks before its first optimiser step and after each one.
BLOCKS = """
import json, os, sys
from safetensors.torch import save_file
import mner.train.engine.loop as loop
from mner.train.engine.config import RunConfig

cfg = RunConfig.from_dict(json.load(open(sys.argv[1])))
rank, real_step = os.environ["RANK"], loop.train_step

def save(model, when):
    blocks = getattr(model, "module", model).vision_blocks
    state = {k: v.detach().clone().contiguous() for k, v in blocks.state_dict().items()}
    save_file(state, os.path.join(cfg.out_dir, f"blocks.{when}.{rank}.safetensors"))

def recording_step(model, *args, **kwargs):
    if not os.path.exists(os.path.join(cfg.out_dir, f"blocks.start.{rank}.safetensors")):
        save(model, "start")
    loss = real_step(model, *args, **kwargs)
    save(model, "end")
    return loss

loop.train_step = recording_step
loop.train_from_cache(cfg)
"""


# IFAformer's two towers on tiny-bert and tiny-clip (the same shape): the whole tower trains but for the
# last layer's parameters no output reads (its queries, output projection and MLP).
TWO_TOWER = {"fusion": "two_tower", "adaptive_gate": False, "alignment_loss_weight": 0.0, "image_dropout": 0.0,
             "vision_trainable_blocks": -1}  # fmt: skip
DEAD = re.compile(r"layers\.1\.(self_attn\.(q_proj|out_proj)|layer_norm2|mlp)\.")


@pytest.mark.parametrize(
    ("model", "trains"),
    [
        ({"vision_trainable_blocks": 1}, lambda name: name.startswith("layers.")),
        (TWO_TOWER, lambda name: name.startswith("layers.") and not DEAD.match(name)),
    ],
    ids=["k1", "two_tower"],
)
def test_two_processes_all_reduce_the_vision_blocks_gradients(tmp_path, model, trains):
    """k = 1 of a cache storing the state before tiny-clip's 2 layers (and IFAformer's whole tower), 2 gloo
    ranks, each on its own half of every batch: after training both ranks hold bitwise the same trained
    blocks (their gradients are all-reduced; unreduced, each rank's own posts would pull them apart),
    moved from where they started, and every other block parameter as the cache stores it."""
    data_dir, posts = make_data(tmp_path, n_train=8, n_valid=4, n_test=None)
    make_images(data_dir / "images", [post.key for post in posts])
    cache_dir = extract_cache(tmp_path, data_dir, vision_trainable_blocks=2)
    cfg = run_config(tmp_path / "run", cache_dir, data_dir, epochs=2, train={"batch_size": 2}, **model)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "blocks.py").write_text(BLOCKS)
    done = torchrun(tmp_path / "blocks.py", str(tmp_path / "cfg.json"))
    assert done.returncode == 0, tail(done)

    run_dir = tmp_path / "run"
    start, end = ([load_file(str(run_dir / f"blocks.{when}.{rank}.safetensors")) for rank in (0, 1)]
                  for when in ("start", "end"))  # fmt: skip
    assert any(trains(name) for name in end[0]) and not all(trains(name) for name in end[0])
    for name in end[0]:
        assert torch.equal(start[0][name], start[1][name]), name
        assert torch.equal(end[0][name], end[1][name]), name
        assert torch.equal(end[0][name], start[0][name]) != trains(name), name
