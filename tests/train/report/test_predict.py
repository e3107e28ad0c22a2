"""predict: CoNLL + JSON spans; a multimodal run re-extracts images with its recorded extractor."""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from seqeval.metrics.sequence_labeling import get_entities

from mner.cache.conll import read_split
from mner.extract.reextract import extract_from_record
from mner.train.engine.loop import train_from_cache
from mner.train.report.predict import predict as predict_without_stage_one
from tests.train.run_factories import extract_cache, make_data, make_images, run_config, single_thread  # noqa: F401 (autouse fixture)

# What the CLI passes: stage one for a multimodal run's new images (stage two never imports it).
predict = functools.partial(predict_without_stage_one, extract=extract_from_record)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A multimodal run on a cache extracted with tiny-clip / tiny-frcnn, and a text-only run."""
    tmp = tmp_path_factory.mktemp("predict")
    data_dir, posts = make_data(tmp, n_train=8, n_valid=4, n_test=None)
    make_images(data_dir / "images", [post.key for post in posts])
    cache_dir = extract_cache(tmp, data_dir)
    multimodal = train_from_cache(run_config(tmp / "mm", cache_dir, data_dir, epochs=1))
    text_only = train_from_cache(run_config(tmp / "text", None, data_dir, epochs=3, text_only=True))
    return {"data": data_dir, "mm": multimodal, "text": text_only}


def _pred_column(path: Path) -> list[list[str]]:
    blocks = path.read_text(encoding="utf-8").strip().split("\n\n")
    return [[line.split(" ")[2] for line in block.splitlines()] for block in blocks]


def _edit_record(run_dir: Path, tmp_path: Path, edit) -> Path:
    """A copy of run_dir whose config.json went through `edit(record)`."""
    copy = tmp_path / "edited"
    shutil.copytree(run_dir, copy)
    record = json.loads((copy / "config.json").read_text())
    edit(record)
    (copy / "config.json").write_text(json.dumps(record))
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mm", "text"])
def test_predict_tags_posts_as_training_did(runs, kind, tmp_path):
    """Re-extracted tokens and the rebuilt model give the run's own valid predictions."""
    data_dir = runs["data"]
    out = predict(runs[kind], data_dir / "valid.txt", data_dir / "images", tmp_path / "valid.pred.conll")
    tagged = read_split(out)
    valid = read_split(data_dir / "valid.txt")
    assert [(p.key, p.words) for p in tagged.posts] == [(p.key, p.words) for p in valid.posts]
    assert [list(p.tags) for p in tagged.posts] == _pred_column(runs[kind] / "pred_valid.conll")


@pytest.mark.slow
def test_predict_writes_json_spans_of_the_predicted_tags(runs, tmp_path):
    source = read_split(runs["data"] / "train.txt")
    # Predict input may carry no tags at all.
    lines = []
    for post in source.posts:
        lines += [f"IMGID:{post.key}", *post.words, ""]
    (tmp_path / "new.txt").write_text("\n".join(lines) + "\n")
    out = predict(runs["text"], tmp_path / "new.txt", None, tmp_path / "new.pred.conll")

    tagged = read_split(out)
    records = [json.loads(line) for line in Path(f"{out}.json").read_text().splitlines()]
    assert [r["key"] for r in records] == [p.key for p in source.posts]
    assert [r["words"] for r in records] == [list(p.words) for p in source.posts]
    total = 0
    for record, post in zip(records, tagged.posts):
        # seqeval's chunker as the reference; its end index is inclusive.
        expected = [(kind, start, end + 1) for kind, start, end in get_entities(list(post.tags))]
        assert [(s["type"], s["start"], s["end"]) for s in record["spans"]] == expected
        assert [s["text"] for s in record["spans"]] == [" ".join(post.words[a:b]) for _, a, b in expected]
        total += len(expected)
    assert total > 0


@pytest.mark.slow
def test_multimodal_predict_needs_an_image_folder(runs, tmp_path):
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"run {runs['mm']} uses images: pass --image-dir, the folder with the posts' <IMGID>.jpg files"
        ),
    ):
        predict(runs["mm"], runs["data"] / "valid.txt", None, tmp_path / "out.conll")
    gone = tmp_path / "no-such-images"
    with pytest.raises(ValueError, match=f"^{re.escape(f'--image-dir {gone} does not exist')}$"):
        predict(runs["mm"], runs["data"] / "valid.txt", gone, tmp_path / "out.conll")
    assert not (tmp_path / "out.conll").exists()


@pytest.mark.slow
def test_predict_logs_how_many_images_were_ok_missing_or_corrupt(runs, tmp_path, caplog):
    images = tmp_path / "images"
    shutil.copytree(runs["data"] / "images", images)
    (images / "va0.jpg").unlink()
    (images / "va1.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level(logging.INFO, logger="mner.train.report.predict"):
        predict(runs["mm"], runs["data"] / "valid.txt", images, tmp_path / "out.conll")
    assert (
        "images of the 4 posts: 2 ok, 1 missing, 1 corrupt (missing and corrupt ones are masked)"
        in caplog.messages
    )


@pytest.mark.slow
def test_predict_names_a_missing_weight_file(runs, tmp_path):
    gone = tmp_path / "gone-clip"
    run_dir = _edit_record(runs["mm"], tmp_path, lambda r: r["cache"]["config"].update(clip=str(gone)))
    expected = f"run {run_dir} was trained on tokens from clip {gone}, which does not exist here"
    with pytest.raises(ValueError, match=re.escape(expected)):
        predict(run_dir, runs["data"] / "valid.txt", runs["data"] / "images", tmp_path / "out.conll")


@pytest.mark.slow
def test_predict_refuses_another_extractor(runs, tmp_path):
    run_dir = _edit_record(
        runs["mm"],
        tmp_path,
        lambda r: r["cache"]["config"]["fingerprint_parts"]["versions"].update(torch="0.0"),
    )
    expected = f"the images re-extracted for run {run_dir} do not match the extractor it was trained with; differs: versions.torch: cache "
    with pytest.raises(ValueError, match=re.escape(expected) + r'"[^"]+", run "0\.0"$'):
        predict(run_dir, runs["data"] / "valid.txt", runs["data"] / "images", tmp_path / "out.conll")


@pytest.mark.slow
def test_predict_refuses_a_cache_without_extraction_settings(runs, tmp_path):
    run_dir = _edit_record(runs["mm"], tmp_path, lambda r: r["cache"]["config"].pop("fingerprint_parts"))
    with pytest.raises(
        ValueError,
        match=re.escape(f"run {run_dir} was trained on a cache that records no extraction settings"),
    ):
        predict(run_dir, runs["data"] / "valid.txt", runs["data"] / "images", tmp_path / "out.conll")


@pytest.mark.slow
def test_predict_refuses_an_out_that_is_one_of_its_inputs(runs, tmp_path, monkeypatch):
    """issue 10 A8: `--out` equal to `--input` overwrote the gold file; any input is refused."""
    data = tmp_path / "data"
    shutil.copytree(runs["data"], data)
    gold = data / "valid.txt"
    before = gold.read_bytes()
    (tmp_path / "link.txt").symlink_to(gold)
    monkeypatch.chdir(tmp_path)
    images = data / "images"
    companion = data / "posts"  # its .json output would be the input data/posts.json
    shutil.copy(gold, data / "posts.json")
    cases = [
        (runs["text"], gold, None, gold, f"--out {gold} is the --input file {gold}"),
        (runs["text"], gold, None, "link.txt", f"--out link.txt is the --input file {gold}"),
        (
            runs["text"],
            "data/valid.txt",
            None,
            "data/../data/valid.txt",
            "is the --input file data/valid.txt",
        ),
        (runs["text"], data / "posts.json", None, companion, f"--out {companion}.json is the --input file"),
        (runs["mm"], gold, images, images / "va0.jpg", f"is the image of post 'va0' {images / 'va0.jpg'}"),
        (runs["mm"], gold, images, images, f"--out {images} is --image-dir {images}"),
        (runs["text"], gold, None, runs["text"] / "config.json", f"is in the run folder {runs['text']}"),
        # Files of folders other mner commands wrote: another run's results, a cache's manifest.
        (
            runs["text"],
            gold,
            None,
            runs["mm"] / "results.json",
            f"--out {runs['mm'] / 'results.json'} is a file of {runs['mm']}, a folder an mner command wrote",
        ),
        (
            runs["text"],
            gold,
            None,
            runs["data"].parent / "cache" / "manifest.json",
            f"is a file of {runs['data'].parent / 'cache'}, a folder an mner command wrote",
        ),
    ]
    for run_dir, source, image_dir, out, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            predict(run_dir, source, image_dir, out)
    assert gold.read_bytes() == before
    assert (images / "va0.jpg").read_bytes()[:2] == b"\xff\xd8"


@pytest.mark.slow
def test_predict_json_gives_each_posts_image_status_and_the_log_names_the_bad_ones(
    runs, tmp_path, caplog, monkeypatch
):
    """issue 10 C7."""
    images = tmp_path / "images"
    shutil.copytree(runs["data"] / "images", images)
    (images / "va0.jpg").unlink()
    (images / "va1.jpg").write_bytes(b"not a jpeg")
    with caplog.at_level(logging.INFO, logger="mner.train.report.predict"):
        out = predict(runs["mm"], runs["data"] / "valid.txt", images, tmp_path / "out.conll")
    records = {r["key"]: r for r in map(json.loads, Path(f"{out}.json").read_text().splitlines())}
    assert {key: r["image"] for key, r in records.items()} == {
        "va0": "missing", "va1": "corrupt", "va2": "ok", "va3": "ok"
    }  # fmt: skip
    assert records["va2"]["image_error"] == "" and records["va0"]["image_error"]
    named = (
        f"2 of 4 posts have no usable image (tagged from their text alone): "
        f"va0 (missing: {records['va0']['image_error']}); va1 (corrupt: {records['va1']['image_error']})"
    )
    assert named in caplog.messages
    # past the limit, the rest are counted
    monkeypatch.setattr("mner.train.report.predict.NAMED_IMAGES", 1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mner.train.report.predict"):
        predict(runs["mm"], runs["data"] / "valid.txt", images, tmp_path / "out.conll")
    assert any(
        m.endswith(f"va0 (missing: {records['va0']['image_error']}); and 1 more") for m in caplog.messages
    )
    # a text-only run reads no image
    out = predict(runs["text"], runs["data"] / "valid.txt", None, tmp_path / "text.conll")
    assert {r["image"] for r in map(json.loads, Path(f"{out}.json").read_text().splitlines())} == {None}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["truncate", "window"])
def test_predict_counts_words_past_the_limit_and_can_tag_them_by_windows(runs, tmp_path, caplog, mode):
    """issue 10 A6: predict tagged long posts' tails O without a word; now counted, and optionally tagged."""
    words = ["paris", "the", "game", "obama"] * 12  # 48 one-piece words, 30 fit in 32 sub-words
    (tmp_path / "new.txt").write_text("IMGID:long\n" + "\n".join(words) + "\n\nIMGID:short\nparis\n")
    with caplog.at_level(logging.INFO, logger="mner.train.engine.decode"):
        out = predict(runs["text"], tmp_path / "new.txt", None, tmp_path / "new.conll", long_posts=mode)
    records = [json.loads(line) for line in Path(f"{out}.json").read_text().splitlines()]
    assert [(r["words_past_limit"], r["long_posts"]) for r in records] == [(18, mode), (0, mode)]
    assert any("18 words in 1 posts lie past the encoder's 32 sub-words" in m for m in caplog.messages)
    tags = list(read_split(out).posts[0].tags)
    if mode == "truncate":
        assert tags[30:] == ["O"] * 18
    else:
        # the words past the limit are tagged by the model (its windows), not left O
        assert any(tag != "O" for tag in tags[30:])


@pytest.mark.slow  # trains: an integration test
def test_a_multimodal_run_needs_stage_one_passed_in(runs, tmp_path):
    with pytest.raises(ValueError, match=r"uses images: predict needs stage one to extract them"):
        predict_without_stage_one(
            runs["mm"], runs["data"] / "valid.txt", runs["data"] / "images", tmp_path / "o"
        )
    assert not (tmp_path / "o").exists()
