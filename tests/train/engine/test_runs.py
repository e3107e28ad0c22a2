"""The run folder's files (train/engine/run_files.py): the cache diff's wording, the folder claim, the data-file
check, and load_run over both tasks."""

import hashlib
import json
import re

import pytest

from mner.train.engine.run_files import (
    cache_differences,
    check_data_files,
    data_files_record,
    is_recorded_folder,
)
from tests.cache.factories import TINY_SPEC, synthetic_models


def side(config: dict, **changes) -> dict:
    """A {"config", "models", "spec"} cache description, as evaluate and predict build them."""
    return {"config": config, "models": synthetic_models(), "spec": TINY_SPEC.to_dict(), **changes}


def test_with_fingerprint_parts_on_both_sides_only_they_are_compared():
    found = side({"out": "/b", "fingerprint_parts": {"topk": 10, "models": {"clip": {"sha256": "y"}}}})
    recorded = side({"out": "/a", "fingerprint_parts": {"topk": 20, "models": {"clip": {"sha256": "x"}}}})
    # "out" differs but is no fingerprint part (where a cache was written does not change its tokens)
    assert cache_differences(found, recorded) == [
        'models.clip.sha256: cache "y", run "x"',
        "topk: cache 10, run 20",
    ]
    assert cache_differences(found, recorded, ignore=("topk",)) == ['models.clip.sha256: cache "y", run "x"']
    assert cache_differences(found, found) == []


def test_without_parts_config_models_and_spec_are_compared_and_long_values_cut_to_60_characters():
    long = "p" * 80
    spec = TINY_SPEC.to_dict()
    found = side({"out": "/b", "topk": 10}, spec={**spec, "patch_source": long})
    recorded = side({"out": "/a", "topk": 20})
    shown = '"' + "p" * 56 + "..."  # the JSON text, 57 characters and "..."
    assert len(shown) == 60
    assert cache_differences(found, recorded) == [
        'config.out: cache "/b", run "/a"',
        "config.topk: cache 10, run 20",
        f"spec.patch_source: cache {shown}, run {json.dumps(spec['patch_source'])}",
    ]


def test_a_part_on_one_side_is_null_on_the_other_and_a_table_against_a_value_is_one_line():
    found = side({"fingerprint_parts": {"versions": {"torch": "2.4"}, "keys_sha256": "k", "x": {"y": 1}}})
    recorded = side({"fingerprint_parts": {"keys_sha256": "j", "x": 5, "a-b": [1]}})
    assert cache_differences(found, recorded, ignore=("keys_sha256",)) == [
        "a-b: cache null, run [1]",
        'versions: cache {"torch": "2.4"}, run null',
        'x: cache {"y": 1}, run 5',
    ]


def test_a_classifier_record_without_the_extraction_config_is_compared_on_models_and_spec():
    spec = TINY_SPEC.to_dict()
    found = side({"fingerprint_parts": {"topk": 10}})
    recorded = {"models": synthetic_models(), "spec": {**spec, "patch_dim": spec["patch_dim"] + 1}}
    assert cache_differences(found, recorded) == [
        f"spec.patch_dim: cache {spec['patch_dim']}, run {spec['patch_dim'] + 1}"
    ]


def test_claim_folder_says_what_a_folder_is_and_never_creates_anything(tmp_path):
    """mner.runtime.claim_folder over every kind of folder, as train_from_cache calls it (claim_run_folder)."""
    from mner.runtime import claim_folder
    from mner.train.engine.run_files import RECORD_KEYS, claim_run_folder

    assert claim_run_folder(tmp_path / "a" / "b", resume=False).state == "new"
    assert not (tmp_path / "a").exists()
    (tmp_path / "empty").mkdir()
    assert claim_run_folder(tmp_path / "empty", resume=False).state == "empty"
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.json").write_text(json.dumps({key: None for key in RECORD_KEYS}))
    assert claim_run_folder(ours, resume=True).state == "ours"
    assert claim_folder(ours, "config.json", RECORD_KEYS, resume=None).state == "ours"
    # A killed run (no results.json) is called unfinished; a finished one is not.
    with pytest.raises(ValueError) as refused:
        claim_run_folder(ours, resume=False)
    assert str(refused.value) == (
        f"{ours} holds an unfinished run (config.json but no results.json: it was stopped before the end); "
        "pass --resume to continue it or choose another --out"
    )
    (ours / "results.json").write_text("{}")
    with pytest.raises(
        ValueError, match=re.escape(f"{ours} already holds a run (config.json); pass --resume")
    ):
        claim_run_folder(ours, resume=False)
    (ours / "results.json").unlink()
    for text in (
        "[1, 2]",
        "{not json",
        json.dumps({"model": {}}),
    ):  # not ours: other JSON, damaged, keys missing
        (ours / "config.json").write_text(text)
        with pytest.raises(
            ValueError, match=re.escape(f"--out {ours} is not empty and is not one of our run")
        ):
            claim_run_folder(ours, resume=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=re.escape(f"--out {tmp_path / 'file'} is a file, not a folder")):
        claim_run_folder(tmp_path / "file", resume=False)


def test_release_removes_only_what_the_command_created(tmp_path):
    from mner.train.engine.run_files import claim_run_folder

    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "sibling.txt").write_text("the user's")
    new = claim_run_folder(tmp_path / "keep" / "x" / "run", resume=False)
    new.create()
    (new.path / "config.json").write_text("{}")
    new.release()
    assert sorted(p.name for p in (tmp_path / "keep").iterdir()) == ["sibling.txt"]  # x/ went, keep/ stayed
    (tmp_path / "empty").mkdir()
    empty = claim_run_folder(tmp_path / "empty", resume=False)
    (empty.create() / "checkpoint").mkdir()
    (empty.path / "metrics.jsonl").write_text("")
    empty.release()
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_check_data_files_names_what_changed_since_training(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text("a\n")
    (data / "test.txt").write_text("b\n")
    files = [data / name for name in ("train.txt", "valid.txt", "test.txt")]
    record = {"data_files": data_files_record(files)}
    assert record["data_files"] == {
        "train.txt": hashlib.sha256(b"a\n").hexdigest(),
        "test.txt": hashlib.sha256(b"b\n").hexdigest(),
    }
    check_data_files(record, files, tmp_path / "run")  # unchanged: nothing to say
    check_data_files({}, [], tmp_path / "run")  # a run recorded before data_files: not checked
    with open(data / "train.txt", "a") as train:
        train.write("c\n")
    (data / "valid.txt").write_text("v\n")
    (data / "test.txt").unlink()
    expected = (
        f"{data} changed since {tmp_path / 'run'} was trained: test.txt is gone, train.txt changed, "
        f"valid.txt is new (sha256 recorded in {tmp_path / 'run' / 'config.json'}); the scores would not "
        "be on the run's data: restore the files, or pass a copy of the changed folder with --data-dir to "
        "score it deliberately"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        check_data_files(record, files, tmp_path / "run")
    assert is_recorded_folder(str(data), None) and is_recorded_folder(
        str(data), tmp_path / "data" / ".." / "data"
    )
    assert not is_recorded_folder(str(data), tmp_path)


def test_check_data_files_covers_the_texts_of_a_folder_of_post_files(tmp_path):
    # An MVSA folder keeps each post's text in data/<guid>.txt: an edited text is changed data, as an
    # edited split file is; an image beside it is the feature cache's to check.
    data = tmp_path / "mvsa"
    (data / "data").mkdir(parents=True)
    (data / "train.txt").write_text("guid,tag\n1,positive\n")
    (data / "data" / "1.txt").write_text("a dog\n")
    (data / "data" / "1.jpg").write_bytes(b"jpeg")
    files = [data / "train.txt", data / "data"]
    record = {"data_files": data_files_record(files)}
    assert set(record["data_files"]) == {"train.txt", "data/"}
    (data / "data" / "1.jpg").write_bytes(b"other jpeg")
    check_data_files(record, files, tmp_path / "run")
    (data / "data" / "1.txt").write_text("a cat\n")
    with pytest.raises(ValueError, match=r"changed since .* was trained: data/ changed \(sha256 recorded"):
        check_data_files(record, files, tmp_path / "run")
    # a run recorded before the texts were: its split files are still compared, the texts are not
    check_data_files(
        {"data_files": {"train.txt": record["data_files"]["train.txt"]}}, files, tmp_path / "run"
    )


def test_load_run_names_the_task_of_either_kind_of_run_and_refuses_what_is_no_run(tmp_path):
    from mner.train.engine.run_files import RECORD_KEYS, is_run_folder, load_run, recorded_task
    from mner.train.engine.tasks import SENTENCE_CLASSIFICATION, TOKEN_TAGGING

    def folder(name: str, record) -> object:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(record))
        return path

    tagger = folder("tagger", {**{key: None for key in RECORD_KEYS}, "model": {"task": "tagging"}})
    classifier = folder(
        "classifier", {"task": "classification", "classifier": {}, "label_names": [], "data": {}}
    )
    assert load_run(tagger).task is TOKEN_TAGGING and load_run(tagger).path == tagger
    assert load_run(classifier).task is SENTENCE_CLASSIFICATION
    assert is_run_folder(tagger, "tagging") and not is_run_folder(tagger, "classification")
    assert is_run_folder(classifier) and recorded_task(classifier) == "classification"

    unknown = folder("unknown", {"task": "parsing"})
    lacking = folder("lacking", {"task": "classification", "classifier": {}})
    for path, message in (
        (tmp_path / "none", f"{tmp_path / 'none'} is not a run folder: no config.json"),
        (
            unknown,
            f"{unknown / 'config.json'} is not the record of a run: it names no task of tagging, classification",
        ),
        (
            lacking,
            f"{lacking / 'config.json'} is not the record of a classifier run: it lacks label_names, data",
        ),
    ):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            load_run(path)
        assert recorded_task(path) is None and not is_run_folder(path)


def test_evaluate_predict_and_cases_of_tagging_refuse_a_classifier_run_by_its_task(tmp_path):
    from mner.train.report.cases import CasesConfig, write_cases
    from mner.train.report.evaluate import evaluate_run
    from mner.train.report.predict import predict

    run = tmp_path / "clf"
    run.mkdir()
    record = {"task": "classification", "classifier": {}, "label_names": [], "data": {}}
    (run / "config.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=re.escape(f"{run} is a classifier run: it is scored by")):
        evaluate_run(run)
    with pytest.raises(ValueError, match=re.escape(f"{run} is a classifier run: it labels posts with")):
        predict(run, tmp_path / "in.txt", None, tmp_path / "out.txt")
    with pytest.raises(ValueError, match=re.escape(f"{run} is a classifier run: cases compares tagging")):
        write_cases(CasesConfig(run_a=str(run), run_b=str(run), out_dir=str(tmp_path / "cases")))
