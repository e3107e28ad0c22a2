"""train_from_cache: the run folder, best-on-dev selection, determinism, resume, text-only isolation."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from seqeval.metrics import f1_score, precision_score, recall_score

import mner.train.engine.loop as loop
import mner.train.engine.run_files as run_files
import mner.train.engine.runs as runs
import mner.train.engine.tasks as tasks
from mner.cache.conll import Post, read_split
from mner.cache.reader import CacheReader
from mner.train.engine.config import TrainConfig
from mner.train.engine.loop import train_from_cache
from mner.train.engine.runs import open_cache
from mner.train.zoo.model import MNERModel
from mner.train.zoo.registry import FUSIONS
from mner.train.zoo.text import load_tokenizer
from tests.train.factories import make_cache
from tests.train.run_factories import (  # noqa: F401 (single_thread: autouse fixture)
    held_by_another_process,
    make_data,
    run_config,
    single_thread,
    tree,
    write_split,
)


def _metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock field."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def _conll(path: Path) -> list[list[tuple[str, str, str]]]:
    posts, current = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line:
            current.append(tuple(line.split(" ")))
        elif current:
            posts.append(current)
            current = []
    return posts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 2-epoch multimodal run shared by the read-only tests below."""
    tmp = tmp_path_factory.mktemp("loop")
    data_dir, posts = make_data(tmp)
    cache_dir = make_cache(tmp, posts, statuses={"tr1": "missing", "va0": "corrupt"})
    return train_from_cache(run_config(tmp / "run", cache_dir, data_dir, epochs=2)), data_dir, cache_dir


@pytest.mark.slow
def test_run_folder_has_every_artifact(trained):
    run_dir, data_dir, cache_dir = trained
    for name in (
        "config.json",
        "model.safetensors",
        "metrics.jsonl",
        "pred_valid.conll",
        "pred_test.conll",
        "results.json",
    ):
        assert (run_dir / name).is_file(), name
    record = json.loads((run_dir / "config.json").read_text())
    reader = CacheReader(cache_dir)
    assert record["cache"]["fingerprint"] == reader.fingerprint
    assert record["cache"]["spec"] == reader.spec.to_dict()
    assert record["cache"]["config"] == reader.config
    assert record["label_names"] == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert record["model"]["text_encoder"] == "tiny-bert" and record["train"]["epochs"] == 2
    assert Path(record["encoder_dir"]).is_dir()
    assert record["truncated_words"] == {"train": 0, "valid": 0, "test": 0}
    assert record["orphan_i"] == {"train": 0, "valid": 0, "test": 0}

    lines = _metrics(run_dir)
    assert [line["epoch"] for line in lines] == [1, 2]
    assert set(lines[0]) == {"epoch", "train_loss", "dev_precision", "dev_recall", "dev_f1", "best"}

    # The checkpoint holds tensors and plain values only.
    state = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)
    assert state["progress"]["epoch"] == 2
    assert (
        load_file(run_dir / "checkpoint" / "model.safetensors").keys()
        == load_file(run_dir / "model.safetensors").keys()
    )


@pytest.mark.slow
def test_results_match_predictions_scored_by_seqeval(trained):
    run_dir, data_dir, _ = trained
    results = json.loads((run_dir / "results.json").read_text())
    for split in ("valid", "test"):
        rows = _conll(run_dir / f"pred_{split}.conll")
        gold_posts = read_split(data_dir / f"{split}.txt").posts
        assert [[(w, g) for w, g, _ in post] for post in rows] == [
            list(zip(p.words, p.tags)) for p in gold_posts
        ]
        gold = [[g for _, g, _ in post] for post in rows]
        pred = [[p for _, _, p in post] for post in rows]
        micro = results[split]["micro"]
        assert micro["f1"] == pytest.approx(f1_score(gold, pred))
        assert micro["precision"] == pytest.approx(precision_score(gold, pred))
        assert micro["recall"] == pytest.approx(recall_score(gold, pred))


@pytest.mark.slow
def test_final_weights_are_the_best_dev_epoch(tmp_path, monkeypatch):
    """Scripted dev F1s 0.5, 0.9, 0.2, 0.1 with patience 2: stop after epoch 4, keep epoch 2."""
    data_dir, posts = make_data(tmp_path)
    cache_dir = make_cache(tmp_path, posts)
    scripted = iter([0.5, 0.9, 0.2, 0.1])
    real_scores = tasks.entity_scores
    calls = []

    def fake_scores(gold, pred):
        calls.append(len(gold))
        scores = real_scores(gold, pred)
        f1 = next(scripted, None)
        if f1 is not None:
            scores["micro"]["f1"] = f1
        return scores

    monkeypatch.setattr(tasks, "entity_scores", fake_scores)
    cfg = run_config(tmp_path / "run", cache_dir, data_dir, epochs=6, train={"patience": 2})
    run_dir = train_from_cache(cfg)
    assert [line["dev_f1"] for line in _metrics(run_dir)] == [0.5, 0.9, 0.2, 0.1]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["best_epoch"] == 2 and results["epochs_run"] == 4
    # Dev only while training (4 valid scorings of 4 posts), then valid and test once each at the end.
    assert calls == [4, 4, 4, 4, 4, 4]
    best = load_file(run_dir / "model.safetensors")
    last = load_file(run_dir / "checkpoint" / "model.safetensors")
    assert any(not torch.equal(best[name], last[name]) for name in best)


@pytest.mark.slow
def test_same_seed_same_run_and_other_seed_differs(tmp_path):
    data_dir, posts = make_data(tmp_path)
    cache_dir = make_cache(tmp_path, posts)
    runs = [
        train_from_cache(run_config(tmp_path / name, cache_dir, data_dir, epochs=2, seed=3)) for name in "ab"
    ]
    other = train_from_cache(run_config(tmp_path / "c", cache_dir, data_dir, epochs=1, seed=4))
    a, b, c = (_metrics(run) for run in [*runs, other])
    assert a == b
    assert a[0]["train_loss"] != c[0]["train_loss"]
    weights_a, weights_b = load_file(runs[0] / "model.safetensors"), load_file(runs[1] / "model.safetensors")
    assert all(torch.equal(weights_a[name], weights_b[name]) for name in weights_a)


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_after_kill_equals_straight_run(tmp_path, monkeypatch):
    data_dir, posts = make_data(tmp_path)
    cache_dir = make_cache(tmp_path, posts)
    straight = train_from_cache(run_config(tmp_path / "straight", cache_dir, data_dir, epochs=2))

    # Kill during epoch 2's bookkeeping: its metrics line and best weights are written, its checkpoint is not.
    real_save = loop.save_checkpoint

    def save_then_die(folder, model, optimizer, scheduler, scaler, progress, device, generator=None):
        if progress.epoch == 2:
            raise _Killed
        real_save(folder, model, optimizer, scheduler, scaler, progress, device, generator)

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train_from_cache(run_config(tmp_path / "killed", cache_dir, data_dir, epochs=2))
    assert len(_metrics(tmp_path / "killed")) == 2
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = train_from_cache(run_config(tmp_path / "killed", cache_dir, data_dir, epochs=2, resume=True))

    assert _metrics(resumed) == _metrics(straight)
    assert json.loads((resumed / "results.json").read_text()) == json.loads(
        (straight / "results.json").read_text()
    )
    for name in ("model.safetensors", "checkpoint/model.safetensors"):
        x, y = load_file(straight / name), load_file(resumed / name)
        assert all(torch.equal(x[key], y[key]) for key in x), name


@pytest.mark.slow
def test_existing_run_needs_resume_and_same_config(tmp_path):
    data_dir, posts = make_data(tmp_path)
    cache_dir = make_cache(tmp_path, posts)
    train_from_cache(run_config(tmp_path / "run", cache_dir, data_dir, epochs=1))
    with pytest.raises(ValueError, match=r"run already holds a run \(config\.json\); pass --resume"):
        train_from_cache(run_config(tmp_path / "run", cache_dir, data_dir, epochs=1))
    changed = run_config(
        tmp_path / "run", cache_dir, data_dir, epochs=1, resume=True, train={"batch_size": 2}
    )
    with pytest.raises(
        ValueError,
        match=r"cannot resume .*run: settings differ from the run's: train.batch_size 4 -> 2; use another --out",
    ):
        train_from_cache(changed)
    with open(data_dir / "train.txt", "a", encoding="utf-8") as f:
        f.write("\n\n")  # the file changed since the run started (blank lines: the same posts, other bytes)
    with pytest.raises(ValueError, match=r"settings differ from the run's: data_files\.train\.txt \"\w+"):
        train_from_cache(run_config(tmp_path / "run", cache_dir, data_dir, epochs=2, resume=True))


@pytest.mark.slow
def test_text_only_never_opens_the_cache(tmp_path, monkeypatch):
    data_dir, _ = make_data(tmp_path, n_test=None)

    def no_cache(*args, **kwargs):
        raise AssertionError("a text-only run opened the cache")

    monkeypatch.setattr(runs, "CacheReader", no_cache)
    cfg = run_config(tmp_path / "run", tmp_path / "does-not-exist", data_dir, epochs=1, text_only=True)
    run_dir = train_from_cache(cfg)
    record = json.loads((run_dir / "config.json").read_text())
    assert record["cache"] is None
    results = json.loads((run_dir / "results.json").read_text())
    assert "test" not in results and not (run_dir / "pred_test.conll").exists()
    # cache_dir may also be None.
    train_from_cache(run_config(tmp_path / "run2", None, data_dir, epochs=1, text_only=True))


def test_multimodal_run_needs_a_cache():
    with pytest.raises(ValueError, match="a multimodal run needs a feature cache"):
        open_cache(None, text_only=False)


def test_truncated_words_are_counted_and_predicted_o(tmp_path):
    data_dir, posts = make_data(tmp_path, n_test=None)
    max_length = 6
    cfg = run_config(tmp_path / "run", None, data_dir, epochs=1, text_only=True, max_length=max_length)
    run_dir = train_from_cache(cfg)

    # Reference: [CLS] takes position 0 and [SEP] the last, so a word fits when its first piece
    # lands at a position <= max_length - 2.
    tokenizer = load_tokenizer("tiny-bert")
    expected = {}
    for split in ("train", "valid"):
        cut = 0
        for post in read_split(data_dir / f"{split}.txt").posts:
            position = 1
            for word in post.words:
                cut += position > max_length - 2
                position += len(tokenizer.tokenize(word))
        expected[split] = cut
    assert expected["valid"] > 0
    assert json.loads((run_dir / "config.json").read_text())["truncated_words"] == expected
    for post in _conll(run_dir / "pred_valid.conll"):
        assert all(pred == "O" for _, _, pred in post[max_length - 2 :])


def test_cache_of_other_data_is_refused_before_training(tmp_path):
    data_dir, posts = make_data(tmp_path)
    # A cache that lacks two of the 18 keys: extraction writes every key, so it was made from other data.
    cache_dir = make_cache(tmp_path, posts, absent=("va1", "te2"))
    first = read_split(data_dir / "valid.txt").posts[1]
    assert first.key == "va1"
    expected = (
        f"{data_dir / 'valid.txt'}:{first.line}: image key 'va1' is not in the cache at {cache_dir} "
        "(2 of 18 posts' keys are absent); the cache was extracted from other data "
        "— re-run `mner extract-features` on this data folder"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        train_from_cache(run_config(tmp_path / "run", cache_dir, data_dir, epochs=1))
    assert not (tmp_path / "run").exists()


def test_valid_or_test_tag_absent_from_train_is_refused_up_front(tmp_path):
    data_dir, _ = make_data(tmp_path)
    test = read_split(data_dir / "test.txt").posts
    # The third test post's second word gets an ORG entity; train has LOC and PER only.
    edited = [
        post if i != 2 else Post(post.key, post.words, post.tags[:1] + ("B-ORG",) + post.tags[2:], 1)
        for i, post in enumerate(test)
    ]
    write_split(data_dir / "test.txt", edited)
    # The error names the tag's own line (issue 10 A7), not the post's IMGID line.
    expected = (
        f"{data_dir / 'test.txt'}:{test[2].line + 2}: tag 'B-ORG' does not occur in train.txt; "
        "the label set comes from the training file"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        train_from_cache(run_config(tmp_path / "run", None, data_dir, epochs=1, text_only=True))
    assert not (tmp_path / "run").exists()


def test_orphan_i_tags_are_logged_and_recorded(tmp_path, caplog):
    data_dir, _ = make_data(tmp_path, n_test=None)
    # Orphans counted by hand: an I- after O, at the start, or after another type's tag; I- after
    # B-/I- of its own type is not one.
    orphans = {
        "train": [("I-LOC", "O", "I-PER"), ("B-LOC", "I-LOC", "I-LOC", "I-PER")],  # 2 + 1
        "valid": [("O", "B-PER", "I-PER"), ("I-PER", "I-PER", "O")],  # 0 + 1
    }
    for name, tag_rows in orphans.items():
        extra = [
            Post(f"{name}-x{i}", tuple(f"w{j}" for j in range(len(tags))), tags, 1)
            for i, tags in enumerate(tag_rows)
        ]
        write_split(data_dir / f"{name}.txt", [*read_split(data_dir / f"{name}.txt").posts, *extra])
    with caplog.at_level(logging.INFO, logger="mner.train.engine.tagging"):
        run_dir = train_from_cache(run_config(tmp_path / "run", None, data_dir, epochs=1, text_only=True))
    assert json.loads((run_dir / "config.json").read_text())["orphan_i"] == {"train": 3, "valid": 1}
    assert (
        "I- tags with no B- before them (kept, counted as entity starts as conlleval does): train 3, valid 1"
        in caplog.messages
    )


def _expected_decay(name: str, param) -> bool:
    """The BERT recipe by brute force over a parameter's name and shape: decay the weight matrices
    that multiply an input; not biases or LayerNorm (the vectors), embedding tables, the CRF's
    transition scores or the fusion's query slots (QGF's slots and type queries, the resampler queries)."""
    if param.dim() < 2:  # biases (bias, in_proj_bias), LayerNorm weights, CRF start/end scores
        return False
    if ".embeddings." in name or name.endswith(("label_embed.weight", "type_embed.weight")):
        return False
    if name.startswith("crf."):
        return False
    return name.rsplit(".", 1)[-1] not in ("slots", "queries", "type_queries", "resampler_queries")


@pytest.mark.parametrize("fusion", list(FUSIONS.names))
def test_weight_decay_follows_the_bert_recipe(fusion):
    from mner.runtime import resolve_runtime
    from tests.train.factories import tiny_model

    # IFAformer's two towers read no visual tokens (no alignment loss) and train their whole vision tower.
    tower = {"alignment_loss_weight": 0.0, "vision_trainable_blocks": -1} if fusion == "two_tower" else {}
    model = tiny_model(fusion=fusion, adaptive_gate=fusion == "qgf", **tower)
    train = TrainConfig(weight_decay=0.05)
    optimizer, _, _ = loop.build_optimizer(model, train, 10, resolve_runtime("cpu", "off"))
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    names = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert set(decay_of) == {id(p) for p in names.values()}
    expected = {name: 0.05 if _expected_decay(name, p) else 0.0 for name, p in names.items()}
    assert {name: decay_of[id(p)] for name, p in names.items()} == expected
    # Each excluded kind is present in the real model, so the check covers it.
    excluded = {name for name, decay in expected.items() if decay == 0.0}
    assert "crf.crf.transitions" in excluded
    assert any(".embeddings." in name for name in excluded)
    assert any("norm" in name.lower() for name in excluded)
    if fusion == "qgf":
        assert any(name.endswith("slots") for name in excluded)
    if fusion == "mango":
        assert "fusion.resampler.queries" in excluded
    if fusion == "two_tower":
        assert "vision_blocks.layers.0.layer_norm1.weight" in excluded
        assert expected["vision_blocks.layers.0.self_attn.q_proj.weight"] == 0.05


def _users_folder(folder: Path) -> Path:
    """A folder of a user's files that look like a run's, but no config.json of ours."""
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "notes.txt").write_text("my notes")
    for name in ("results.json", "metrics.jsonl", "pred_test.conll"):
        (folder / name).write_text(f"the user's {name}")
    return folder


@pytest.mark.parametrize("resume", [False, True])
def test_a_folder_that_is_not_ours_is_refused_untouched(tmp_path, resume):
    data_dir, _ = make_data(tmp_path)
    out = _users_folder(tmp_path / "mine")
    (out / "config.json").write_text('{"model": "someone else\'s"}')  # a config.json, but not ours
    before = tree(out)
    expected = (
        f"--out {out} is not empty and is not one of our run folders (no config.json with model, train, "
        "label_names, data_source, encoder_dir, cache); nothing in it was touched — choose a new or empty "
        "folder, or --resume with a run folder this tool wrote"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        train_from_cache(run_config(out, None, data_dir, epochs=1, resume=resume, text_only=True))
    assert tree(out) == before


def test_cli_refuses_a_users_folder_with_a_non_zero_exit(tmp_path):
    from click.testing import CliRunner

    from mner.cli import main

    data_dir, _ = make_data(tmp_path)
    out = _users_folder(tmp_path / "mine")
    before = tree(out)
    args = ["train-from-cache", "--text-only", "--data-dir", str(data_dir), "--out", str(out)]
    result = CliRunner().invoke(main, [*args, "--text-encoder", "tiny-bert"])
    assert result.exit_code != 0
    assert f"--out {out} is not empty and is not one of our run folders" in result.output
    assert "choose a new or empty folder" in result.output
    assert tree(out) == before


@pytest.mark.parametrize("existing", ["absent", "empty"])
def test_a_run_failing_before_its_first_epoch_leaves_no_folder(tmp_path, existing):
    data_dir, _ = make_data(tmp_path)
    out = tmp_path / "runs" / "deep" / "run"
    if existing == "empty":
        out.mkdir(parents=True)
    # tiny-bert is 32 wide: 3 heads fail when the model is built, after the folder was made.
    cfg = run_config(out, None, data_dir, epochs=1, text_only=True, qfnet_heads=3)
    with pytest.raises(ValueError, match="is not divisible by model.qfnet_heads=3"):
        train_from_cache(cfg)
    if existing == "absent":
        assert not (tmp_path / "runs").exists()  # the parents it made go too
    else:
        assert out.is_dir() and not any(out.iterdir())  # the user's empty folder stays, empty


def test_metrics_lines_are_strict_json(tmp_path):
    run_files.append_metrics(
        tmp_path, {"epoch": 1, "train_loss": float("nan"), "dev_f1": float("inf"), "best": 0}
    )

    def refuse(name):
        raise AssertionError(f"bare {name} in metrics.jsonl")

    line = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=refuse)
    assert line == {"epoch": 1, "train_loss": None, "dev_f1": None, "best": 0}


@pytest.mark.slow
def test_a_non_finite_loss_stops_training_and_is_never_saved(tmp_path, monkeypatch):
    """Epoch 1 trains; the loss of epoch 2's second step is NaN: the run stops naming both, before
    the optimiser steps, and epoch 1's weights (finite) stay the best and the checkpoint."""
    data_dir, posts = make_data(tmp_path)
    cache_dir = make_cache(tmp_path, posts)
    cfg = run_config(tmp_path / "run", cache_dir, data_dir, epochs=3)
    real_forward, calls = MNERModel.forward, []

    def forward(self, batch):
        out = real_forward(self, batch)
        if self.training:
            calls.append(1)
            if len(calls) == 5:  # 10 posts / batch 4 = 3 steps an epoch: epoch 2, step 2
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MNERModel, "forward", forward)
    with pytest.raises(ValueError) as raised:
        train_from_cache(cfg)
    message = str(raised.value)
    assert "training stopped at epoch 2, step 2 of 3: the training loss is nan" in message
    assert "the checkpoint of epoch 1 is kept" in message and "mner cache verify" in message

    def refuse(name):
        raise AssertionError(f"bare {name} in metrics.jsonl")

    run_dir = tmp_path / "run"
    lines = [
        json.loads(line, parse_constant=refuse)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [line["epoch"] for line in lines] == [1]
    best, last = (
        load_file(run_dir / "model.safetensors"),
        load_file(run_dir / "checkpoint" / "model.safetensors"),
    )
    assert all(torch.isfinite(t).all() for t in best.values())
    assert all(torch.equal(best[name], last[name]) for name in best)
    assert torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)["progress"]["epoch"] == 1


@pytest.mark.slow
def test_a_folder_another_command_is_writing_is_refused_untouched(tmp_path):
    data_dir, _ = make_data(tmp_path)
    out = tmp_path / "run"
    with held_by_another_process(out, "mner train-from-cache") as pid:
        with pytest.raises(ValueError) as refused:
            train_from_cache(run_config(out, None, data_dir, epochs=1, text_only=True))
        assert sorted(p.name for p in out.iterdir()) == ["mner.lock"]
    assert str(refused.value) == (
        f"{out} is being written by another `mner train-from-cache` (pid {pid}); wait for it to finish, "
        "or give another --out folder"
    )


def test_a_nan_in_the_first_epoch_leaves_no_run_folder(tmp_path, monkeypatch):
    data_dir, _ = make_data(tmp_path)
    real_forward = MNERModel.forward

    def forward(self, batch):
        out = real_forward(self, batch)
        out["loss"] = out["loss"] + float("inf")
        return out

    monkeypatch.setattr(MNERModel, "forward", forward)
    with pytest.raises(
        ValueError, match=r"epoch 1, step 1 of 3: the training loss is inf; .*nothing is kept"
    ):
        train_from_cache(run_config(tmp_path / "run", None, data_dir, epochs=1, text_only=True))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_names_each_changed_setting(tmp_path):
    data_dir, _ = make_data(tmp_path, n_test=None)
    train_from_cache(run_config(tmp_path / "run", None, data_dir, epochs=1, text_only=True))
    changed = run_config(
        tmp_path / "run",
        None,
        data_dir,
        epochs=1,
        resume=True,
        text_only=True,
        train={"batch_size": 2},
        dropout=0.2,
    )
    with pytest.raises(ValueError) as raised:
        train_from_cache(changed)
    message = str(raised.value)
    assert message.startswith(
        f"cannot resume {tmp_path / 'run'}: settings differ from the run's: model.dropout 0.1 -> 0.2; "
        "train.batch_size 4 -> 2; use another --out, or change only "
    )
    assert "train.epochs" in message and "train.patience" in message


@pytest.mark.slow
def test_resume_extends_a_finished_run_and_runtime_settings_never_block(tmp_path):
    """3 epochs, then --resume with epochs 4 (and other runtime settings changed): one more epoch,
    continued from the checkpoint, the record holding the new values."""
    data_dir, _ = make_data(tmp_path, n_test=None)
    run_dir = train_from_cache(run_config(tmp_path / "run", None, data_dir, epochs=3, text_only=True))
    first = _metrics(run_dir)
    runtime_only = {"patience": 9, "num_workers": 1, "amp": "off", "cache_in_memory": True}
    extended = run_config(run_dir, None, data_dir, epochs=4, resume=True, text_only=True, train=runtime_only)
    train_from_cache(extended)
    lines = _metrics(run_dir)
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4]
    assert lines[:3] == first  # epochs 1-3 kept, not retrained
    record = json.loads((run_dir / "config.json").read_text())
    assert record["train"]["epochs"] == 4 and record["train"]["patience"] == 9
    assert json.loads((run_dir / "results.json").read_text())["epochs_run"] == 4


def test_a_max_length_past_the_encoders_positions_is_refused_before_any_folder(tmp_path):
    data_dir, _ = make_data(tmp_path)
    out = tmp_path / "run"
    cfg = run_config(out, None, data_dir, text_only=True, max_length=5000)
    with pytest.raises(
        ValueError, match=r"^model\.max_length = 5000 is more than text encoder .* \(512 positions"
    ):
        train_from_cache(cfg)
    assert not out.exists()


def test_a_cache_with_no_usable_train_image_is_said_loudly_and_recorded(tmp_path, caplog):
    data_dir, posts = make_data(tmp_path, n_train=6, n_valid=2, n_test=None)
    statuses = {post.key: ("corrupt" if i % 3 == 0 else "missing") for i, post in enumerate(posts)}
    cache_dir = make_cache(tmp_path, posts, statuses=statuses)
    with caplog.at_level(logging.WARNING, logger="mner.train.engine.runs"):
        run = train_from_cache(run_config(tmp_path / "run", cache_dir, data_dir, epochs=1))
    expected = (
        f"none of the 6 train posts has a usable image in the cache {cache_dir} (corrupt 2, missing 4): the "
        "image side learns nothing and this run is text-only in effect"
    )
    assert any(r.getMessage().startswith(expected) for r in caplog.records), caplog.text
    assert json.loads((run / "config.json").read_text())["no_image"] == {"train": 6, "valid": 2}


def test_a_cache_with_some_usable_images_records_the_count_without_a_warning(tmp_path, caplog):
    data_dir, posts = make_data(tmp_path, n_train=6, n_valid=2, n_test=None)
    cache_dir = make_cache(tmp_path, posts, statuses={"tr1": "missing", "va0": "corrupt"})
    with caplog.at_level(logging.WARNING, logger="mner.train.engine.runs"):
        run = train_from_cache(run_config(tmp_path / "run", cache_dir, data_dir, epochs=1))
    assert not [r for r in caplog.records if r.name == "mner.train.engine.runs"]
    assert json.loads((run / "config.json").read_text())["no_image"] == {"train": 1, "valid": 1}


def test_accumulated_batches_take_the_step_of_their_union():
    """train.grad_accum: two batches of 4 accumulated give the weights one batch of the same 8 gives
    (both losses are means over posts, so the mean of the two equals the mean over the eight). Plain
    SGD without clipping, so the size of the gradient shows, not only its direction."""
    from mner.runtime import resolve_runtime
    from tests.train.factories import make_batch, make_posts, tiny_model

    posts = make_posts(8, seed=3)
    runtime = resolve_runtime("cpu", "off")
    one = [make_batch(posts, with_visual=False)]
    two = [make_batch(posts[:4], with_visual=False), make_batch(posts[4:], with_visual=False)]
    weights = []
    for batches in (one, two):
        model = tiny_model(seed=0, text_only=True, dropout=0.0).eval()  # no dropout anywhere (BERT's too)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loop.train_step(model, batches, optimizer, scheduler, scaler, 1e9, runtime)
        assert scheduler.last_epoch == 1  # one optimiser step either way
        weights.append({name: p.detach().clone() for name, p in model.named_parameters()})
    moved = tiny_model(seed=0, text_only=True, dropout=0.0).crf.crf.transitions
    assert not torch.allclose(weights[0]["crf.crf.transitions"], moved)  # the step did something
    for name, value in weights[0].items():
        torch.testing.assert_close(weights[1][name], value, rtol=0, atol=1e-5, msg=name)  # fp32 sum order


def test_grad_accum_steps_the_schedule_once_per_accumulated_batches(tmp_path):
    data_dir, _ = make_data(tmp_path, n_train=10, n_valid=2, n_test=None)  # 3 batches of 4 an epoch
    run = train_from_cache(
        run_config(tmp_path / "run", None, data_dir, epochs=2, text_only=True, train={"grad_accum": 2})
    )
    state = torch.load(run / "checkpoint" / "state.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == 2 * loop.optimizer_steps(3, 2) == 4
    with pytest.raises(ValueError, match=r"^train\.grad_accum must be >= 1, got 0$"):
        TrainConfig(grad_accum=0)
