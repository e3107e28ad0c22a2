"""The text-state cache from training's side: the states it holds are the ones the loop would compute,
so training that reads them trains the same model."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

import mner.train.engine.tagging as tagging
from mner.cache.datasets import resolve_data
from mner.cache.text_states import MARKER_FILE, STATES_FILE, open_text_states
from mner.runtime import resolve_runtime
from mner.train.engine.loop import train_from_cache
from mner.train.engine.text_states import compute_text_states, prepare_text_states, text_state_parts
from mner.train.zoo.text import load_encoder, load_tokenizer, resolve_text_encoder
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
    states = prepare_text_states(encoder, 1, split, tokenizer, labels, 32, folder, tmp_path / "tc", runtime)
    rows = list(compute_text_states(encoder, 1, split, tokenizer, labels, 32, runtime.device))
    assert states.keys == [post.key for post in split.posts] == [key for key, _, _ in rows]
    for index, (key, ids, expected) in enumerate(rows):
        got_ids, got = states.get(index, key)
        assert got.dtype == "float32" and torch.equal(torch.from_numpy(got), torch.from_numpy(expected))
        # [CLS] ... [SEP], the post's own sub-words with no padding
        assert got_ids.tolist() == ids.tolist()
        assert got_ids[0] == tokenizer.cls_token_id and got_ids[-1] == tokenizer.sep_token_id
    written = (states.folder / STATES_FILE).stat().st_mtime_ns
    again = prepare_text_states(encoder, 1, split, tokenizer, labels, 32, folder, tmp_path / "tc", runtime)
    assert again.folder == states.folder and (states.folder / STATES_FILE).stat().st_mtime_ns == written
    # Another N is another cache, beside it.
    other = prepare_text_states(encoder, 2, split, tokenizer, labels, 32, folder, tmp_path / "tc", runtime)
    assert other.folder != states.folder and other.parts["frozen_layers"] == 2


def test_a_changed_split_file_or_setting_is_another_fingerprint_and_a_stale_folder_is_refused(tmp_path):
    data_dir, _ = make_data(tmp_path)
    split = resolve_data(data_dir).read("valid")
    folder = resolve_text_encoder("tiny-bert")
    tokenizer = load_tokenizer(folder)
    parts = text_state_parts(folder, tokenizer, 32, 1, split)
    assert text_state_parts(folder, tokenizer, 24, 1, split) != parts
    with open(split.path, "a", encoding="utf-8") as f:
        f.write("\n")
    assert (
        text_state_parts(folder, tokenizer, 32, 1, split)["data_file"]["sha256"]
        != parts["data_file"]["sha256"]
    )
    runtime = resolve_runtime("cpu", "off")
    states = prepare_text_states(
        load_encoder(folder).eval(),
        1,
        split,
        tokenizer,
        ["O", "B-LOC", "B-PER"],
        32,
        folder,
        tmp_path,
        runtime,
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
