"""evaluate_run and results_table: rebuilt model reproduces the run's scores; other caches are refused."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil

import pytest

from mner.cache.conll import Post, read_split
from mner.cache.reader import CacheReader
from mner.train.engine.loop import train_from_cache
from mner.train.engine.run_files import cache_differences
from mner.train.report.evaluate import evaluate_run
from mner.train.report.results import results_table
from tests.train.factories import make_cache, tiny_spec
from tests.train.run_factories import (  # noqa: F401 (single_thread: autouse fixture)
    make_data,
    make_posts_learnable,
    run_config,
    single_thread,
    write_split,
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A multimodal and a text-only run on the same data and cache."""
    tmp = tmp_path_factory.mktemp("evaluate")
    data_dir, posts = make_data(tmp)
    cache_dir = make_cache(tmp, posts)
    multimodal = train_from_cache(run_config(tmp / "mm", cache_dir, data_dir, epochs=1))
    text_only = train_from_cache(run_config(tmp / "text", None, data_dir, epochs=1, text_only=True))
    return {
        "tmp": tmp,
        "data": data_dir,
        "posts": posts,
        "cache": cache_dir,
        "mm": multimodal,
        "text": text_only,
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mm", "text"])
def test_evaluate_reproduces_the_runs_test_scores(runs, kind):
    run_dir = runs[kind]
    trained = json.loads((run_dir / "results.json").read_text())
    predictions = (run_dir / "pred_test.conll").read_text()
    scores = evaluate_run(run_dir, split="test")
    assert scores == trained["test"]
    (evaluated,) = _evaluations(run_dir, "test")
    recorded = json.loads((evaluated / "results.json").read_text())
    assert recorded.pop("long_posts") == {"mode": "truncate", "max_length": 32, "posts": 0, "words": 0}
    assert recorded == trained["test"]
    assert (evaluated / "pred.conll").read_text() == predictions


def _evaluations(run_dir, split):
    return sorted((run_dir / "eval").glob(f"{split}-*"))


@pytest.mark.slow
def test_evaluate_leaves_the_training_time_results_alone(runs, tmp_path):
    """Evaluating on other data writes a new eval/ folder each time; results.json, pred_test.conll
    and what `mner results` shows stay the training run's."""
    run_dir = tmp_path / "copy"
    shutil.copytree(runs["text"], run_dir)
    shutil.rmtree(run_dir / "eval", ignore_errors=True)
    before = {
        name: (run_dir / name).read_bytes()
        for name in ("results.json", "pred_test.conll", "pred_valid.conll")
    }
    table = results_table([run_dir])
    other = tmp_path / "other"
    other.mkdir()
    write_split(other / "test.txt", make_posts_learnable(3, "te", offset=5))  # other posts, other scores
    first = evaluate_run(run_dir, split="test", data_dir=other)
    evaluate_run(run_dir, split="test", data_dir=other)
    assert first != json.loads(before["results.json"])["test"]
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert len(_evaluations(run_dir, "test")) == 2  # a second evaluation does not overwrite the first
    assert results_table([run_dir]) == table


def test_evaluate_says_a_killed_run_is_unfinished(runs, tmp_path, caplog):
    run_dir = tmp_path / "killed"
    shutil.copytree(runs["text"], run_dir)
    (run_dir / "results.json").unlink()  # killed before the end
    with caplog.at_level(logging.WARNING):
        evaluate_run(run_dir, split="test")
    done = len((run_dir / "metrics.jsonl").read_text().splitlines())
    epochs = json.loads((run_dir / "config.json").read_text())["train"]["epochs"]
    assert (
        f"{run_dir} is an unfinished (epoch {done}/{epochs}) run (no results.json: training stopped before the end)"
        in caplog.text
    )
    caplog.clear()
    evaluate_run(runs["text"], split="test")
    assert "unfinished" not in caplog.text


@pytest.mark.slow
def test_evaluate_reads_another_data_folder(runs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    # The valid posts as this folder's test split: the scores must be the run's valid scores.
    shutil.copy(runs["data"] / "valid.txt", other / "test.txt")
    scores = evaluate_run(runs["mm"], split="test", data_dir=other)
    assert scores == json.loads((runs["mm"] / "results.json").read_text())["valid"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["truncate", "window"])
def test_evaluate_counts_and_records_long_posts(runs, tmp_path, caplog, mode):
    """issue 10 A6: words past the encoder's limit are counted, logged and recorded, in either mode."""
    run_dir = tmp_path / "run"
    shutil.copytree(runs["text"], run_dir)
    shutil.rmtree(run_dir / "eval", ignore_errors=True)  # other tests evaluate the shared run
    other = tmp_path / "other"
    other.mkdir()
    words = ("paris", "the", "game", "obama") * 12  # 48 one-piece words: 18 past 30 sub-words
    long = Post("long", words, tuple("B-LOC" if w == "paris" else "O" for w in words), 1)
    write_split(other / "test.txt", [long, *make_posts_learnable(3, "te")])
    with caplog.at_level(logging.INFO, logger="mner.train.engine.decode"):
        evaluate_run(run_dir, split="test", data_dir=other, long_posts=mode)
    (evaluated,) = _evaluations(run_dir, "test")
    recorded = json.loads((evaluated / "results.json").read_text())["long_posts"]
    assert recorded == {"mode": mode, "max_length": 32, "posts": 1, "words": 18}
    how = "tagged by overlapping windows" if mode == "window" else "predicted O, still scored"
    assert any(
        m.startswith(f"test: 18 words in 1 posts lie past the encoder's 32 sub-words ({how}")
        for m in caplog.messages
    )
    predicted = [line.split(" ")[2] for line in (evaluated / "pred.conll").read_text().splitlines()[:48]]
    if mode == "truncate":
        assert predicted[30:] == ["O"] * 18


@pytest.mark.slow
def test_evaluate_refuses_a_cache_with_another_fingerprint(runs, tmp_path):
    other = make_cache(tmp_path, runs["posts"], spec=tiny_spec(max_regions=6))
    trained_on = CacheReader(runs["cache"]).fingerprint
    found = CacheReader(other).fingerprint
    expected = (
        f"cache at {other} has fingerprint {found} but run {runs['mm']} was trained on {trained_on}; "
        "differs: config.max_regions: cache 6, run 4; spec.max_regions: cache 6, run 4"
    )
    with pytest.raises(ValueError, match=re.escape(expected) + "$"):
        evaluate_run(runs["mm"], split="test", cache_dir=other)


@pytest.mark.slow
def test_evaluate_refuses_data_whose_images_are_not_in_the_cache(runs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    # Two known keys and two the run's cache never saw: evaluating them would mask every image.
    posts = runs["posts"][-2:] + make_posts_learnable(2, "new")
    write_split(other / "test.txt", posts)
    expected = (
        f"{other / 'test.txt'}:{read_split(other / 'test.txt').posts[2].line}: image key 'new0' is not in "
        f"the cache at {runs['cache']} (2 of 4 posts' keys are absent); the cache was extracted from "
        "other data — re-run `mner extract-features` on this data folder"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        evaluate_run(runs["mm"], split="test", data_dir=other)


@pytest.mark.slow
def test_a_tag_the_run_lacks_is_named_by_file_and_line(runs, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    posts = list(runs["posts"][:3])
    posts[1] = dataclasses.replace(posts[1], tags=("B-EVENT",) + posts[1].tags[1:])
    write_split(other / "test.txt", posts)
    line = read_split(other / "test.txt").posts[1].line + 1
    labels = json.loads((runs["text"] / "config.json").read_text())["label_names"]
    expected = (
        f"{other / 'test.txt'}:{line}: post {posts[1].key!r}: tag 'B-EVENT' is not one of the model's labels "
        f"({', '.join(labels)})"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}"):
        evaluate_run(runs["text"], split="test", data_dir=other)


@pytest.mark.slow
def test_evaluate_refuses_the_runs_data_folder_changed_since_training(runs, tmp_path):
    data = shutil.copytree(runs["data"], tmp_path / "data")
    run = shutil.copytree(runs["text"], tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["data_source"]["data_dir"] = str(data)
    (run / "config.json").write_text(json.dumps(config))
    assert evaluate_run(run, split="test") == json.loads((run / "results.json").read_text())["test"]
    with open(data / "train.txt", "a") as train:
        train.write("\nIMGID:extra\nword\tO\n")
    expected = (
        f"{data} changed since {run} was trained: train.txt changed (sha256 recorded in {run / 'config.json'}); "
        "the scores would not be on the run's data: restore the files, or pass a copy of the changed folder "
        "with --data-dir to score it deliberately"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        evaluate_run(run, split="test")
    with pytest.raises(ValueError, match=re.escape("train.txt changed")):
        evaluate_run(run, split="test", data_dir=tmp_path / "data" / ".." / "data")
    # another folder is scored as asked
    other = shutil.copytree(data, tmp_path / "copy")
    assert (
        evaluate_run(run, split="test", data_dir=other)
        == json.loads((run / "results.json").read_text())["test"]
    )


@pytest.mark.slow
def test_text_only_run_ignores_the_cache_argument(runs, tmp_path):
    scores = evaluate_run(runs["text"], split="valid", cache_dir=tmp_path / "no-such-cache")
    assert scores == json.loads((runs["text"] / "results.json").read_text())["valid"]


@pytest.mark.slow
def test_evaluate_errors(runs, tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path} is not a run folder: no config.json")):
        evaluate_run(tmp_path)
    data_dir = runs["data"]
    with pytest.raises(
        ValueError, match=re.escape(f"{data_dir / 'nosuch.txt'}: there is no nosuch split to evaluate")
    ):
        evaluate_run(runs["text"], split="nosuch")


def test_cache_differences_compares_only_fingerprinted_parts_when_recorded():
    spec = tiny_spec().to_dict()
    run = {
        "config": {"out": "/a", "fingerprint_parts": {"topk": 20, "models": {"clip": {"sha256": "x"}}}},
        "models": {},
        "spec": spec,
    }
    cache = {
        "config": {"out": "/b", "fingerprint_parts": {"topk": 10, "models": {"clip": {"sha256": "y"}}}},
        "models": {},
        "spec": spec,
    }
    assert cache_differences(cache, run) == [
        'models.clip.sha256: cache "y", run "x"',
        "topk: cache 10, run 20",
    ]
    assert cache_differences(cache, run, ignore=("topk",)) == ['models.clip.sha256: cache "y", run "x"']


@pytest.mark.slow
def test_results_table_lists_micro_scores_in_percent(runs):
    table = results_table([runs["mm"], runs["text"]], split="valid", bootstrap=0)
    lines = table.splitlines()
    assert lines[0].split() == ["run", "P", "R", "F1", "support", "status"]
    for line, run_dir in zip(lines[1:], [runs["mm"], runs["text"]]):
        micro = json.loads((run_dir / "results.json").read_text())["valid"]["micro"]
        expected = (
            [str(run_dir)]
            + [f"{micro[k] * 100:.2f}" for k in ("precision", "recall", "f1")]
            + [str(micro["support"]), "finished"]
        )
        assert line.split() == expected


@pytest.mark.slow
def test_results_table_without_the_split_says_how_to_get_it(runs, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(runs["text"], run_dir)
    (run_dir / "results_test.json").unlink(missing_ok=True)
    results = json.loads((run_dir / "results.json").read_text())
    del results["test"]
    (run_dir / "results.json").write_text(json.dumps(results))
    (row,) = results_table([run_dir], split="test").splitlines()[1:]
    assert row.split()[:5] == [str(run_dir), "-", "-", "-", "-"]
    assert row.endswith(f"no test results; run `mner evaluate {run_dir} --split test`")


def _copy(runs, tmp_path, name: str):
    run_dir = tmp_path / name
    shutil.copytree(runs["text"], run_dir)
    return run_dir


@pytest.mark.slow
def test_results_shows_finished_runs_and_marks_the_others(runs, tmp_path):
    unfinished = _copy(runs, tmp_path, "unfinished")
    (unfinished / "results.json").unlink()
    lines = [json.loads(line) for line in (unfinished / "metrics.jsonl").read_text().splitlines()]
    epochs = json.loads((unfinished / "config.json").read_text())["train"]["epochs"]
    damaged = _copy(runs, tmp_path, "damaged")
    (damaged / "results.json").write_text('{"best_epoch": 1, "val')
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    table = results_table(
        [unfinished, runs["text"], damaged, foreign], split="valid", bootstrap=0
    ).splitlines()
    rows = {line.split()[0]: line for line in table[1:]}
    assert rows[str(unfinished)].split()[1:5] == ["-", "-", "-", "-"]
    assert rows[str(unfinished)].endswith(f"unfinished (epoch {len(lines)}/{epochs})")
    micro = json.loads((runs["text"] / "results.json").read_text())["valid"]["micro"]
    assert rows[str(runs["text"])].split()[3:] == [
        f"{micro['f1'] * 100:.2f}",
        str(micro["support"]),
        "finished",
    ]
    assert f"{damaged / 'results.json'} is damaged (not valid JSON" in rows[str(damaged)]
    assert rows[str(foreign)].endswith("not a run folder (no config.json of ours)")


@pytest.mark.slow
def test_a_deleted_weights_file_is_named_as_missing(runs, tmp_path):
    run_dir = _copy(runs, tmp_path, "deleted")
    (run_dir / "model.safetensors").unlink()
    expected = (
        f"the weights file {run_dir / 'model.safetensors'} is missing, though the run has finished 1 epoch(s); "
        f"restore it, or copy {run_dir / 'checkpoint' / 'model.safetensors'}"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}"):
        evaluate_run(run_dir, split="valid")
    # A run that really never finished an epoch says so.
    (run_dir / "metrics.jsonl").unlink()
    shutil.rmtree(run_dir / "checkpoint")
    with pytest.raises(
        ValueError, match=re.escape(f"{run_dir}: no model.safetensors; the run has not finished an epoch")
    ):
        evaluate_run(run_dir, split="valid")


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_weights_give_one_line_naming_the_file(runs, tmp_path, damage):
    from mner.train.report.predict import predict

    run_dir = _copy(runs, tmp_path, damage)
    weights = run_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100] if damage == "truncated" else b"")
    for call in (
        lambda: evaluate_run(run_dir, split="valid"),
        lambda: predict(run_dir, runs["data"] / "test.txt", None, tmp_path / "pred.conll"),
    ):
        with pytest.raises(ValueError) as raised:
            call()
        message = str(raised.value)
        assert message.startswith(f"{weights} cannot be loaded (")
        assert "\n" not in message and "restore it" in message
        if damage == "empty":
            assert "(empty file)" in message


@pytest.mark.slow
@pytest.mark.parametrize("name", ["state.pt", "model.safetensors"])
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_checkpoint_file_is_named_on_resume(runs, tmp_path, name, damage):
    run_dir = _copy(runs, tmp_path, f"{name}-{damage}")
    path = run_dir / "checkpoint" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if damage == "truncated" else b"")
    cfg = run_config(run_dir, None, runs["data"], epochs=2, resume=True, text_only=True)
    with pytest.raises(ValueError) as raised:
        train_from_cache(cfg)
    message = str(raised.value)
    assert message.startswith(f"{path} cannot be loaded (")
    assert "\n" not in message
    assert f"delete {run_dir / 'checkpoint'} and run again with --resume" in message
    assert (run_dir / "results.json").is_file()  # the run's files are left as they were


@pytest.mark.slow
def test_evaluate_and_predict_run_in_the_precision_the_run_trained_in(runs, tmp_path, monkeypatch):
    """A run trained on the CPU is fp32 whatever its train.amp says (auto): scoring it on a GPU must
    not autocast it; --amp overrides."""
    import mner.train.report.evaluate as evaluate
    import mner.train.report.predict as predict_module
    from mner.runtime import resolve_runtime

    record = json.loads((runs["text"] / "config.json").read_text())
    assert record["train"]["amp"] == "auto" and record["precision"] == "fp32"
    asked = []

    def fake_runtime(device, amp, *args, **kwargs):
        asked.append(amp)
        return resolve_runtime("cpu", amp)

    monkeypatch.setattr(evaluate, "resolve_runtime", fake_runtime)
    monkeypatch.setattr(predict_module, "resolve_runtime", fake_runtime)
    evaluate_run(runs["text"], split="valid")
    evaluate_run(runs["text"], split="valid", amp="bf16")
    predict_module.predict(runs["text"], runs["data"] / "test.txt", None, tmp_path / "p.conll")
    predict_module.predict(runs["text"], runs["data"] / "test.txt", None, tmp_path / "p.conll", amp="fp16")
    assert asked == ["off", "bf16", "off", "fp16"]
