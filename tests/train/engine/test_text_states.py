"""The text-state cache from training's side: the states it holds are the ones the loop would compute,
so training that reads them trains the same model."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import mner.train.engine.tagging as tagging
from mner.cache.datasets import resolve_data
from mner.cache.text_states import MARKER_FILE, STATES_FILE, open_text_states
from mner.runtime import resolve_runtime
from mner.train.engine.loop import train_from_cache
from mner.train.engine.text_states import (
    check_text_cache_root,
    compute_text_states,
    prepare_text_states,
    tagging_posts,
    text_state_parts,
)
from mner.train.zoo.text import load_encoder, load_tokenizer, resolve_text_encoder
from tests.cache.factories import make_cache as make_feature_cache
from tests.train.factories import make_cache
from tests.train.run_factories import make_data, run_config, single_thread  # noqa: F401 (autouse)


def _in_loop(monkeypatch):
    """Train with the frozen bottom computed in the loop: no text-state cache is built or read."""
    monkeypatch.setattr(tagging, "text_states_of", lambda *args, **kwargs: {})


@pytest.mark.parametrize("text_only", [True, False], ids=["text-only", "multimodal"])
def test_training_from_the_cache_equals_training_with_the_frozen_layers_in_the_loop(
    tmp_path, monkeypatch, text_only
):
    data_dir, posts = make_data(tmp_path)
    cache_dir = None if text_only else make_cache(tmp_path, posts)
    common = dict(epochs=2, seed=3, text_only=text_only, text_frozen_layers=1)
    cached = run_config(tmp_path / "cached", cache_dir, data_dir, **common)
    cached.text_cache = str(tmp_path / "text-states")
    train_from_cache(cached)
    folders = sorted((tmp_path / "text-states").iterdir())
    assert len(folders) == 3 and all((f / MARKER_FILE).is_file() for f in folders)  # train, valid, test
    with monkeypatch.context() as patch:
        _in_loop(patch)
        train_from_cache(run_config(tmp_path / "loop", cache_dir, data_dir, **common))

    a, b = (
        load_file(tmp_path / "cached" / "model.safetensors"),
        load_file(tmp_path / "loop" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    moved = load_file(tmp_path / "cached" / "checkpoint" / "model.safetensors")
    start = load_encoder("tiny-bert").state_dict()
    # The top layer trained and the bottom did not: the test compares models that learned something.
    assert not torch.equal(
        moved["encoder.encoder.layer.1.output.dense.weight"], start["encoder.layer.1.output.dense.weight"]
    )
    assert torch.equal(
        moved["encoder.encoder.layer.0.output.dense.weight"], start["encoder.layer.0.output.dense.weight"]
    )
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for name in ("pred_valid.conll", "pred_test.conll", "results.json"):
        assert (tmp_path / "cached" / name).read_text() == (tmp_path / "loop" / name).read_text()


def test_cached_states_are_the_frozen_bottoms_output_and_a_second_run_reuses_them(tmp_path):
    data_dir, _ = make_data(tmp_path)
    split = resolve_data(data_dir).read("train")
    folder = resolve_text_encoder("tiny-bert")
    tokenizer, encoder = load_tokenizer(folder), load_encoder(folder).eval()
    runtime = resolve_runtime("cpu", "off")
    labels = ["O", "B-LOC", "B-PER"]
    posts = tagging_posts(split, tokenizer, labels, 32)
    states = prepare_text_states(encoder, 1, posts, folder, tmp_path / "tc", runtime)
    rows = list(compute_text_states(encoder, 1, posts, runtime.device))
    assert states.keys == [post.key for post in split.posts] == [key for key, _, _ in rows]
    for index, (key, ids, expected) in enumerate(rows):
        got_ids, got = states.get(index, key)
        assert got.dtype == "float32" and torch.equal(torch.from_numpy(got), torch.from_numpy(expected))
        # [CLS] ... [SEP], the post's own sub-words with no padding
        assert got_ids.tolist() == ids.tolist()
        assert got_ids[0] == tokenizer.cls_token_id and got_ids[-1] == tokenizer.sep_token_id
    written = (states.folder / STATES_FILE).stat().st_mtime_ns
    again = prepare_text_states(encoder, 1, posts, folder, tmp_path / "tc", runtime)
    assert again.folder == states.folder and (states.folder / STATES_FILE).stat().st_mtime_ns == written
    # Another N is another cache, beside it.
    other = prepare_text_states(encoder, 2, posts, folder, tmp_path / "tc", runtime)
    assert other.folder != states.folder and other.parts["frozen_layers"] == 2


def test_a_changed_split_file_or_setting_is_another_fingerprint_and_a_stale_folder_is_refused(tmp_path):
    data_dir, _ = make_data(tmp_path)
    split = resolve_data(data_dir).read("valid")
    folder = resolve_text_encoder("tiny-bert")
    tokenizer = load_tokenizer(folder)
    labels = ["O", "B-LOC", "B-PER"]
    parts = text_state_parts(folder, 1, tagging_posts(split, tokenizer, labels, 32))
    assert text_state_parts(folder, 1, tagging_posts(split, tokenizer, labels, 24)) != parts
    with open(split.path, "a", encoding="utf-8") as f:
        f.write("\n")
    assert (
        text_state_parts(folder, 1, tagging_posts(split, tokenizer, labels, 32))["data_file"]["sha256"]
        != parts["data_file"]["sha256"]
    )
    runtime = resolve_runtime("cpu", "off")
    states = prepare_text_states(
        load_encoder(folder).eval(), 1, tagging_posts(split, tokenizer, labels, 32), folder, tmp_path, runtime
    )
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"text-state cache {states.folder} was built for other settings (max_length: 32 -> 24)"
        ),
    ):
        open_text_states(states.folder, {**states.parts, "max_length": 24})


def test_a_text_cache_inside_the_image_cache_or_data_folder_is_refused(tmp_path):
    data_dir, posts = make_data(tmp_path)
    cache_dir = make_cache(tmp_path, posts)
    cfg = run_config(tmp_path / "run", cache_dir, data_dir, text_frozen_layers=1)
    cfg.text_cache = str(cache_dir / "states")
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"--text-cache {(cache_dir / 'states').resolve()} is inside the feature cache {cache_dir.resolve()}; "
            "text-state caches are kept apart from it, so choose a folder outside it"
        ),
    ):
        train_from_cache(cfg)
    assert not (cache_dir / "states").exists() and not (tmp_path / "run").exists()


def test_a_text_cache_root_from_the_environment_is_named_as_such(tmp_path, monkeypatch):
    # `mner ablate` has no --text-cache: a root it refuses came from $MNER_TEXT_CACHE or the default, which
    # the message names as such.
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("MNER_TEXT_CACHE", str(data / "states"))
    with pytest.raises(
        ValueError, match=re.escape(f"$MNER_TEXT_CACHE {(data / 'states').resolve()} is inside")
    ):
        check_text_cache_root(None, [("the data folder", data)])
    monkeypatch.delenv("MNER_TEXT_CACHE")
    monkeypatch.setattr("mner.cache.text_states.DEFAULT_ROOT", data / "default")
    with pytest.raises(
        ValueError, match=re.escape(f"the default --text-cache {(data / 'default').resolve()} is")
    ):
        check_text_cache_root(None, [("the data folder", data)])
    assert (
        check_text_cache_root(tmp_path / "elsewhere", [("the data folder", data)])
        == (tmp_path / "elsewhere").resolve()
    )


def test_evaluate_reads_the_splits_cache_and_predict_computes_the_frozen_layers(tmp_path, caplog):
    import json
    import logging

    from click.testing import CliRunner

    from mner.cache.conll import read_split
    from mner.cli import main
    from mner.train.report.evaluate import evaluate_run
    from mner.train.report.predict import predict

    data_dir, _ = make_data(tmp_path)
    cfg = run_config(tmp_path / "run", None, data_dir, epochs=1, text_only=True, text_frozen_layers=1)
    cfg.text_cache = str(tmp_path / "tc")
    run_dir = train_from_cache(cfg)
    recorded = json.loads((run_dir / "results.json").read_text())["test"]
    record = json.loads((run_dir / "config.json").read_text())
    assert record["text_cache"] == str(tmp_path / "tc") and set(record["text_states"]) == {
        "train",
        "valid",
        "test",
    }
    with caplog.at_level(logging.INFO, logger="mner.train.report.evaluate"):
        read = evaluate_run(run_dir, split="test")
    assert f"test: frozen text states read from {record['text_states']['test']}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mner.train.report.evaluate"):
        computed = evaluate_run(run_dir, split="test", text_cache=tmp_path / "empty")
    assert "test: frozen text states computed here (no text-state cache)" in caplog.text
    assert read == computed == recorded
    out = predict(run_dir, data_dir / "test.txt", None, tmp_path / "pred.txt")
    gold = [line.split()[-1] for line in (run_dir / "pred_test.conll").read_text().splitlines() if line]
    assert [tag for post in read_split(out, require_tags=False).posts for tag in post.tags] == gold

    shown = CliRunner().invoke(main, ["cache", "inspect", record["text_states"]["test"]])
    assert shown.exit_code == 0, shown.output
    assert "states after the embeddings and 1 frozen layers of tiny-bert" in shown.output
    assert "split file test.txt" in shown.output and "4 posts" in shown.output


def test_resume_reads_the_cache_it_was_started_with(tmp_path, monkeypatch):
    data_dir, _ = make_data(tmp_path)
    cfg = run_config(tmp_path / "run", None, data_dir, epochs=1, text_only=True, text_frozen_layers=2)
    cfg.text_cache = str(tmp_path / "tc")
    train_from_cache(cfg)
    built = {f.name: (f / STATES_FILE).stat().st_mtime_ns for f in (tmp_path / "tc").iterdir()}
    monkeypatch.setattr(
        "mner.train.engine.text_states.compute_text_states",
        lambda *a, **k: pytest.fail("the cache was built again"),
    )
    cfg.resume, cfg.train.epochs = True, 2
    train_from_cache(cfg)
    assert {f.name: (f / STATES_FILE).stat().st_mtime_ns for f in (tmp_path / "tc").iterdir()} == built
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


# ------------------------------------------------------------------------------------------ classifier

# Learning rates that move the tiny model in 2 epochs, low enough for the 1e-6 comparison below.
# The image side reads the cached vector as it is (vision_trainable_blocks 0): these tests are about the
# text prefix, and their caches store no vision state.
CLASSIFY = dict(
    text_encoder="tiny-bert",
    batch_size=4,
    max_length=32,
    device="cpu",
    lr_head=1e-3,
    lr_encoder=1e-4,
    vision_trainable_blocks=0,
)


def classifier_config(demo, out, cache=None, text_cache=None, **settings):
    from mner.cache.classification import ClassDataConfig
    from mner.train.engine.classifier_config import ClassifierConfig, ClassifierRunConfig

    return ClassifierRunConfig(
        data=ClassDataConfig(str(demo)),
        out_dir=str(out),
        classifier=ClassifierConfig(**{**CLASSIFY, **settings}),
        cache_dir=None if cache is None else str(cache),
        text_cache=None if text_cache is None else str(text_cache),
    )


def mvsa_demo(tmp_path, with_cache: bool):
    """A classification folder (train, a valid split drawn from train.txt, test, test_without_label) and,
    with `with_cache`, a synthetic feature cache of its guids."""
    from mner.cache.classification import ClassDataConfig, read_classification
    from mner.demo.classification import make_mvsa_demo

    demo = make_mvsa_demo(tmp_path / "demo", seed=0, n=24)
    if not with_cache:
        return demo, None
    data = read_classification(ClassDataConfig(str(demo)))
    guids = {e.guid for split in data.splits.values() for e in split.examples}
    return demo, make_feature_cache(tmp_path, keys=sorted(guids), statuses={})


@pytest.mark.parametrize(
    "settings",
    [dict(mode="text", text_pool="mean"), dict(mode="both", text_pool="cls", head="attention")],
    ids=["text-mean", "both-cls"],
)
def test_classifier_training_from_the_cache_equals_training_with_the_frozen_layers_in_the_loop(
    tmp_path, monkeypatch, settings
):
    """To 1e-6, not bitwise: the loop pads a post's batch to other lengths than the build did, and a
    softmax over a row with more masked keys sums its (equal) terms in another order, which moves the
    frozen states by ~1e-8; Adam turns that into ~1e-7 after these 8 steps (more at higher learning
    rates, whose updates of near-zero gradients it normalises). The predictions are the same."""
    import mner.train.engine.classify as classify
    from mner.train.engine.classify import train_classifier

    demo, cache = mvsa_demo(tmp_path, settings["mode"] == "both")
    common = dict(epochs=2, seed=3, text_frozen_layers=1, dropout=0.1, **settings)
    cached = train_classifier(classifier_config(demo, tmp_path / "cached", cache, tmp_path / "tc", **common))
    # train, valid (drawn from train.txt: its own texts, its own cache), test, test_without_label
    folders = sorted((tmp_path / "tc").iterdir())
    assert len(folders) == 4 and all((f / MARKER_FILE).is_file() for f in folders)
    record = json.loads((cached / "config.json").read_text())
    assert set(record["text_states"]) == {"train", "valid", "test", "test_without_label"}
    with monkeypatch.context() as patch:
        patch.setattr(classify, "text_states_of", lambda *args, **kwargs: {})
        loop = train_classifier(classifier_config(demo, tmp_path / "loop", cache, **common))

    a, b = load_file(cached / "model.safetensors"), load_file(loop / "model.safetensors")
    assert a.keys() == b.keys()
    start = load_encoder("tiny-bert").state_dict()
    moved = load_file(cached / "checkpoint" / "model.safetensors")
    # The top layer trained and the bottom did not: the test compares models that learned something.
    assert not torch.equal(
        moved["encoder.encoder.layer.1.output.dense.weight"], start["encoder.layer.1.output.dense.weight"]
    )
    assert torch.equal(
        moved["encoder.encoder.layer.0.output.dense.weight"], start["encoder.layer.0.output.dense.weight"]
    )
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    for x, y in zip(epochs(cached), epochs(loop), strict=True):
        assert x == {**y, "train_loss": pytest.approx(y["train_loss"], rel=0, abs=1e-6)}
    for name in ("pred_valid.csv", "pred_test.csv", "pred_test_without_label.txt"):
        assert (cached / name).read_text() == (loop / name).read_text(), name


def epochs(run) -> list[dict]:
    """metrics.jsonl less the seconds."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


def test_classifier_evaluate_and_predict_compute_the_frozen_layers_and_resume_reads_the_cache(
    tmp_path, monkeypatch
):
    from mner.train.engine.classify import train_classifier
    from mner.train.report.evaluate import evaluate_classifier
    from mner.train.report.predict import predict_classifier

    demo, _ = mvsa_demo(tmp_path, with_cache=False)
    cfg = classifier_config(
        demo, tmp_path / "run", None, tmp_path / "tc", mode="text", epochs=1, text_frozen_layers=2
    )
    run = train_classifier(cfg)
    recorded = json.loads((run / "results.json").read_text())["test"]
    scores, _ = evaluate_classifier(run, split="test")  # the frozen bottom computed here, no cache read
    assert scores == recorded
    out = predict_classifier(run, demo / "test_without_label.txt", tmp_path / "pred.txt")
    assert out.read_text() == (run / "pred_test_without_label.txt").read_text()

    built = {f.name: (f / STATES_FILE).stat().st_mtime_ns for f in (tmp_path / "tc").iterdir()}
    monkeypatch.setattr(
        "mner.train.engine.text_states.compute_text_states",
        lambda *a, **k: pytest.fail("the cache was built again"),
    )
    cfg.resume, cfg.classifier.epochs = True, 2
    train_classifier(cfg)
    assert {f.name: (f / STATES_FILE).stat().st_mtime_ns for f in (tmp_path / "tc").iterdir()} == built
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_classifier_frozen_layers_are_refused_past_the_depth_without_a_bert_split_and_below_zero(tmp_path):
    from mner.train.engine.classifier_config import ClassifierConfig
    from mner.train.engine.classify import train_classifier
    from mner.train.zoo.classifier_model import ClassifierHead, SentenceClassifier

    with pytest.raises(ValueError, match=re.escape("classifier.text_frozen_layers must be >= 0, got -1")):
        ClassifierConfig(text_frozen_layers=-1)
    head = ClassifierHead("mlp", "text", 2, 0, 3)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "classifier.text_frozen_layers = 1 runs the text encoder's embeddings and layers apart, which a "
            "Linear (x) does not expose (.embeddings, .encoder.layer); use a BERT or RoBERTa-family encoder "
            "or set classifier.text_frozen_layers = 0"
        ),
    ):
        SentenceClassifier(torch.nn.Linear(2, 2), head, "cls", frozen_layers=1, encoder_name="x")
    demo, _ = mvsa_demo(tmp_path, with_cache=False)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "classifier.text_frozen_layers = 3 is more than the 2 layers of text encoder tiny-bert; set it "
            "to at most 2"
        ),
    ):
        train_classifier(classifier_config(demo, tmp_path / "run", mode="text", text_frozen_layers=3))
    assert not (tmp_path / "run").exists()
