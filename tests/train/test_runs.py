"""train/runs.py: the run folder's fingerprint check words the shared cache diff as it always did."""

import hashlib
import json
import re

import pytest

from mner.train.run_files import cache_differences, check_data_files, data_files_record, is_recorded_folder
from tests.cache.factories import TINY_SPEC, synthetic_models


def reference_cache_differences(found: dict, recorded: dict, ignore=()) -> list[str]:
    """train/evaluate.py's `cache_differences` and `_diff` at commit 049bece, kept as the reference."""

    def diff(a, b, prefix=""):
        if isinstance(a, dict) and isinstance(b, dict):
            out = {}
            for key in sorted(set(a) | set(b)):
                out.update(diff(a.get(key), b.get(key), f"{prefix}{key}."))
            return out
        return {} if a == b else {prefix.rstrip("."): (a, b)}

    def short(value):
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    parts = found["config"].get("fingerprint_parts"), recorded["config"].get("fingerprint_parts")
    if parts[0] is not None and parts[1] is not None:
        a, b = parts
    else:
        a, b = ({name: side[name] for name in ("config", "models", "spec")} for side in (found, recorded))
    a, b = ({key: value for key, value in side.items() if key not in ignore} for side in (a, b))
    return [f"{key}: cache {short(x)}, run {short(y)}" for key, (x, y) in sorted(diff(a, b).items())]


def side(config: dict, **changes) -> dict:
    """A {"config", "models", "spec"} cache description, as evaluate and predict build them."""
    return {"config": config, "models": synthetic_models(), "spec": TINY_SPEC.to_dict(), **changes}


@pytest.mark.parametrize(
    "found, recorded, ignore",
    [
        (
            side({"out": "/b", "fingerprint_parts": {"topk": 10, "models": {"clip": {"sha256": "y"}}}}),
            side({"out": "/a", "fingerprint_parts": {"topk": 20, "models": {"clip": {"sha256": "x"}}}}),
            (),
        ),
        (
            side({"out": "/b", "fingerprint_parts": {"topk": 10, "models": {"clip": {"sha256": "y"}}}}),
            side({"out": "/a", "fingerprint_parts": {"topk": 20, "models": {"clip": {"sha256": "x"}}}}),
            ("topk",),
        ),
        (  # no parts recorded: config, models and spec are compared, long values cut at 60 characters
            side({"out": "/b", "topk": 10}, spec={**TINY_SPEC.to_dict(), "patch_source": "p" * 80}),
            side({"out": "/a", "topk": 20}),
            (),
        ),
        (
            side({"fingerprint_parts": {"versions": {"torch": "2.4"}, "keys_sha256": "k", "x": {"y": 1}}}),
            side({"fingerprint_parts": {"keys_sha256": "j", "x": 5, "a-b": [1]}}),
            ("keys_sha256",),
        ),
    ],
)
def test_fingerprint_diff_words_as_the_old_cache_differences(found, recorded, ignore):
    expected = reference_cache_differences(found, recorded, ignore)
    assert expected  # each case differs somewhere
    assert cache_differences(found, recorded, ignore) == expected  # the shipped train.runs wording


def test_claim_folder_says_what_a_folder_is_and_never_creates_anything(tmp_path):
    """mner.runtime.claim_folder over every kind of folder, as train_from_cache calls it (claim_run_folder)."""
    from mner.runtime import claim_folder
    from mner.train.run_files import RECORD_KEYS, claim_run_folder

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
    from mner.train.run_files import claim_run_folder

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


def test_load_run_names_the_task_of_either_kind_of_run_and_refuses_what_is_no_run(tmp_path):
    from mner.train.run_files import RECORD_KEYS, is_run_folder, load_run, recorded_task
    from mner.train.tasks import SENTENCE_CLASSIFICATION, TOKEN_TAGGING

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
    from mner.train.cases import CasesConfig, write_cases
    from mner.train.evaluate import evaluate_run
    from mner.train.predict import predict

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
