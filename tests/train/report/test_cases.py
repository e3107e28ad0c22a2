"""Tests for train/report/cases.py: which posts differ and how they rank, the counts (against a brute-force
recount over every possible span), --limit / --ids, the pictures (cached regions, raw images,
placeholders), refused inputs and folders.

The runs are hand-made (run_factories.make_prediction_pair): a real config.json and a pred_test.conll
per run, so the predictions are known exactly and nothing is trained.
"""

from __future__ import annotations

import json
import random
import shutil
from itertools import product
from pathlib import Path

import pytest
from PIL import Image

from mner.cache.reader import CacheReader
from mner.train.engine.metrics import entities
from mner.train.report.cases import CasesConfig, summary_line, write_cases
from mner.train.report.significance import read_predictions
from tests.train.factories import random_tags
from tests.train.run_factories import make_images, make_prediction_pair

# (key, words, gold, A, B); the expected rank by fixed - broken is in RANKED below.
POSTS = [
    ("te0", "obama in paris", "B-PER O B-LOC", "O O B-LOC", "B-PER O B-LOC"),  # fixed 1
    ("te1", "the game", "O O", "O O", "O O"),  # same predictions: not a case
    ("te2", "george lucas spoke", "B-PER I-PER O", "B-PER I-PER O", "B-ORG I-ORG O"),  # broken 1, type 1
    ("te3", "paris meets obama today", "B-LOC O B-PER B-ORG", "O O O O", "B-LOC O B-PER O"),  # fixed 2
    ("te4", "so it", "O O", "B-MISC O", "O O"),  # differs, score 0
    ("te5", "london", "B-LOC", "B-PER", "B-LOC"),  # fixed 1, changed type 1
]
RANKED = ["te3", "te0", "te5", "te4", "te2"]  # ties (te0, te5) keep file order


def cases(tmp_path, run_a, run_b, **options) -> dict:
    out = options.pop("out", tmp_path / "cases")
    page = write_cases(CasesConfig(run_a=str(run_a), run_b=str(run_b), out_dir=str(out), **options))
    assert page == Path(out) / "index.html"
    return json.loads((Path(out) / "cases.json").read_text())


def refusal(tmp_path, run_a, run_b, **options) -> str:
    """The ValueError message of a cases call that must be refused."""
    with pytest.raises(ValueError) as err:
        cases(tmp_path, run_a, run_b, **options)
    return str(err.value)


def brute_force_counts(pred_a: Path, pred_b: Path) -> dict:
    """fixed / broken / changed type / posts that differ, by trying every (type, start, end) there is."""
    words, gold, a = read_predictions(pred_a)
    _, _, b = read_predictions(pred_b)
    counts = {"fixed": 0, "broken": 0, "changed_type": 0, "posts_differ": 0}
    for tags in zip(gold, a, b):
        spans = [entities(t) for t in tags]
        types = {kind for found in spans for kind, _, _ in found}
        n = len(tags[0])
        counts["posts_differ"] += tags[1] != tags[2]
        for start, end in product(range(n), range(n + 1)):
            for kind in types:
                g, in_a, in_b = ((kind, start, end) in found for found in spans)
                counts["fixed"] += g and in_b and not in_a
                counts["broken"] += g and in_a and not in_b
                for other in types:
                    counts["changed_type"] += kind != other and in_a and (other, start, end) in spans[2]
    return counts


def test_ranks_the_posts_that_differ_and_counts_match_a_brute_force_recount(tmp_path):
    run_a, run_b, _ = make_prediction_pair(tmp_path, POSTS)
    found = cases(tmp_path, run_a, run_b)
    assert [post["key"] for post in found["posts"]] == RANKED
    by_key = {post["key"]: post for post in found["posts"]}
    assert by_key["te3"]["fixed"] == [["LOC", 0, 1], ["PER", 2, 3]] and by_key["te3"]["score"] == 2
    assert by_key["te2"]["broken"] == [["PER", 0, 2]]
    assert by_key["te2"]["changed_type"] == [{"start": 0, "end": 2, "a": "PER", "b": "ORG", "gold": "PER"}]
    assert by_key["te5"]["changed_type"] == [{"start": 0, "end": 1, "a": "PER", "b": "LOC", "gold": "LOC"}]
    recount = brute_force_counts(run_a / "pred_test.conll", run_b / "pred_test.conll")
    assert recount == {"fixed": 4, "broken": 1, "changed_type": 2, "posts_differ": 5}
    summary = found["summary"]
    assert {key: summary[key] for key in recount} == recount
    assert (summary["posts"], summary["shown"]) == (6, 5)
    page = (tmp_path / "cases" / "index.html").read_text()
    assert summary_line(summary) in page
    assert (
        summary_line(summary)
        == "5 of 6 test posts differ: B fixes 4 gold spans, breaks 1, changes the type of 2; 5 shown"
    )
    # Self-contained: the PNGs by relative name, nothing fetched from elsewhere.
    for post in found["posts"]:
        assert f'src="{post["png"]}"' in page
        with Image.open(tmp_path / "cases" / post["png"]) as png:
            assert png.format == "PNG" and png.width >= 480
    assert "http" not in page.replace('lang="en"', "") and "<link" not in page and "<script" not in page


def test_counts_on_random_predictions_match_the_brute_force_recount(tmp_path):
    rng = random.Random(3)
    posts = []
    for i in range(40):
        n = rng.randint(1, 7)
        words = " ".join(f"w{j}" for j in range(n))
        posts.append((f"te{i}", words, *(" ".join(random_tags(n, rng, orphans=True)) for _ in range(3))))
    run_a, run_b, _ = make_prediction_pair(tmp_path, posts=posts, cache_b=False, images=False)
    found = cases(tmp_path, run_a, run_b, limit=0)
    recount = brute_force_counts(run_a / "pred_test.conll", run_b / "pred_test.conll")
    assert {key: found["summary"][key] for key in recount} == recount
    assert found["summary"]["shown"] == recount["posts_differ"] > 0
    scores = [post["score"] for post in found["posts"]]
    assert scores == sorted(scores, reverse=True)
    # Ties in file order.
    for before, after in zip(found["posts"], found["posts"][1:]):
        if before["score"] == after["score"]:
            assert before["index"] < after["index"]


def test_limit_and_ids(tmp_path):
    run_a, run_b, _ = make_prediction_pair(tmp_path, POSTS)
    assert [p["key"] for p in cases(tmp_path, run_a, run_b, limit=2)["posts"]] == RANKED[:2]
    # --ids: those posts in the order given, whether they differ or not; the counts stay the split's.
    picked = cases(tmp_path, run_a, run_b, ids=["te1", "te2"], out=tmp_path / "picked")
    assert [p["key"] for p in picked["posts"]] == ["te1", "te2"]
    assert [p["differs"] for p in picked["posts"]] == [False, True]
    assert picked["summary"]["fixed"] == 4 and picked["summary"]["shown"] == 2
    with pytest.raises(ValueError) as err:
        cases(tmp_path, run_a, run_b, ids=["nope"], out=tmp_path / "none")
    assert (
        str(err.value)
        == f"image key 'nope' (--ids) is not in the test split {tmp_path / 'data' / 'test.txt'}"
    )
    assert not (tmp_path / "none").exists()
    with pytest.raises(
        ValueError, match=r"^limit must be an integer >= 0 \(0: every post that differs\), got -1$"
    ):
        CasesConfig(run_a="a", run_b="b", out_dir="o", limit=-1)


def test_regions_from_the_cache_and_a_placeholder_for_a_missing_image(tmp_path):
    run_a, run_b, _ = make_prediction_pair(tmp_path, POSTS, statuses={"te2": "missing"})
    found = cases(tmp_path, run_a, run_b)
    by_key = {post["key"]: post for post in found["posts"]}
    with CacheReader(tmp_path / "cache") as reader:
        regions = reader.get("te3").num_regions
    assert by_key["te3"]["image"]["shown"] == "regions" and by_key["te3"]["image"]["regions"] == regions
    assert by_key["te3"]["image"]["background"].startswith(str(tmp_path / "data" / "images" / "te3.jpg"))
    missing = by_key["te2"]["image"]
    assert missing == {
        "shown": "placeholder",
        "reason": "image missing: missing in the cache (missing: synthetic test image te2)",
        "regions": 0,
    }
    with Image.open(tmp_path / "cases" / by_key["te2"]["png"]) as png:
        # The placeholder's grey fill at the top left, inside its red frame: not a picture.
        assert png.convert("RGB").getpixel((20, 60)) == (220, 220, 220)
        assert png.convert("RGB").getpixel((11, 11)) == (224, 0, 0)
    assert "image missing: missing in the cache" in (tmp_path / "cases" / "index.html").read_text()


def test_a_text_only_run_takes_the_other_runs_cache(tmp_path):
    """B text-only, A multimodal: the regions come from A's cache."""
    run_a, run_b, _ = make_prediction_pair(tmp_path, POSTS, cache_a=True, cache_b=False)
    found = cases(tmp_path, run_a, run_b)
    assert found["cache"] == str((tmp_path / "cache").resolve())
    assert {post["image"]["shown"] for post in found["posts"]} == {"regions"}


def test_without_any_cache_raw_images_or_a_placeholder(tmp_path):
    run_a, run_b, data_dir = make_prediction_pair(tmp_path, POSTS, cache_b=False)
    (data_dir / "images" / "te0.jpg").unlink()
    (data_dir / "images" / "te5.jpg").write_bytes(b"not a jpeg")
    found = cases(tmp_path, run_a, run_b)
    by_key = {post["key"]: post for post in found["posts"]}
    assert found["cache"] is None
    assert by_key["te3"]["image"] == {
        "shown": "image",
        "background": f"{data_dir / 'images' / 'te3.jpg'} (resized from 40x32)",
        "regions": 0,
    }
    assert (
        by_key["te0"]["image"]["reason"]
        == f"image missing: no cache, and {data_dir / 'images' / 'te0.jpg'} does not exist"
    )
    assert by_key["te5"]["image"]["reason"].startswith(
        f"image missing: no cache, and {data_dir / 'images' / 'te5.jpg'} is not readable"
    )
    # --image-dir points elsewhere: the images found there.
    other = make_images(tmp_path / "other", ["te0"], size=(64, 64))
    found = cases(tmp_path, run_a, run_b, image_dir=str(other), ids=["te0"], out=tmp_path / "other_cases")
    assert found["posts"][0]["image"]["shown"] == "image"
    with Image.open(tmp_path / "other_cases" / found["posts"][0]["png"]) as png:
        pixel = png.convert("RGB").getpixel((100, 100))  # inside the image, enlarged to 320x320
        assert max(abs(got - want) for got, want in zip(pixel, (220, 30, 30))) <= 4  # JPEG


def test_prediction_files_of_other_posts_are_refused(tmp_path):
    run_a, run_b, _ = make_prediction_pair(tmp_path, POSTS)
    pred_a, pred_b = run_a / "pred_test.conll", run_b / "pred_test.conll"
    pred_b.write_text(pred_b.read_text().replace("london B-LOC B-LOC", "london O B-LOC"))
    assert refusal(tmp_path, run_a, run_b) == (
        f"{pred_a} and {pred_b} do not hold the same posts (words and gold tags): post 6 has other gold tags; "
        "compare two runs tagged on the same data"
    )
    pred_b.write_text("".join(pred_b.read_text().split("\n\n", 1)[1]))
    with pytest.raises(
        ValueError, match=r"do not hold the same posts \(words and gold tags\): 6 posts against 5;"
    ):
        cases(tmp_path, run_a, run_b)
    (run_b / "pred_test.conll").unlink()
    with pytest.raises(ValueError, match=rf"^{run_b} has no pred_test.conll \(training writes"):
        cases(tmp_path, run_a, run_b)
    assert not (tmp_path / "cases").exists()


def test_output_folder_rules(tmp_path):
    run_a, run_b, _ = make_prediction_pair(tmp_path, POSTS)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=rf"^--out {other} is not empty and is not one of our cases folders"):
        cases(tmp_path, run_a, run_b, out=other)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match=rf"^--out {run_a} is in run A {run_a}, an input of this command"):
        cases(tmp_path, run_a, run_b, out=run_a)
    # An earlier cases folder of ours is written again; the PNGs of posts no longer shown go.
    out = tmp_path / "cases"
    first = cases(tmp_path, run_a, run_b)
    second = cases(tmp_path, run_a, run_b, limit=1)
    assert sorted(p.name for p in out.glob("*.png")) == [second["posts"][0]["png"]]
    assert len(first["posts"]) == 5 and second["config"]["limit"] == 1
    assert second["config"]["run_a"] == str(run_a.resolve())


def test_a_split_file_that_no_longer_matches_the_predictions_is_refused(tmp_path):
    run_a, run_b, data_dir = make_prediction_pair(tmp_path, POSTS)
    split, pred_b = data_dir / "test.txt", run_b / "pred_test.conll"
    split.write_text(split.read_text().replace("london", "berlin"))
    assert refusal(tmp_path, run_a, run_b) == (
        f"{data_dir} changed since {run_b} was trained: test.txt changed (sha256 recorded in "
        f"{run_b / 'config.json'}); restore the files: the page shows the posts as the runs tagged them"
    )
    (data_dir / "valid.txt").write_text("")
    assert "test.txt changed, valid.txt is new (sha256" in refusal(tmp_path, run_a, run_b)
    (data_dir / "valid.txt").unlink()
    # a run recorded before the split files' sha256: the posts themselves are compared
    config = json.loads((run_b / "config.json").read_text())
    del config["data_files"]
    (run_b / "config.json").write_text(json.dumps(config))
    assert refusal(tmp_path, run_a, run_b) == (
        f"{split} does not hold the posts of {pred_b} in its order (the data changed after training?)"
    )
    split.unlink()
    assert refusal(tmp_path, run_a, run_b) == f"{split} is gone: the image keys of {pred_b} are read from it"
    # Other words in one file: named by post.
    pred_a = run_a / "pred_test.conll"
    pred_a.write_text(pred_a.read_text().replace("obama B-PER O\n", "barack B-PER O\n", 1))
    with pytest.raises(
        ValueError, match=r"\): post 1 has other words; compare two runs tagged on the same data$"
    ):
        cases(tmp_path, run_a, run_b)


def test_a_split_name_that_is_a_path_is_refused():
    with pytest.raises(ValueError, match=r"^split must be a split name such as test or valid, got '../x'$"):
        CasesConfig(run_a="a", run_b="b", out_dir="o", split="../x")


def test_a_run_still_training_and_a_classifier_run_are_named_as_such(tmp_path):
    run_a, run_b, _ = make_prediction_pair(tmp_path, POSTS)
    (run_b / "pred_test.conll").unlink()  # B is still training: its predictions come at the end
    (run_b / "results.json").unlink()
    (run_b / "metrics.jsonl").write_text('{"epoch": 1}\n')
    epochs = json.loads((run_b / "config.json").read_text())["train"]["epochs"]
    assert refusal(tmp_path, run_a, run_b) == (
        f"{run_b} is unfinished (epoch 1/{epochs}): it writes pred_test.conll when it finishes; wait for it, "
        "or continue it with `mner train-from-cache --resume`"
    )
    classifier = tmp_path / "clf"
    classifier.mkdir()
    record = {"task": "classification", "classifier": {}, "label_names": [], "data": {}}
    (classifier / "config.json").write_text(json.dumps(record))
    assert refusal(tmp_path, run_a, classifier).startswith(
        f"{classifier} is a classifier run: cases compares tagging runs only"
    )
    assert not (tmp_path / "cases").exists()


def test_a_gone_cache_leaves_the_raw_images_of_image_dir(tmp_path, caplog):
    run_a, run_b, _ = make_prediction_pair(tmp_path, POSTS)
    shutil.rmtree(tmp_path / "cache")
    other = make_images(tmp_path / "other", ["te0"], size=(64, 64))
    with caplog.at_level("WARNING"):
        found = cases(tmp_path, run_a, run_b, image_dir=str(other), ids=["te0"])
    assert found["cache"] is None
    assert found["posts"][0]["image"] == {
        "shown": "image",
        "background": f"{other / 'te0.jpg'} (resized from 64x64)",
        "regions": 0,
    }
    gone = (tmp_path / "cache").resolve()
    assert f"the cache {gone} is gone: the pictures are the raw images of {other}" in caplog.text
