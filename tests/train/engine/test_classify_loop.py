"""What a classifier run gains from the training loop both tasks share (train/engine/loop.py `fit`): resume
after a kill, torchrun, the paired bootstrap of `mner results`, and evaluations that never share a
folder."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import mner.train.engine.loop as loop
from mner.cache.classification import ClassDataConfig, read_classification
from mner.demo.classification import make_mvsa_demo
from mner.train.engine.classify import ClassifierConfig, ClassifierRunConfig, train_classifier
from mner.train.engine.scores import read_pred_csv
from mner.train.report.evaluate import evaluate_classifier
from mner.train.report.results import results_table
from tests.torchrun import tail, torchrun

# End-to-end training runs: outside the `pytest -m "not slow"` inner loop.
pytestmark = pytest.mark.slow

QUICK = dict(text_encoder="tiny-bert", batch_size=8, max_length=32, device="cpu", mode="text", lr_head=1e-2)


def config(demo, out, **settings) -> ClassifierRunConfig:
    return ClassifierRunConfig(
        data=ClassDataConfig(str(demo)),
        out_dir=str(out),
        classifier=ClassifierConfig(**{**QUICK, **settings}),
    )


def metrics(run) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify_loop")
    folder = make_mvsa_demo(root / "demo", seed=0, n=24)
    straight = train_classifier(config(folder, root / "straight", epochs=3, patience=3))
    return SimpleNamespace(root=root, folder=folder, straight=straight)


class _Killed(Exception):
    pass


def test_resume_after_a_kill_equals_the_uninterrupted_run(demo, tmp_path, monkeypatch):
    """Killed while epoch 2 is saved (its metrics line and best weights written, its checkpoint not):
    --resume redoes epoch 2 from epoch 1's checkpoint, with its RNGs and the loader's shuffling, and
    ends where the uninterrupted run ended, bitwise."""
    real_save = loop.save_checkpoint

    def save_then_die(folder, model, optimizer, scheduler, scaler, progress, device, generator=None):
        if progress.epoch == 2:
            raise _Killed
        real_save(folder, model, optimizer, scheduler, scaler, progress, device, generator)

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    killed = tmp_path / "killed"
    with pytest.raises(_Killed):
        train_classifier(config(demo.folder, killed, epochs=3, patience=3))
    assert len(metrics(killed)) == 2 and not (killed / "results.json").exists()
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    with pytest.raises(ValueError, match="pass --resume to continue it"):
        train_classifier(config(demo.folder, killed, epochs=3, patience=3))
    again = config(demo.folder, killed, epochs=3, patience=3)
    again.resume = True
    resumed = train_classifier(again)

    assert metrics(resumed) == metrics(demo.straight)
    for name in ("results.json", "pred_valid.csv", "pred_test.csv", "pred_test_without_label.txt"):
        assert (resumed / name).read_bytes() == (demo.straight / name).read_bytes(), name
    for name in ("model.safetensors", "checkpoint/model.safetensors"):
        x, y = load_file(demo.straight / name), load_file(resumed / name)
        assert x.keys() == y.keys() and all(torch.equal(x[key], y[key]) for key in x), name


def test_a_resume_with_other_settings_is_refused_naming_them(demo, tmp_path):
    run = train_classifier(config(demo.folder, tmp_path / "run", epochs=1))
    other = config(demo.folder, run, epochs=2, lr_head=0.5)
    other.resume = True
    with pytest.raises(ValueError, match=r"settings differ from the run's: classifier.lr_head 0.01 -> 0.5"):
        train_classifier(other)
    more = config(demo.folder, run, epochs=2)  # epochs is a runtime setting: the run continues
    more.resume = True
    train_classifier(more)
    assert [line["epoch"] for line in metrics(run)] == [1, 2]


def test_the_results_table_bootstraps_two_classifier_runs_on_their_accuracy(demo, tmp_path):
    other = train_classifier(config(demo.folder, tmp_path / "other", epochs=1, seed=7))
    table = results_table([str(demo.straight), str(other)], split="test", bootstrap=200)
    header, base, row, note = table.splitlines()
    assert header.split()[6:9] == ["dAcc", "CI95", "p"]
    assert base.split()[6] == "base"
    # The delta is the difference of the two runs' accuracies, counted here from their predictions.
    accuracy = [
        sum(gold == pred for _, gold, pred in rows) / len(rows)
        for rows in (read_pred_csv(run / "pred_test.csv") for run in (demo.straight, other))
    ]
    assert float(row.split()[6]) == pytest.approx((accuracy[1] - accuracy[0]) * 100, abs=0.006)
    assert 0 <= float(row.split()[8]) <= 1
    assert note.startswith(f"dAcc in percentage points against {demo.straight}")


def test_two_evaluations_in_one_second_get_their_own_folders(demo, monkeypatch):
    frozen = time.gmtime()
    monkeypatch.setattr(time, "gmtime", lambda *args: frozen)
    first = evaluate_classifier(demo.straight, split="test", device="cpu")
    second = evaluate_classifier(demo.straight, split="test", device="cpu")
    assert first[0] == second[0]
    assert first[1] != second[1] and second[1].name == f"{first[1].name}-2"
    assert (first[1] / "results.json").read_bytes() == (second[1] / "results.json").read_bytes()


SCRIPT = """
import json, sys
from mner.cache.classification import ClassDataConfig
from mner.train.engine.classify import ClassifierConfig, ClassifierRunConfig, train_classifier

data = json.load(open(sys.argv[1]))
train_classifier(ClassifierRunConfig(
    data=ClassDataConfig(**data["data"]), out_dir=data["out_dir"],
    classifier=ClassifierConfig(**data["classifier"]), cache_dir=data["cache_dir"],
))
"""


def test_two_process_gloo_run_writes_one_sane_classifier_run(demo, tmp_path):
    cfg = config(demo.folder, tmp_path / "run", epochs=2)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg.to_dict()))
    (tmp_path / "script.py").write_text(SCRIPT)
    done = torchrun(tmp_path / "script.py", str(tmp_path / "cfg.json"))
    assert done.returncode == 0, tail(done)

    run = tmp_path / "run"
    # Rank 0 alone writes: one line per epoch, not one per rank.
    assert [line["epoch"] for line in metrics(run)] == [1, 2]
    results = json.loads((run / "results.json").read_text())
    data = read_classification(ClassDataConfig(str(demo.folder)))
    for split in ("valid", "test"):
        rows = read_pred_csv(run / f"pred_{split}.csv")
        # Every post predicted once, in file order; the scores are those of the predictions.
        assert [(guid, gold) for guid, gold, _ in rows] == [
            (e.guid, e.label) for e in data.splits[split].examples
        ]
        correct = sum(gold == pred for _, gold, pred in rows)
        assert results[split]["accuracy"] == pytest.approx(correct / len(rows))
