"""predict: CoNLL + JSON spans; a multimodal run re-extracts images with its recorded extractor."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from seqeval.metrics.sequence_labeling import get_entities

from mner.cache.datasets import read_split
from mner.train.loop import train_from_cache
from mner.train.predict import predict
from tests.train.run_factories import extract_cache, make_data, make_images, run_config, single_thread  # noqa: F401 (autouse fixture)


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
    with caplog.at_level(logging.INFO, logger="mner.train.predict"):
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
