"""Tests for the CLI (pipeline/cli/): every command's --help, user errors as clean click errors, and every command
run end to end on a tiny IMGID data folder with the untrained presets (tiny-clip, tiny-frcnn, tiny-bert).

The stages themselves are tested in tests/extract, tests/cache and tests/train; here the question is
whether each command reaches its stage with the right arguments and reports back what the stage did.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import click
import pandas as pd
import pytest
from click.testing import CliRunner, Result
from PIL import Image

from mner.cache.conll import read_split
from mner.cache.manifest import read_manifest
from mner.cli import main
from mner.demo.build import DemoConfig
from mner.extract.config import DETECTORS
from mner.train.engine.config import ModelConfig
from mner.train.report.ablation_config import ABLATIONS
from mner.train.zoo.text import PRESETS
from tests.train.factories import make_cache
from tests.train.run_factories import make_data, make_images, make_prediction_pair

# Every leaf command, as the words typed after `mner`.
COMMANDS = [
    ("extract-features",),
    ("cache", "inspect"),
    ("cache", "show"),
    ("cache", "verify"),
    ("train-from-cache",),
    ("evaluate",),
    ("predict",),
    ("train-classifier",),
    ("ablate",),
    ("models",),
    ("demo-data",),
    ("results",),
    ("cases",),
]
# Options whose default is None in click but which say in their help what None means.
DOCUMENTED_NONE_DEFAULTS = {
    ("extract-features",): [
        "--score-thr FLOAT Detector score threshold [default: 0.2; 0.0 for tiny-frcnn]",
        "or an untrained preset: tiny-clip, or demo-clip (the bundled MiniLM's 6 layers of 384, so IFAformer's towers "
        "pair with it) [default: tiny-clip with --data-dir; required with --dataset]",
        "none: no region tokens) [default: tiny-frcnn with --data-dir; required with --dataset]",
    ],
    ("train-from-cache",): [
        "--epochs INTEGER Number of epochs [default: from config]",
        "--seed INTEGER Random seed [default: from config]",
    ],
    ("evaluate",): [
        "--cache DIRECTORY Cache [default: the run's].",
        "--data-dir DIRECTORY Data folder [default: the run's].",
    ],
    ("ablate",): ["--epochs INTEGER Epochs per run [default: from config]"],
}
# Shards of 8 images: the 18 images of the data folder make three shards (8, 8, 2).
SHARD_SIZE = 8
TOPK = 4


def invoke(*args) -> Result:
    return CliRunner().invoke(main, [str(arg) for arg in args])


def ok(*args) -> Result:
    """Run `mner ARGS` and require exit code 0."""
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def user_error(*args) -> str:
    """Run `mner ARGS`, which must fail as a clean click error; returns its last stderr line."""
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    # click turned the error into SystemExit(1) after printing it: no exception escaped, no traceback.
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result.stderr.strip().splitlines()[-1]


def one_line(text: str) -> str:
    """Help text on one line, so that wrapping at any terminal width is irrelevant: click's wrapper
    also breaks after a hyphen ("tiny-" / "frcnn"), which is joined back without a space."""
    return " ".join(re.sub(r"-\n\s+", "-", text).split())


def command_at(path: tuple[str, ...]) -> click.Command:
    command = main
    for name in path:
        command = command.commands[name]
    return command


# ------------------------------------------------------------------------------------------------ help


@pytest.mark.parametrize("path", [(), *COMMANDS], ids=lambda path: " ".join(path) or "mner")
def test_help_shows_an_example_and_the_defaults(path):
    command = command_at(path)
    text = one_line(ok(*path, "--help").output)
    assert "Example" in text
    assert one_line(command.help.split("\n\n")[0]) in text  # what the command does
    shown = 0
    for param in command.params:
        # A flag's default (off) goes without saying; every option with a value default must show it.
        # (No default is None in older click and a sentinel object in click >= 8.3.)
        default = param.default
        if isinstance(param, click.Option) and isinstance(default, str | int | float) and not param.is_flag:
            assert f"[default: {default}]" in text, param.name
            shown += 1
    for documented in DOCUMENTED_NONE_DEFAULTS.get(path, []):
        assert documented in text
    # These commands have value defaults: the loop above must have checked some (not skipped them all).
    if path in (("extract-features",), ("evaluate",), ("ablate",), ("demo-data",), ("results",), ("cases",)):
        assert shown > 0


# Options whose None means "what the TOML config says", which their help must say.
FROM_CONFIG = {
    ("train-from-cache",): {"model", "text_encoder", "epochs", "seed", "threads"},
    ("train-classifier",): {"mode", "head", "text_pool", "image_feature", "text_encoder", "class_weights"}
    | {"epochs", "seed", "threads"},
}


@pytest.mark.parametrize("path", list(FROM_CONFIG), ids=" ".join)
def test_options_left_to_the_config_default_to_none_and_say_so(path):
    """An option the config file may set has no click default (it would override the file), and its
    help says where the value comes from instead."""
    command = command_at(path)
    for name in FROM_CONFIG[path]:
        param = next(p for p in command.params if p.name == name)
        default = param.get_default(click.Context(command))
        assert not isinstance(default, str | int | float), name  # None, or click >= 8.3's sentinel
        assert "[default: from config" in param.help, name


@pytest.mark.parametrize("path", [("train-from-cache",), ("train-classifier",), ("ablate",)], ids=" ".join)
def test_text_encoder_help_lists_the_presets(path):
    """The presets live with the encoder code (torch), which loading the CLI must not import, so their
    names are written in the help and checked here."""
    param = next(p for p in command_at(path).params if p.name == "text_encoder")
    assert " | ".join(PRESETS) in one_line(param.help)


def test_cache_group_help_lists_its_commands():
    text = ok("cache", "--help").output
    for name in ("inspect", "show", "verify"):
        assert re.search(rf"^\s+{name}\s+\S", text, re.MULTILINE), name


def test_version_is_the_package_version():
    assert importlib.metadata.version("mner-cache") in ok("--version").output


@pytest.mark.slow
def test_python_m_mner_and_the_console_script_both_work(tmp_path):
    """Run from an unrelated folder: both entry points come from the installed package."""
    script = Path(sys.executable).parent / "mner"
    for argv in ([sys.executable, "-m", "mner", "--help"], [str(script), "--help"]):
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("Usage: mner [OPTIONS] COMMAND [ARGS]...")
        for name in ("extract-features", "train-from-cache", "ablate", "demo-data"):
            assert name in done.stdout


# ------------------------------------------------------------------------------------------ end to end


def extract_args(data_dir: Path, cache_dir: Path, topk: int = TOPK) -> list:
    return [
        "extract-features",
        "--data-dir", data_dir,
        "--clip", "tiny-clip",
        "--detector", "tiny-frcnn",
        "--num-workers", "0",
        "--topk", topk,
        "--shard-size", SHARD_SIZE,
        "--out", cache_dir,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory):
    """A data folder of 10/4/4 posts with 40x32 solid-colour JPEGs (the last test post has none)."""
    root = tmp_path_factory.mktemp("cli")
    data_dir, posts = make_data(root)
    keys = [post.key for post in posts]
    make_images(data_dir / "images", keys[:-1])
    return SimpleNamespace(root=root, data_dir=data_dir, keys=keys)


@pytest.fixture(scope="module")
def workspace(data_folder):
    """The data folder extracted through `mner extract-features` (the end-to-end tests, all slow)."""
    root, data_dir, keys = data_folder.root, data_folder.data_dir, data_folder.keys
    cache_dir = root / "cache"
    extracted = ok(*extract_args(data_dir, cache_dir))
    return SimpleNamespace(
        root=root,
        data_dir=data_dir,
        cache_dir=cache_dir,
        keys=keys,
        missing=keys[-1],
        extract_output=extracted.stdout,
    )


@pytest.fixture(scope="module")
def runs(workspace):
    """A multimodal and a text-only run (tiny-bert, one epoch) through `mner train-from-cache`."""
    full, text = workspace.root / "runs" / "full", workspace.root / "runs" / "text"
    common = ["--data-dir", workspace.data_dir, "--text-encoder", "tiny-bert", "--epochs", "1"]
    common += ["--set", "train.batch_size=4"]
    outputs = [
        ok("train-from-cache", "--cache", workspace.cache_dir, *common, "--out", full).stdout,
        ok("train-from-cache", "--text-only", *common, "--out", text).stdout,
    ]
    return SimpleNamespace(full=full, text=text, outputs=outputs)


@pytest.mark.slow
def test_extract_features_writes_the_cache_and_a_summary(workspace):
    manifest = read_manifest(workspace.cache_dir)
    assert sorted(image["key"] for image in manifest["images"]) == sorted(workspace.keys)
    status = {image["key"]: image["status"] for image in manifest["images"]}
    assert status == {key: "missing" if key == workspace.missing else "ok" for key in workspace.keys}
    assert [shard["rows"] for shard in manifest["shards"]] == [8, 8, 2]
    assert manifest["config"]["topk"] == TOPK
    assert f"18 images (ok 17, missing 1, corrupt 0) in {workspace.cache_dir}" in workspace.extract_output


@pytest.mark.slow
def test_cache_verify_inspect_and_show(workspace, tmp_path):
    cache_dir, data_dir = workspace.cache_dir, workspace.data_dir
    verified = ok("cache", "verify", cache_dir, "--data-dir", data_dir).stdout.strip().splitlines()
    assert verified[-1].startswith(f"{cache_dir}: OK (")
    assert not any(line.startswith("PROBLEM") for line in verified)

    manifest = read_manifest(cache_dir)
    info = json.loads(ok("cache", "inspect", cache_dir, "--json").stdout)
    assert info["fingerprint"] == manifest["fingerprint"]
    assert info["images"] == 18
    assert info["status"] == {"ok": 17, "missing": 1, "corrupt": 0}
    assert info["shards"] == {"count": 3, "rows": 18, "rows_per_shard": [8, 8, 2]}
    # The histogram of regions per ok image, recounted from the manifest (JSON keys are strings).
    recount = Counter(image["num_regions"] for image in manifest["images"] if image["status"] == "ok")
    assert info["region_histogram"] == {str(k): recount.get(k, 0) for k in range(TOPK + 1)}
    assert info["spec"]["max_regions"] == TOPK
    assert info["models"]["detector"] == {"name": "tiny-frcnn", "untrained": True}
    assert info["models"]["clip"]["untrained"] is True
    assert ok("cache", "inspect", cache_dir).stdout.count("(UNTRAINED)") == 2

    key = workspace.keys[0]
    png = tmp_path / "shown" / f"{key}.png"
    image = data_dir / "images" / f"{key}.jpg"
    shown = json.loads(ok("cache", "show", cache_dir, "--id", key, "--png", png, "--image", image).stdout)
    entry = next(image for image in manifest["images"] if image["key"] == key)
    assert (shown["key"], shown["status"], shown["size"]) == (key, "ok", [40, 32])
    assert shown["num_regions"] == entry["num_regions"] == len(shown["regions"])
    assert shown["background"] == str(image)
    with Image.open(png) as drawn:
        assert (drawn.format, drawn.size) == ("PNG", (40, 32))

    # Without --image the picture is found through the data folder recorded at extraction; --scale enlarges.
    shown = json.loads(ok("cache", "show", cache_dir, "--id", key, "--png", png, "--scale", "3").stdout)
    drawn_on, note = shown["background"].split(" (", 1)
    assert Path(drawn_on).resolve() == image.resolve() and note == "resized from 40x32)"
    with Image.open(png) as drawn:
        assert drawn.size == (120, 96)


@pytest.mark.slow
def test_show_refuses_to_draw_an_image_that_is_missing(workspace, tmp_path):
    missing = workspace.missing
    line = user_error("cache", "show", workspace.cache_dir, "--id", missing, "--png", tmp_path / "x.png")
    assert line.startswith(f"Error: image {missing!r} has status missing (")
    assert line.endswith("); there is nothing to draw")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_cache_verify_fails_on_a_damaged_shard(workspace, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(workspace.cache_dir, damaged)
    with open(damaged / "shard-00001.h5", "ab") as shard:
        shard.write(b"\0")  # the file no longer matches the sha256 in the manifest
    result = invoke("cache", "verify", damaged)
    assert result.exit_code == 1, result.output
    problems = [line for line in result.stdout.splitlines() if line.startswith("PROBLEM: ")]
    assert problems and all("shard-00001.h5" in line for line in problems)
    assert result.stderr.strip().splitlines()[-1] == f"Error: {damaged}: {len(problems)} problem(s) found"


@pytest.mark.slow
def test_cache_verify_images_reports_each_changed_image(workspace, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(workspace.data_dir, data)  # copy2 keeps each file's mtime to the nanosecond
    ok("cache", "verify", workspace.cache_dir, "--data-dir", data, "--images")
    entry = read_manifest(workspace.cache_dir)["images"][5]
    key = entry["key"]
    (data / "images" / f"{key}.jpg").write_bytes(b"another picture")
    result = invoke("cache", "verify", workspace.cache_dir, "--data-dir", data, "--images")
    assert result.exit_code == 1, result.output
    assert [line for line in result.stdout.splitlines() if line.startswith("PROBLEM: ")] == [
        f"PROBLEM: {data / 'images' / key}.jpg: image {key!r} changed since extraction (size "
        f"{entry['file_size']} -> 15; {entry['shard']} row {entry['row']}); "
        "re-run `mner extract-features` to extract its shard again"
    ]


@pytest.mark.slow
def test_second_extract_reuses_the_completed_shards(workspace):
    shards = sorted(workspace.cache_dir.glob("shard-*.h5"))
    before = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in shards}
    fingerprint = read_manifest(workspace.cache_dir)["fingerprint"]
    output = ok(*extract_args(workspace.data_dir, workspace.cache_dir)).stdout
    # A rewritten shard would be a new file renamed into place: a new inode and a new mtime.
    after = {path.name: (path.stat().st_ino, path.stat().st_mtime_ns) for path in shards}
    assert after == before
    assert read_manifest(workspace.cache_dir)["fingerprint"] == fingerprint
    assert "18 images (ok 17, missing 1, corrupt 0)" in output


@pytest.mark.slow
def test_extract_with_another_topk_into_the_same_folder_is_refused(workspace):
    shards = sorted(workspace.cache_dir.glob("shard-*.h5"))
    before = {path.name: path.stat().st_mtime_ns for path in shards}
    old = read_manifest(workspace.cache_dir)["fingerprint"][:12]
    line = user_error(*extract_args(workspace.data_dir, workspace.cache_dir, topk=TOPK - 1))
    pattern = (
        rf"Error: cache at {re.escape(str(workspace.cache_dir))} was made with a different configuration "
        rf"\(fingerprint {old} != [0-9a-f]{{12}}\); use --overwrite to replace it; differs: .*"
    )
    assert re.fullmatch(pattern, line), line
    assert f"topk {TOPK} -> {TOPK - 1}" in line
    assert {path.name: path.stat().st_mtime_ns for path in shards} == before


@pytest.mark.slow
def test_train_from_cache_multimodal_and_text_only(workspace, runs):
    manifest = read_manifest(workspace.cache_dir)
    full = json.loads((runs.full / "config.json").read_text())
    text = json.loads((runs.text / "config.json").read_text())
    assert full["model"]["text_only"] is False and text["model"]["text_only"] is True
    assert full["model"]["text_encoder"] == text["model"]["text_encoder"] == "tiny-bert"
    assert full["train"]["epochs"] == text["train"]["epochs"] == 1
    assert full["train"]["batch_size"] == 4  # from --set
    assert full["cache"]["fingerprint"] == manifest["fingerprint"]
    assert text["cache"] is None  # a text-only run records no cache
    for run_dir, output in zip((runs.full, runs.text), runs.outputs):
        assert f"run written to {run_dir}" in output
        assert json.loads((run_dir / "results.json").read_text())["epochs_run"] == 1


@pytest.mark.slow
def test_evaluate_and_results(runs):
    output = ok("evaluate", runs.full, "--split", "test").stdout
    assert "micro" in output
    # evaluate writes its own eval/test-<time>/ folder; training's results.json is left alone.
    (evaluated_file,) = (runs.full / "eval").glob("test-*/results.json")
    evaluated = json.loads(evaluated_file.read_text())
    # The best model scored again on test: what training recorded for the same model and split.
    trained = json.loads((runs.full / "results.json").read_text())["test"]
    assert evaluated["micro"] == pytest.approx(trained["micro"])

    table = ok("results", runs.text, runs.full, "--bootstrap", "200").stdout.splitlines()
    assert table[0].split() == ["run", "P", "R", "F1", "support", "dF1", "CI95", "p", "status"]
    rows = {line.split()[0]: line.split() for line in table[1:3]}
    assert set(rows) == {str(runs.text), str(runs.full)}
    assert rows[str(runs.full)][3] == f"{100 * evaluated['micro']['f1']:.2f}"
    text_f1 = json.loads((runs.text / "results.json").read_text())["test"]["micro"]["f1"]
    assert rows[str(runs.text)][3] == f"{100 * text_f1:.2f}"
    # The paired bootstrap against the first run: dF1 is the two runs' F1 difference (from their
    # pred_test.conll, which training scored into results.json), and its interval holds it.
    assert rows[str(runs.text)][5] == "base"
    delta, interval, p = rows[str(runs.full)][5:8]
    assert float(delta) == pytest.approx(100 * (evaluated["micro"]["f1"] - text_f1), abs=0.006)
    low, high = (float(x) for x in interval.strip("[]").split(","))
    assert low <= float(delta) <= high and 1 / 201 <= float(p) <= 1
    assert table[3] == (
        f"dF1 in percentage points against {runs.text}: paired bootstrap over posts on test, "
        "200 resamples, seed 0; p two-sided"
    )
    refused = CliRunner().invoke(main, ["results", str(runs.text), str(runs.full), "--bootstrap", "-1"])
    assert refused.exit_code == 2 and "Invalid value for --bootstrap: must be >= 0 (0: no test), got -1" in (
        refused.output
    )
    single = ok("results", runs.full).stdout.splitlines()
    assert single[0].split() == ["run", "P", "R", "F1", "support", "status"]


def test_cases_prints_the_counts_and_writes_the_page(tmp_path):
    posts = [
        ("te0", "obama in paris", "B-PER O B-LOC", "O O B-LOC", "B-PER O B-LOC"),
        ("te1", "london", "B-LOC", "B-PER", "B-ORG"),
    ]
    run_a, run_b, _ = make_prediction_pair(tmp_path, posts, statuses={"te1": "corrupt"})
    out = tmp_path / "cases"
    lines = ok("cases", run_a, run_b, "--out", out, "--limit", "1").stdout.splitlines()
    assert lines == [
        "2 of 2 test posts differ: B fixes 1 gold spans, breaks 0, changes the type of 1; 1 shown",
        f"case study written to {out / 'index.html'}",
    ]
    picked = ok("cases", run_a, run_b, "--out", out, "--ids", "te1").stdout
    assert "1 shown" in picked
    entry = json.loads((out / "cases.json").read_text())["posts"][0]
    assert (entry["key"], entry["image"]["shown"]) == ("te1", "placeholder")
    assert sorted(path.name for path in out.glob("*.png")) == ["001-te1.png"]
    refused = user_error("cases", run_a, run_b, "--out", run_b)
    assert refused == (
        f"Error: --out {run_b} is in run B {run_b}, an input of this command, and would replace what is "
        "there; choose a path outside it (or a new file name)"
    )
    assert user_error("cases", run_a, run_b, "--out", out, "--limit", "-1") == (
        "Error: --limit must be an integer >= 0 (0: every post that differs), got -1"
    )


@pytest.mark.slow
def test_cases_on_the_trained_runs(runs, tmp_path):
    """Text-only against multimodal: the regions come from the multimodal run's cache, and the
    printed counts are a recount from the two prediction files."""
    from mner.train.engine.metrics import entities
    from mner.train.report.significance import read_predictions

    out = tmp_path / "cases"
    first = ok("cases", runs.text, runs.full, "--out", out, "--limit", "0").stdout.splitlines()[0]
    _, gold, a = read_predictions(runs.text / "pred_test.conll")
    _, _, b = read_predictions(runs.full / "pred_test.conll")
    fixed = sum(len((entities(g) & entities(y)) - entities(x)) for g, x, y in zip(gold, a, b))
    broken = sum(len((entities(g) & entities(x)) - entities(y)) for g, x, y in zip(gold, a, b))
    differ = sum(x != y for x, y in zip(a, b))
    assert first.startswith(
        f"{differ} of {len(gold)} test posts differ: B fixes {fixed} gold spans, breaks {broken},"
    )
    record = json.loads((out / "cases.json").read_text())
    assert len(record["posts"]) == differ
    for entry in record["posts"]:
        assert (out / entry["png"]).is_file()
        assert entry["image"]["shown"] in ("regions", "placeholder")


@pytest.mark.slow
def test_predict_tags_new_posts_as_training_tagged_the_test_split(workspace, runs, tmp_path):
    source = workspace.data_dir / "test.txt"
    out = tmp_path / "pred" / "test.conll"
    output = ok(
        "predict", runs.full, "--input", source, "--image-dir", workspace.data_dir / "images", "--out", out
    ).stdout
    assert f"predictions written to {out}" in output
    gold, tagged = read_split(source), read_split(out)
    assert [post.key for post in tagged.posts] == [post.key for post in gold.posts]
    assert [post.words for post in tagged.posts] == [post.words for post in gold.posts]
    # predict re-extracts the images with the run's extractor, so it must tag what training's own
    # decoding of the test split wrote into pred_test.conll (`token gold pred`).
    blocks = (runs.full / "pred_test.conll").read_text().strip().split("\n\n")
    trained = [tuple(line.split()[-1] for line in block.splitlines()) for block in blocks]
    assert [post.tags for post in tagged.posts] == trained
    spans = [json.loads(line) for line in Path(f"{out}.json").read_text().splitlines()]
    assert [line["key"] for line in spans] == [post.key for post in gold.posts]
    refused = user_error(
        "predict", runs.full, "--input", source, "--cache", runs.full, "--out", tmp_path / "x"
    )
    assert refused == "Error: --cache applies to classifier runs; a tagging run re-extracts with --image-dir"


@pytest.mark.slow
def test_ablate_runs_every_experiment_and_prints_the_table(workspace, tmp_path):
    out = tmp_path / "ablation"
    output = ok(
        "ablate", "--cache", workspace.cache_dir, "--data-dir", workspace.data_dir,
        "--exp", "full", "--exp", "text_only", "--seeds", "1", "--epochs", "1",
        "--text-encoder", "tiny-bert", "--set", "train.batch_size=4", "--out", out,
    ).stdout  # fmt: skip
    table = pd.read_csv(out / "ablation.csv")
    assert list(zip(table["experiment"], table["seed"])) == [("full", 1), ("text_only", 1)]
    assert output.strip() == (out / "ablation.md").read_text().strip()
    for name in ("full", "text_only"):
        assert re.search(rf"^\| {name} \| 1 \|", output, re.MULTILINE), name
        record = json.loads((out / name / "seed1" / "config.json").read_text())
        assert record["model"]["text_only"] is (name == "text_only")
        assert record["train"]["epochs"] == 1


@pytest.mark.slow
def test_demo_data_builds_the_demo_from_the_given_seed(tmp_path):
    out = tmp_path / "demo"
    assert f"demo data at {out}" in ok("demo-data", "--out", out, "--seed", 5).stdout
    meta = json.loads((out / "demo.json").read_text())
    expected = dataclasses.asdict(DemoConfig(out_dir=str(out), seed=5))
    assert meta["config"] == {name: value for name, value in expected.items() if name != "out_dir"}
    for split, keys in meta["splits"].items():
        assert [post.key for post in read_split(out / f"{split}.txt").posts] == keys


# --------------------------------------------------------------------------------------- user errors


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "nowhere"
    line = user_error("extract-features", "--data-dir", missing, "--out", tmp_path / "cache")
    assert line == f"Error: data folder {missing} does not exist"
    assert not (tmp_path / "cache").exists()


def test_columns_option_reads_files_with_more_columns_and_is_recorded(tmp_path):
    """issue 10 A7: extra columns are an error naming the file and line, unless --columns picks them."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid", "test"):
        (data / f"{split}.txt").write_text("IMGID:1\nEU\tNNP\tB-ORG\nrejects\tVBZ\tO\n", encoding="utf-8")
    args = ["extract-features", "--data-dir", data, "--num-workers", "0", "--out", tmp_path / "cache"]
    line = user_error(*args)
    assert line.startswith(
        f"Error: {data / 'train.txt'}:2: 3 tab-separated columns; expected 'token<TAB>tag'"
    )
    assert not (tmp_path / "cache").exists()
    line = user_error(*args, "--columns", "2,2")
    assert line.startswith("Error: columns '2,2': expected WORD,TAG: two different column numbers")
    ok(*args, "--columns", "0,2")
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["config"]["columns"] == [0, 2]


def test_inspect_refuses_a_folder_that_is_not_a_cache(tmp_path):
    line = user_error("cache", "inspect", tmp_path)
    assert (
        line
        == f"Error: {tmp_path} is not a feature cache: no manifest.json; run `mner extract-features` first"
    )


def test_torchvision_detector_without_a_checkpoint(data_folder, tmp_path):
    out = tmp_path / "cache"
    args = ["extract-features", "--data-dir", data_folder.data_dir, "--num-workers", "0", "--out", out]
    line = user_error(*args, "--detector", "fasterrcnn_resnet50_fpn")
    assert line == (
        "Error: --detector-ckpt is required for fasterrcnn_resnet50_fpn: "
        "give a local state-dict file (weights are never downloaded)"
    )
    assert not out.exists()


def test_unknown_set_key(data_folder, tmp_path):
    out = tmp_path / "run"
    known = ", ".join(sorted(field.name for field in dataclasses.fields(ModelConfig)))
    line = user_error(
        "train-from-cache",
        "--text-only",
        "--data-dir",
        data_folder.data_dir,
        "--set",
        "model.nope=1",
        "--out",
        out,
    )
    assert line == f"Error: --set model.nope=1: unknown key model.nope; known keys: {known}"
    assert not out.exists()


def test_multimodal_training_without_a_cache(data_folder, tmp_path):
    line = user_error("train-from-cache", "--data-dir", data_folder.data_dir, "--out", tmp_path / "run")
    assert (
        line == "Error: --cache is required unless model.text_only is true (pass --cache DIR, or --text-only)"
    )


def test_mango_on_a_cache_without_the_vision_state_is_refused_with_the_command_that_makes_one(tmp_path):
    """--model mango trains CLIP's last 2 blocks by default: a cache extracted without
    --vision-trainable-blocks is refused (never trained frozen), naming where the 2 came from, before
    the run folder exists; the same value from --set is named as the user's."""
    data_dir, posts = make_data(tmp_path)
    cache_dir = make_cache(tmp_path, posts)
    common = ["train-from-cache", "--cache", cache_dir, "--data-dir", data_dir, "--text-encoder", "tiny-bert"]
    extract = (
        f"`mner extract-features --data-dir {data_dir} --out NEW_CACHE --clip tiny-clip --detector tiny-frcnn "
        "--vision-trainable-blocks 2` and train on it, or set model.vision_trainable_blocks = 0"
    )
    stored = (
        f"trains the last 2 vision blocks on the state the cache stores before them, but the cache "
        f"{cache_dir} stores no vision state (extracted without --vision-trainable-blocks); extract one with "
    )
    line = user_error(*common, "--model", "mango", "--out", tmp_path / "mango")
    assert line == (
        "Error: model.vision_trainable_blocks = 2 (model mango's default, configs/models/mango.toml) "
        + stored
        + extract
    )
    line = user_error(*common, "--set", "model.vision_trainable_blocks=2", "--out", tmp_path / "set")
    assert line == "Error: model.vision_trainable_blocks = 2 " + stored + extract
    assert not (tmp_path / "mango").exists() and not (tmp_path / "set").exists()


def test_evaluate_refuses_a_folder_that_is_not_a_run(tmp_path):
    line = user_error("evaluate", tmp_path)
    assert (
        line
        == f"Error: {tmp_path} is not a run folder: no config.json (train one with `mner train-from-cache`)"
    )


def test_ablate_refuses_an_unknown_experiment(data_folder, tmp_path):
    line = user_error(
        "ablate", "--data-dir", data_folder.data_dir, "--exp", "no_such", "--out", tmp_path / "ablation"
    )
    assert line == (
        f"Error: unknown experiment 'no_such': use one of {', '.join(ABLATIONS)}, all, "
        "model=NAME or the path of an existing config-diff .toml file"
    )


# ------------------------------------------------------------------ argument checks: early, in flag names


@pytest.mark.parametrize(
    "args, message",
    [
        (["--topk", "0"], "--topk must be >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
        (["--shard-size", "0"], "--shard-size must be >= 1, got 0"),
        (["--score-thr", "2"], "--score-thr must be in [0, 1], got 2.0"),
        (["--nms-iou", "0"], "--nms-iou must be in (0, 1], got 0.0"),
        (["--device", "gpu"], "--device must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N', got 'gpu'"),
        (["--detector", "yolo"], "unknown detector 'yolo'; known: " + ", ".join(DETECTORS)),
        (
            ["--vision", "resnet50"],
            "--vision-ckpt is required for resnet50: give a local torchvision state-dict file "
            "(weights are never downloaded)",
        ),
        (
            ["--vision", "resnet101", "--vision-ckpt", "/nope/r101.pth"],
            "vision checkpoint not found: /nope/r101.pth",
        ),
        (
            ["--detector", "none", "--detector-ckpt", "/f.pth"],
            "--detector-ckpt is given, but --detector none runs no detector; drop one",
        ),
        (["--data-root", "/r"], "--data-root goes with --dataset; with --data-dir, leave it out"),
        (["--dataset", "twitter2015"], "give either --data-dir or --dataset (with --data-root), not both"),
    ],
    ids=lambda value: value[0] if isinstance(value, list) else None,
)
def test_extract_errors_name_the_flags(tmp_path, args, message):
    out = tmp_path / "cache"
    line = user_error("extract-features", "--data-dir", tmp_path, "--out", out, *args)
    assert line == f"Error: {message}"
    assert not out.exists()


def test_data_options_errors_name_the_flags(tmp_path):
    line = user_error("train-from-cache", "--text-only", "--out", tmp_path / "run")
    assert line == "Error: give --data-dir, or --dataset with --data-root"
    # A dotted --set key keeps its own spelling (train-from-cache has no --batch-size flag anyway).
    line = user_error("train-from-cache", "--text-only", "--data-dir", tmp_path, "--set", "train.batch_size=0",
                      "--out", tmp_path / "run")  # fmt: skip
    assert line == "Error: train.batch_size must be >= 1, got 0"


@pytest.mark.parametrize(
    "args",
    [[], ["--clip", "tiny-clip"], ["--detector", "tiny-frcnn"]],
    ids=["neither", "clip-only", "detector-only"],
)
def test_real_dataset_refuses_the_untrained_defaults(tmp_path, args):
    out = tmp_path / "cache"
    line = user_error(
        "extract-features", "--dataset", "twitter2015", "--data-root", tmp_path, "--out", out, *args
    )
    unset = " and ".join(flag for flag in ("--clip", "--detector") if flag not in args)
    assert line.startswith(
        f"Error: --dataset twitter2015 is real data: give {unset} explicitly (e.g. --clip "
    )
    assert line.endswith(
        "untrained random presets whose tokens carry no image content (name them to use them anyway)"
    )
    assert not out.exists()


def test_missing_model_files_are_reported_before_any_model_loads(data_folder, tmp_path, monkeypatch):
    import mner.extract.run

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(mner.extract.run, "load_vision", never)
    monkeypatch.setattr(mner.extract.run, "build_detector", never)
    base = ["extract-features", "--data-dir", data_folder.data_dir, "--out", tmp_path / "cache"]
    line = user_error(*base, "--clip", tmp_path / "no-clip")
    assert line == (
        f"Error: CLIP model folder not found or has no config.json: {tmp_path / 'no-clip'} "
        "(give a local Hugging Face CLIP folder or 'tiny-clip')"
    )
    ckpt = tmp_path / "no.pt"
    line = user_error(*base, "--detector", "fasterrcnn_mobilenet_v3_large_320_fpn", "--detector-ckpt", ckpt)
    assert line == f"Error: detector checkpoint not found: {ckpt}"
    assert not (tmp_path / "cache").exists()


def test_a_bad_detector_checkpoint_is_reported_before_clip_loads(data_folder, tmp_path, monkeypatch):
    import mner.extract.run

    def never(*args, **kwargs):
        raise AssertionError("CLIP was loaded before the detector checkpoint was read")

    monkeypatch.setattr(mner.extract.run, "load_vision", never)
    ckpt = tmp_path / "frcnn.pt"
    ckpt.write_text("not a checkpoint\n")
    result = invoke(
        "extract-features", "--data-dir", data_folder.data_dir, "--out", tmp_path / "cache", "--device", "cpu",
        "--detector", "fasterrcnn_mobilenet_v3_large_320_fpn", "--detector-ckpt", ckpt,
    )  # fmt: skip
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    # One line: torch's many lines of advice about weights_only are cut to the first.
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        f"Error: detector checkpoint {ckpt} is not a torchvision state_dict file readable "
    )


# Each case runs `mner ...` in a fresh interpreter and reports whether torch got imported.
NO_TORCH = """
import sys
from mner.cli import main
try:
    main(sys.argv[1:])
except SystemExit as done:
    print("torch imported:", "torch" in sys.modules, "exit:", done.code)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [
        ["extract-features", "--data-dir", "/nonexistent", "--out", "OUT"],
        ["extract-features", "--data-dir", "DATA", "--clip", "/nonexistent", "--out", "OUT"],
        ["extract-features", "--data-dir", "DATA", "--device", "gpu", "--out", "OUT"],
        ["extract-features", "--dataset", "twitter2015", "--data-root", "DATA", "--out", "OUT"],
        ["train-from-cache", "--text-only", "--data-dir", "/nonexistent", "--out", "OUT"],
        ["ablate", "--exp", "full", "--data-dir", "/nonexistent", "--out", "OUT"],
    ],
    ids=lambda args: " ".join(args[:3]),
)
def test_argument_errors_come_before_torch_is_imported(tmp_path, args):
    """`--data-dir /nonexistent` used to wait ~9 s for torch before saying so; now under a second."""
    argv = [str(tmp_path / "out") if a == "OUT" else str(tmp_path) if a == "DATA" else a for a in args]
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.strip() == "torch imported: False exit: 1", done.stdout + done.stderr
    assert done.stderr.startswith("Error: ")


def test_ablate_list_needs_no_folder_and_a_run_needs_out():
    listed = ok("ablate", "--list").stdout.splitlines()
    assert [line.split()[0] for line in listed] == list(ABLATIONS)
    missing = CliRunner().invoke(main, ["ablate", "--exp", "full"])
    assert missing.exit_code == 2 and "Missing option '--out' (the ablation folder)." in missing.output


def test_models_lists_every_model_file_with_its_seed_and_what_it_adds():
    from mner import configs

    names = sorted(path.stem for path in configs.path("models").glob("*.toml"))
    lines = ok("models").output.splitlines()
    assert lines[0].split() == ["name", "seed", "adds"]
    assert [line.split()[0] for line in lines[1:]] == names
    for line, name in zip(lines[1:], names):
        # The file's first two comment lines, read here on their own: "# seed: ...", "# adds: ...".
        first, second = configs.path("models", f"{name}.toml").read_text(encoding="utf-8").splitlines()[:2]
        seed = first.removeprefix("#").strip().removeprefix("seed:").strip()
        adds = second.removeprefix("#").strip().removeprefix("adds:").strip()
        assert line.startswith(f"{name} ") and f"  {seed}  " in line and line.endswith(f"  {adds}")
    afdvqf = next(line for line in lines if line.startswith("afdvqf "))
    assert "001 AFDVQF" in afdvqf and "adaptive fusion (two learnable scalar weights)" in afdvqf


def test_an_unknown_model_is_a_clean_error_listing_the_models(tmp_path):
    from mner.train.engine.config import model_names

    data_dir, _ = make_data(tmp_path)
    line = user_error(
        "train-from-cache", "--text-only", "--data-dir", data_dir, "--model", "nope", "--out", tmp_path / "r"
    )
    assert line == f"Error: model.name must be one of {', '.join(model_names())}; got 'nope'"


@pytest.mark.parametrize("command", ["train-from-cache", "train-classifier"])
def test_threads_option_reaches_the_config(command, tmp_path, monkeypatch):
    import mner.train.engine.classify
    import mner.train.engine.loop

    seen = []
    monkeypatch.setattr(
        mner.train.engine.loop, "train_from_cache", lambda cfg: seen.append(cfg.train.threads) or "r"
    )
    monkeypatch.setattr(
        mner.train.engine.classify, "train_classifier", lambda cfg: seen.append(cfg.classifier.threads) or "r"
    )
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.txt").write_text(
        "IMGID:1\nParis\tB-LOC\n" if command == "train-from-cache" else "guid,tag\n1,positive\n"
    )
    args = [command, "--data-dir", str(data), "--out", str(tmp_path / "run"), "--threads", "1"]
    args += ["--text-only"] if command == "train-from-cache" else ["--mode", "text"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert seen == [1]
    assert CliRunner().invoke(main, [*args[:-3], "--threads", "-1"]).exit_code == 2


@pytest.mark.parametrize(
    "error, message",
    [
        (
            PermissionError(1, "Operation not permitted", "RUN/metrics.jsonl.tmp", None, "RUN/metrics.jsonl"),
            "Error: cannot write or read RUN/metrics.jsonl: Operation not permitted; check its permissions and "
            "attributes (chattr -i)\n",
        ),
        (
            OSError(28, "No space left on device", "RUN/checkpoint/model.safetensors"),
            "Error: no space left on the device of RUN/checkpoint/model.safetensors: free some space and run the "
            "same command again (what was finished is kept; a training run continues with --resume)\n",
        ),
    ],
)
def test_a_file_the_command_cannot_write_is_one_line_not_a_traceback(tmp_path, monkeypatch, error, message):
    """An immutable metrics.jsonl at --resume, a full disk: the CLI's error net words every OSError."""
    import mner.train.engine.loop

    def fails(cfg):
        raise error

    monkeypatch.setattr(mner.train.engine.loop, "train_from_cache", fails)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid"):
        (data / f"{split}.txt").write_text("IMGID:a\nword O\n\n")
    result = invoke(
        "train-from-cache", "--data-dir", data, "--text-only", "--out", tmp_path / "run", "--resume"
    )
    assert result.exit_code == 1 and result.output == message
