"""run_ablation: experiments x seeds from one cache, resumable, and a mean ± std table checked by hand."""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from pathlib import Path

import pandas as pd
import pytest

import mner.train.engine.classify as classify
import mner.train.engine.loop as loop
import mner.train.report.ablation_config as ablation_config
import mner.train.report.ablation_rules as ablation_rules
import mner.train.report.ablation_tables as ablation_tables
from mner.cache.classification import ClassDataConfig
from mner.cache.datasets import DataConfig
from mner.demo.classification import make_mvsa_demo
from mner.train.engine.config_files import load_run_config
from mner.train.report.ablate import run_ablation
from mner.train.report.ablation_config import ABLATIONS, AblationConfig, experiment_file
from mner.train.report.class_ablation import ClassAblationConfig
from tests.train.factories import make_cache
from tests.train.run_factories import (  # noqa: F401 (single_thread: autouse fixture)
    FAST_LR,
    held_by_another_process,
    make_data,
    single_thread,
    tree,
)

# Small, fast runs for every experiment.
OVERRIDES = ["train.batch_size=4", "train.device=cpu", "model.max_length=32"] + [
    f"train.{k}={v}" for k, v in FAST_LR.items()
]


# The model an ablation is measured on, where it is not the base's (afdvqf).
ABLATION_MODEL = {"no_slot_type": "afner", "no_resampler": "mango", "no_preserve": "mango"}


# What each registry experiment's name says it does to the model it is measured on: (the one ModelConfig
# field it changes, whether that part is on in the base and off (or cut to one layer) in the arm).
SAYS = {
    "no_align": ("alignment_loss_weight", lambda base, arm: base > 0 and arm == 0),
    "no_adapt": ("adaptive_gate", lambda base, arm: base is True and arm is False),
    "no_region": ("use_regions", lambda base, arm: base is True and arm is False),
    "no_patch": ("use_patches", lambda base, arm: base is True and arm is False),
    "text_only": ("text_only", lambda base, arm: base is False and arm is True),
    "qfnet1": ("qfnet_layers", lambda base, arm: base > 1 and arm == 1),
    "no_slot_type": ("typed_queries", lambda base, arm: base is True and arm is False),
    "no_resampler": ("resampler", lambda base, arm: base is True and arm is False),
    "no_preserve": ("preserve_lambda", lambda base, arm: base > 0 and arm == 0),
}


@pytest.mark.parametrize("name", [name for name in ABLATIONS if name != "full"])
def test_each_registry_experiment_turns_off_what_its_name_says_and_nothing_else(name):
    assert experiment_file("full") is None
    path = experiment_file(name)
    assert path.read_text().startswith(f"# {name}: ")
    base_model, base_train = load_run_config(model=ABLATION_MODEL.get(name))
    model_cfg, train_cfg = load_run_config(config_file=path, model=ABLATION_MODEL.get(name))
    assert train_cfg == base_train
    changed = [
        f.name
        for f in dataclasses.fields(model_cfg)
        if getattr(model_cfg, f.name) != getattr(base_model, f.name)
    ]
    field, says = SAYS[name]
    assert changed == [field]
    assert says(getattr(base_model, field), getattr(model_cfg, field)), (
        f"{name}: {field} {getattr(base_model, field)!r} -> {getattr(model_cfg, field)!r}"
    )


def test_no_resampler_over_the_base_fails_instead_of_doing_nothing():
    message = (
        "model.resampler = false removes the resampler of model.fusion = 'mango', but model.fusion is 'qgf'"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        load_run_config(config_file=experiment_file("no_resampler"))


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ablate")
    data_dir, posts = make_data(tmp)
    cache_dir = make_cache(tmp, posts)
    custom = tmp / "two_slots.toml"
    custom.write_text("# two_slots: two query slots per type\n[model]\nslots_per_type = 2\n")
    cfg = AblationConfig(
        cache_dir=str(cache_dir),
        data=DataConfig(data_dir=str(data_dir)),
        text_encoder="tiny-bert",
        experiments=["full", "text_only", str(custom)],
        seeds=2,
        out_dir=str(tmp / "out"),
        overrides=OVERRIDES,
        epochs=1,
    )
    return cfg, run_ablation(cfg)


def _results(cfg: AblationConfig, name: str, seed: int) -> dict:
    return json.loads((Path(cfg.out_dir) / name / f"seed{seed}" / "results.json").read_text())


@pytest.mark.slow
def test_runs_land_in_experiment_seed_folders_with_their_config(ablation):
    cfg, md_path = ablation
    base_slots = load_run_config()[0].slots_per_type
    assert base_slots != 2
    assert md_path.name == "ablation.md"
    for name in ("full", "text_only", "two_slots"):
        for seed in (1, 2):
            record = json.loads((md_path.parent / name / f"seed{seed}" / "config.json").read_text())
            assert record["train"]["seed"] == seed and record["train"]["epochs"] == 1
            assert record["model"]["text_encoder"] == "tiny-bert"
            assert record["model"]["text_only"] == (name == "text_only")
            # the model file's own slots (load_run_config: the afdvqf default), but where the experiment sets 2
            assert record["model"]["slots_per_type"] == (2 if name == "two_slots" else base_slots)
            assert (record["cache"] is None) == (name == "text_only")


@pytest.mark.slow
def test_csv_has_one_row_per_run_with_results_in_percent(ablation):
    cfg, md_path = ablation
    table = pd.read_csv(md_path.parent / "ablation.csv")
    assert list(zip(table["experiment"], table["seed"])) == [
        (name, seed) for name in ("full", "text_only", "two_slots") for seed in (1, 2)
    ]
    for row in table.itertuples():
        results = _results(cfg, row.experiment, row.seed)
        assert row.split == "test"
        assert row.f1 == pytest.approx(100 * results["test"]["micro"]["f1"])
        assert row.precision == pytest.approx(100 * results["test"]["micro"]["precision"])
        for entity_type in ("LOC", "PER"):
            type_scores = results["test"]["per_type"][entity_type]
            for prefix, metric in (("p", "precision"), ("r", "recall"), ("f1", "f1")):
                column = getattr(row, f"{prefix}_{entity_type}")
                assert column == pytest.approx(100 * type_scores[metric])
        assert row.dev_f1 == pytest.approx(100 * results["valid"]["micro"]["f1"])


@pytest.mark.slow
def test_markdown_gives_mean_and_sample_std_computed_by_hand(ablation):
    cfg, md_path = ablation
    lines = md_path.read_text().splitlines()
    assert lines[2] == "| experiment | seeds | P | R | F1 | LOC P | LOC R | LOC F1 | PER P | PER R | PER F1 |"
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[4:7]}
    assert list(rows) == ["full", "text_only", "two_slots"]
    for name, line in rows.items():
        runs = [_results(cfg, name, seed)["test"] for seed in (1, 2)]
        values = [[100 * run["micro"][metric] for run in runs] for metric in ("precision", "recall", "f1")]
        values += [
            [100 * run["per_type"][entity_type][metric] for run in runs]
            for entity_type in ("LOC", "PER")
            for metric in ("precision", "recall", "f1")
        ]
        cells = [f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" for v in values]
        assert line == "| " + " | ".join([name, "2", *cells]) + " |"


@pytest.mark.slow
def test_markdown_tests_each_experiment_against_the_first(ablation):
    cfg, md_path = ablation
    text = md_path.read_text()
    section = text[text.index("paired bootstrap over posts against full on test") :].splitlines()
    assert section[0].startswith("paired bootstrap over posts against full on test: 1000 resamples (seed 0)")
    assert section[2] == "| experiment | seeds | dF1 | 95% CI | p |"
    for line, name in zip(section[4:], ("text_only", "two_slots")):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        # dF1: the mean over seeds of the experiment's test F1 minus full's, from their results.json
        f1 = {
            arm: [_results(cfg, arm, seed)["test"]["micro"]["f1"] for seed in (1, 2)]
            for arm in ("full", name)
        }
        delta = 100 * (statistics.mean(f1[name]) - statistics.mean(f1["full"]))
        assert cells[:2] == [name, "2"] and float(cells[2]) == pytest.approx(delta, abs=0.006)
        assert 0 < float(cells[4]) <= 1


def test_significance_markdown_on_identical_and_different_arms(tmp_path):
    gold = [["B-PER", "O"], ["B-LOC", "O"], ["O", "O"]]
    preds = {"base": [["B-PER", "O"], ["O", "O"], ["O", "O"]], "same": None, "better": gold}
    preds["same"] = preds["base"]
    rows = []
    for name, pred in preds.items():
        run_dir = tmp_path / name / "seed1"
        run_dir.mkdir(parents=True)
        lines = [
            f"w{j} {g} {p}\n" for tags, guess in zip(gold, pred) for j, (g, p) in enumerate(zip(tags, guess))
        ]
        (run_dir / "pred_test.conll").write_text("".join(lines).replace("w1 O O\n", "w1 O O\n\n"))
        rows.append({"experiment": name, "seed": 1, "split": "test", "run_dir": str(run_dir)})
    lines = ablation_tables.significance_markdown(pd.DataFrame(rows), resamples=200).splitlines()
    assert lines[4] == "| same | 1 | +0.00 | [+0.00,+0.00] | 1.000 |"
    better = [cell.strip() for cell in lines[5].strip("|").split("|")]
    # base finds 1 of 2 entities (F1 2/3), better both (F1 1): +33.33 points
    assert better[:3] == ["better", "1", "+33.33"]


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_redoes_only_the_missing_one(ablation, monkeypatch):
    cfg, md_path = ablation
    before = md_path.read_text()
    trained = []
    real = loop.train_from_cache

    def counting(run_cfg):
        trained.append(run_cfg.out_dir)
        return real(run_cfg)

    monkeypatch.setattr(loop, "train_from_cache", counting)
    run_ablation(cfg)
    assert trained == []
    assert md_path.read_text() == before

    killed = md_path.parent / "text_only" / "seed2"
    (killed / "results.json").unlink()
    run_ablation(cfg)
    assert trained == [str(killed)]
    # Same seed, same config: the redone run reproduces its numbers, so the table is unchanged.
    assert md_path.read_text() == before


def test_single_seed_shows_the_mean_only():
    table = pd.DataFrame(
        [
            {
                "experiment": "full",
                "seed": 1,
                "split": "valid",
                "precision": 50.0,
                "recall": 25.0,
                "f1": 100 / 3,
                "p_PER": 60.0,
                "r_PER": 30.0,
                "f1_PER": 40.0,
            }
        ]
    )
    assert (
        ablation_tables.summary_markdown(table).splitlines()[-1]
        == "| full | 1 | 50.00 | 25.00 | 33.33 | 60.00 | 30.00 | 40.00 |"
    )


def _config(**changes) -> AblationConfig:
    fields = {
        "cache_dir": None,
        "data": DataConfig(data_dir="d"),
        "text_encoder": None,
        "experiments": ["full"],
        "seeds": 1,
        "out_dir": "o",
    }
    return AblationConfig(**{**fields, **changes})


def test_config_validation_and_seeds():
    assert _config(seeds=3).seed_list() == [1, 2, 3]
    assert _config(seeds=[7, 0]).seed_list() == [7, 0]
    with pytest.raises(
        ValueError, match=re.escape("unknown experiment 'no_such': use one of full, no_align")
    ):
        _config(experiments=["no_such"])
    with pytest.raises(ValueError, match="no experiments given"):
        _config(experiments=[])
    with pytest.raises(ValueError, match=re.escape("experiments ['qfnet1'] are given more than once")):
        _config(experiments=["qfnet1", str(experiment_file("qfnet1"))])
    with pytest.raises(ValueError, match="seeds must be at least 1, got 0"):
        _config(seeds=0)
    with pytest.raises(
        ValueError,
        match=re.escape("seeds must be a non-empty list of distinct non-negative integers, got [1, 1]"),
    ):
        _config(seeds=[1, 1])
    with pytest.raises(ValueError, match="epochs must be a positive integer or None, got 0"):
        _config(epochs=0)
    with pytest.raises(ValueError, match=re.escape("data must be a DataConfig, got {'data_dir': 'd'}")):
        _config(data={"data_dir": "d"})


def test_override_of_a_key_the_experiment_sets_is_refused(tmp_path):
    cfg = _config(experiments=["qfnet1"], overrides=["model.qfnet_layers=3"], out_dir=str(tmp_path))
    expected = f"override 'model.qfnet_layers=3' sets model.qfnet_layers, which experiment qfnet1 ({experiment_file('qfnet1')}) changes"
    with pytest.raises(ValueError, match=re.escape(expected)):
        run_ablation(cfg)


def test_an_experiment_that_changes_nothing_is_refused(tmp_path):
    same = tmp_path / "same_layers.toml"
    same.write_text("# same_layers: the base's layer count again\n[model]\nqfnet_layers = 2\n")
    cfg = _config(experiments=["full", str(same)], out_dir=str(tmp_path / "out"))
    expected = (
        f"experiment same_layers ({same}) changes nothing the model uses: the base config with these "
        "overrides already"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        run_ablation(cfg)
    assert not (tmp_path / "out").exists()


def test_no_adapt_cannot_be_silent_over_a_fusion_without_a_gate(tmp_path):
    # A fusion without a gate would ignore adaptive_gate, and no_adapt would silently train the base.
    cfg = _config(experiments=["no_adapt"], overrides=["model.fusion=gated"], out_dir=str(tmp_path))
    with pytest.raises(
        ValueError, match=re.escape("model.adaptive_gate = true gates query-guided fusion only")
    ):
        run_ablation(cfg)


def test_a_folder_of_other_files_is_refused_untouched(tmp_path):
    from click.testing import CliRunner

    from mner.cli import main

    out = tmp_path / "mine"
    (out / "full" / "seed1").mkdir(parents=True)
    (out / "full" / "seed1" / "results.json").write_text("the user's results")
    (out / "ablation.md").write_text("the user's table")
    before = tree(out)
    expected = (
        f"--out {out} is not empty and is not one of our ablation folders (no ablation.json with experiments, "
        "seeds, overrides, epochs, cache_dir, data); nothing in it was touched — choose a new or empty folder"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        run_ablation(_config(experiments=["text_only"], out_dir=str(out)))
    data = tmp_path / "data"
    data.mkdir()  # an existing data folder: the CLI checks it before the --out folder
    result = CliRunner().invoke(
        main, ["ablate", "--data-dir", str(data), "--exp", "text_only", "--out", str(out)]
    )
    assert result.exit_code != 0 and f"--out {out} is not empty" in result.output
    assert tree(out) == before


def test_a_classification_folder_is_ablated_by_classifier_diffs_and_refuses_tagging_options(tmp_path):
    """`mner ablate` picks the task by the data folder; a classification folder's refusal of the tagging
    options names them as flags, before anything is written."""
    from click.testing import CliRunner

    from mner.cli import main

    data = make_mvsa_demo(tmp_path / "mvsa", seed=0, n=12)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["ablate", "--data-dir", str(data), "--exp", "mode=text", "--grid", "x.y=1,2", "--out", str(out)],
    )
    assert result.exit_code == 1 and result.output.strip().splitlines()[-1] == (
        "Error: a classification folder's ablation takes --exp KEY=VALUE diffs of the classifier (--exp "
        "mode=text --exp head=cnn); --grid, --model, --dataset, --image-dir and --columns apply to tagging runs"
    )
    assert not out.exists()


def test_a_second_ablation_into_a_folder_being_written_is_refused(tmp_path):
    out = tmp_path / "out"
    with held_by_another_process(out, "mner ablate") as pid:
        with pytest.raises(ValueError) as refused:
            run_ablation(_config(experiments=["text_only"], out_dir=str(out)))
        assert sorted(p.name for p in out.iterdir()) == ["mner.lock"]
    assert str(refused.value) == (
        f"{out} is being written by another `mner ablate` (pid {pid}); wait for it to finish, "
        "or give another --out folder"
    )


def test_a_seed_folder_that_is_not_a_run_of_ours_is_refused_not_skipped(tmp_path):
    data_dir, _ = make_data(tmp_path)
    cfg = _config(
        data=DataConfig(data_dir=str(data_dir)), experiments=["text_only"], out_dir=str(tmp_path / "out")
    )
    seed = tmp_path / "out" / "text_only" / "seed1"
    seed.mkdir(parents=True)
    (seed / "results.json").write_text('{"the user": 1}')
    (tmp_path / "out" / "ablation.json").write_text(json.dumps(ablation_config._record(cfg)))
    with pytest.raises(
        ValueError, match=re.escape(f"--out {seed} is not empty and is not one of our run folders")
    ):
        run_ablation(cfg)
    assert (seed / "results.json").read_text() == '{"the user": 1}'


def test_an_ablation_failing_before_any_training_leaves_no_folder(tmp_path):
    data_dir, _ = make_data(tmp_path)
    out = tmp_path / "out"
    # tiny-bert is 32 wide: 3 heads fail when the first run builds its model.
    cfg = _config(
        data=DataConfig(data_dir=str(data_dir)),
        text_encoder="tiny-bert",
        experiments=["text_only"],
        out_dir=str(out),
        overrides=[*OVERRIDES, "model.qfnet_heads=3"],
    )
    with pytest.raises(ValueError, match="is not divisible by model.qfnet_heads=3"):
        run_ablation(cfg)
    assert not out.exists()


# ------------------------------------------------------------------------------ --list, all, --grid


def test_list_gives_every_experiment_its_diff_from_the_file():
    lines = ablation_config.list_experiments().splitlines()
    assert [line.split()[0] for line in lines] == list(ABLATIONS)
    for line in lines[1:]:
        name = line.split()[0]
        table = ablation_config.configs.load_toml(experiment_file(name))
        for section, values in table.items():
            for key, value in values.items():
                shown = str(value).lower() if isinstance(value, bool) else str(value)
                assert f"{section}.{key} = {shown}" in line, name


def test_all_names_every_registry_experiment_that_changes_the_model():
    mango_only = ("no_resampler", "no_preserve")  # not even valid without the mango fusion
    expected = [n for n in ABLATIONS if n not in mango_only]
    assert _config(experiments=["all"]).experiments == expected
    # afner's original computes what afdvqf's does: the same experiments apply
    assert _config(experiments=["all"], model="afner").experiments == expected
    mango = _config(experiments=["all"], model="mango").experiments
    assert set(mango_only) <= set(mango) and "no_slot_type" not in mango
    assert "text_only" in mango  # its file's vision blocks give way to text_only, not refuse it
    with pytest.raises(ValueError, match=r"^experiment 'all' already names every experiment; give it alone$"):
        _config(experiments=["all", "full"])


def test_grid_points_are_the_cartesian_product_in_order():
    assert ablation_config.grid_points([]) == [()]
    assert ablation_config.grid_points(["model.qfnet_layers=1,2", "train.lr_fusion=1e-4, 3e-4"]) == [
        ("model.qfnet_layers=1", "train.lr_fusion=1e-4"),
        ("model.qfnet_layers=1", "train.lr_fusion=3e-4"),
        ("model.qfnet_layers=2", "train.lr_fusion=1e-4"),
        ("model.qfnet_layers=2", "train.lr_fusion=3e-4"),
    ]
    cfg = _config(experiments=["full", "no_region"], grid=["model.qfnet_layers=1,2"])
    assert [arm.name for arm in cfg.arms()] == [
        "model.qfnet_layers=1",
        "model.qfnet_layers=2",
        "no_region,model.qfnet_layers=1",
        "no_region,model.qfnet_layers=2",
    ]
    assert _config(experiments=[], grid=["model.dropout=0.2"]).experiments == ["full"]


@pytest.mark.parametrize(
    "grid, message",
    [
        (
            ["qfnet_layers=1,2"],
            "--grid 'qfnet_layers=1,2' must be section.key=v1,v2,... (e.g. model.qfnet_layers=1,2)",
        ),
        (["model.qfnet_layers"], "--grid 'model.qfnet_layers' must be section.key=v1,v2,..."),
        (
            ["model.dropout=0.1", "model.dropout=0.2"],
            "--grid gives model.dropout twice; give all its values in one",
        ),
        (
            ["model.dropout=0.1,,0.2"],
            "--grid 'model.dropout=0.1,,0.2': its values must be non-empty and distinct",
        ),
        (["model.dropout=0.1,0.1"], "its values must be non-empty and distinct"),
        (
            ["train.lr_encoder=1e-4,0.0001"],
            "--grid 'train.lr_encoder=1e-4,0.0001': 1e-4 and 0.0001 are the same value; give it once",
        ),
    ],
)
def test_malformed_grids_are_refused(grid, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _config(grid=grid)


def test_grid_conflicts_and_bad_values_fail_before_any_run(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(loop, "train_from_cache", lambda run_cfg: trained.append(run_cfg))
    data_dir, _ = make_data(tmp_path)
    base = {"data": DataConfig(data_dir=str(data_dir)), "out_dir": str(tmp_path / "out")}
    with pytest.raises(
        ValueError, match=r"^--set 'model.dropout=0.3' sets a key the --grid sweeps; drop one"
    ):
        run_ablation(_config(**base, grid=["model.dropout=0.1,0.2"], overrides=["model.dropout=0.3"]))
    with pytest.raises(ValueError, match="which experiment no_region,model.use_regions=true"):
        run_ablation(_config(**base, experiments=["no_region"], grid=["model.use_regions=true,false"]))
    with pytest.raises(ValueError, match=r"model.qfnet_layers must be >= 1, got 0"):
        run_ablation(_config(**base, grid=["model.qfnet_layers=2,0"]))
    assert trained == [] and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_killed_grid_resumes_where_it_stopped(tmp_path, monkeypatch):
    data_dir, posts = make_data(tmp_path)
    cfg = AblationConfig(
        cache_dir=str(make_cache(tmp_path, posts)),
        data=DataConfig(data_dir=str(data_dir)),
        text_encoder="tiny-bert",
        experiments=[],
        grid=["model.qfnet_layers=1,2"],
        seeds=1,
        out_dir=str(tmp_path / "sweep"),
        overrides=OVERRIDES,
        epochs=1,
        bootstrap=0,
    )
    real, trained = loop.train_from_cache, []

    def killed_on_the_second_arm(run_cfg):
        if run_cfg.model.qfnet_layers == 2:
            raise KeyboardInterrupt  # the kill, after the first arm finished
        trained.append(run_cfg.out_dir)
        return real(run_cfg)

    monkeypatch.setattr(loop, "train_from_cache", killed_on_the_second_arm)
    with pytest.raises(KeyboardInterrupt):
        run_ablation(cfg)
    first = tmp_path / "sweep" / "model.qfnet_layers=1" / "seed1"
    assert trained == [str(first)] and (first / "results.json").is_file()

    def counting(run_cfg):
        trained.append(run_cfg.out_dir)
        return real(run_cfg)

    monkeypatch.setattr(loop, "train_from_cache", counting)
    md_path = run_ablation(cfg)
    second = tmp_path / "sweep" / "model.qfnet_layers=2" / "seed1"
    assert trained == [str(first), str(second)]  # the finished arm was not trained again
    assert json.loads((second / "config.json").read_text())["model"]["qfnet_layers"] == 2
    rows = [line.split(" | ")[0].lstrip("| ") for line in md_path.read_text().splitlines()[4:6]]
    assert rows == ["model.qfnet_layers=1", "model.qfnet_layers=2"]
    assert json.loads((tmp_path / "sweep" / "ablation.json").read_text())["grid"] == [
        "model.qfnet_layers=1,2"
    ]


# ------------------------------------------------------------------------------------------ model zoo


@pytest.mark.slow  # trains: an integration test
def test_model_arms_and_a_models_own_ablation_in_one_table(tmp_path):
    """`model=NAME` arms train each model as its file gives it (arm named NAME); with --model afner,
    `full` is afner and no_slot_type is afner without its loss. ablation.json records the model."""
    data_dir, posts = make_data(tmp_path)
    cache_dir = make_cache(tmp_path, posts)
    cfg = AblationConfig(
        cache_dir=str(cache_dir),
        data=DataConfig(data_dir=str(data_dir)),
        text_encoder="tiny-bert",
        experiments=["full", "no_slot_type", "model=bert-softmax", "model=bert-crf"],
        seeds=1,
        out_dir=str(tmp_path / "out"),
        overrides=OVERRIDES + ["model.qfnet_heads=2"],
        epochs=1,
        model="afner",
    )
    md_path = run_ablation(cfg)
    expected = {
        "full": ("afner", True, "crf"),
        "no_slot_type": ("afner", False, "crf"),
        "bert-softmax": ("bert-softmax", True, "softmax"),
        "bert-crf": ("bert-crf", True, "crf"),
    }
    for arm, (name, typed, head) in expected.items():
        record = json.loads((md_path.parent / arm / "seed1" / "config.json").read_text())
        model = record["model"]
        assert (model["name"], model["typed_queries"], model["head"]) == (name, typed, head), arm
    assert json.loads((md_path.parent / "ablation.json").read_text())["model"] == "afner"
    rows = [line.split(" | ")[0].lstrip("| ") for line in md_path.read_text().splitlines()[4:8]]
    assert rows == ["full", "no_slot_type", "bert-softmax", "bert-crf"]


def test_model_arm_and_model_errors(tmp_path):
    from mner.train.engine.config import model_names

    names = ", ".join(model_names())
    with pytest.raises(ValueError, match=re.escape(f"model.name must be one of {names}; got 'nope'")):
        _config(experiments=["model=nope"])
    with pytest.raises(ValueError, match=re.escape(f"model.name must be one of {names}; got 'nope'")):
        _config(model="nope")
    assert (
        ablation_config.experiment_name("model=afner") == "afner"
        and ablation_config.experiment_file("model=afner") is None
    )
    # no_align over bert-crf (no image, no alignment loss) would retrain it: refused.
    cfg = _config(experiments=["no_align"], model="bert-crf", out_dir=str(tmp_path / "out"))
    message = f"experiment no_align ({experiment_file('no_align')}) changes nothing"
    with pytest.raises(ValueError, match=re.escape(message)):
        run_ablation(cfg)


# ------------------------------------------------------------------ re-runs, seeds, epochs, no-op arms


class Trained(Exception):
    """Raised by a stand-in for training: the ablation got as far as its first run."""


def _stop_at_training(monkeypatch) -> list:
    started = []

    def train(run_cfg):
        started.append(run_cfg)
        raise Trained

    monkeypatch.setattr(loop, "train_from_cache", train)
    return started


def test_a_rerun_with_other_settings_is_refused_naming_the_difference(tmp_path, monkeypatch):
    data_dir, _ = make_data(tmp_path)
    out = tmp_path / "out"
    base = dict(
        data=DataConfig(data_dir=str(data_dir)),
        cache_dir=str(tmp_path / "cache"),
        experiments=["text_only"],
        out_dir=str(out),
    )
    out.mkdir()
    (out / "ablation.json").write_text(json.dumps(ablation_config._record(_config(**base, epochs=1))))
    (out / "text_only").mkdir()  # an earlier arm's folder: the re-run must not be told it is ours to skip
    for changes, difference in (
        (dict(epochs=3), "arms.text_only.train.epochs 1 -> 3"),
        (dict(epochs=1, overrides=["train.lr_fusion=0.5"]), "arms.text_only.train.lr_fusion 0.0004 -> 0.5"),
        (dict(epochs=1, seeds=2), "seeds [1] -> [1, 2]"),
        (dict(epochs=1, experiments=["text_only", "qfnet1"]), "arms.qfnet1 null -> "),
    ):
        with pytest.raises(
            ValueError, match=rf"^{re.escape(f'the ablation in {out} was started with other settings: ')}"
        ):
            run_ablation(_config(**{**base, **changes}))
        with pytest.raises(ValueError, match=re.escape(difference)):
            run_ablation(_config(**{**base, **changes}))
    # The same settings (a device is how a run is carried out, not what it trains) continue it.
    started = _stop_at_training(monkeypatch)
    with pytest.raises(Trained):
        run_ablation(_config(**base, epochs=1, overrides=["train.device=cpu"]))
    assert [run.out_dir for run in started] == [str(out / "text_only" / "seed1")]


def test_the_seed_and_the_epochs_are_not_overridden_in_silence(tmp_path, monkeypatch):
    data_dir, _ = make_data(tmp_path)
    base = dict(data=DataConfig(data_dir=str(data_dir)), out_dir=str(tmp_path / "out"))
    for changes, message in (
        (
            dict(grid=["train.seed=5,7"]),
            "--grid train.seed=5,7 sets train.seed, but the seed comes from --seeds",
        ),
        (
            dict(overrides=["train.seed=9"]),
            "--set train.seed=9 sets train.seed, but the seed comes from --seeds",
        ),
        (
            dict(grid=["train.epochs=1,3"], epochs=2),
            "--grid train.epochs=1,3 sets train.epochs, and so does --epochs 2; drop one of them",
        ),
        (
            dict(overrides=["train.epochs=4"], epochs=2),
            "--set train.epochs=4 sets train.epochs, and so does --epochs 2; drop one of them",
        ),
    ):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            run_ablation(_config(**base, **changes))
    diff = tmp_path / "three.toml"
    diff.write_text("[train]\nepochs = 3\n")
    with pytest.raises(
        ValueError,
        match=re.escape(f"experiment three ({diff}) sets train.epochs, and so does --epochs 2; drop one"),
    ):
        run_ablation(_config(**base, experiments=[str(diff)], epochs=2))
    assert not (tmp_path / "out").exists()
    # Without --epochs the experiment's and the grid's epochs are what the runs train.
    started = _stop_at_training(monkeypatch)
    with pytest.raises(Trained):
        run_ablation(_config(**base, experiments=[str(diff)], overrides=["model.text_only=true"]))
    with pytest.raises(Trained):
        run_ablation(
            _config(
                **{**base, "out_dir": str(tmp_path / "grid")},
                grid=["train.epochs=4,5"],
                overrides=["model.text_only=true"],
            )
        )
    assert [run.train.epochs for run in started] == [3, 4]


def test_arms_that_train_the_same_model_are_left_out_or_refused(tmp_path):
    # bert-crf has no image: every registry experiment but full changes only what it does not use.
    assert _config(experiments=["all"], model="bert-crf").experiments == ["full"]
    data_dir, _ = make_data(tmp_path)
    base = dict(data=DataConfig(data_dir=str(data_dir)), out_dir=str(tmp_path / "out"))
    with pytest.raises(
        ValueError,
        match=re.escape(f"experiment no_align ({experiment_file('no_align')}) changes nothing the model"),
    ):
        run_ablation(_config(**base, experiments=["full", "no_align"], model="bert-crf"))
    # afner's original computes what afdvqf's does, at the same training settings.
    with pytest.raises(
        ValueError,
        match=re.escape("experiments 'afner' and 'afdvqf' would train the same model the same way"),
    ):
        run_ablation(
            _config(**base, cache_dir=str(tmp_path / "cache"), experiments=["model=afner", "model=afdvqf"])
        )
    assert not (tmp_path / "out").exists()


def test_arm_folders_stay_inside_the_ablation_folder(tmp_path, monkeypatch):
    assert ablation_rules.arm_folder("model.text_encoder=../../x") == "model.text_encoder=.._.._x"
    assert ablation_rules.arm_folder("..") == "__"
    with pytest.raises(ValueError, match=re.escape("experiments 'a/b' and 'a_b' would share the folder a_b")):
        ablation_rules.refuse_repeated_arms(["a/b", "a_b"])
    data_dir, _ = make_data(tmp_path)
    out = tmp_path / "deep" / "out"
    started = _stop_at_training(monkeypatch)
    cfg = _config(
        data=DataConfig(data_dir=str(data_dir)),
        experiments=["text_only"],
        grid=["model.text_encoder=../../../enc,tiny-bert"],
        out_dir=str(out),
    )
    with pytest.raises(Trained):
        run_ablation(cfg)
    assert started[0].out_dir == str(out / "text_only,model.text_encoder=.._.._.._enc" / "seed1")
    assert not out.exists() and not (tmp_path / "deep").exists()  # nothing was trained: nothing is left


# ------------------------------------------------------------------- a classification folder


@pytest.fixture(scope="module")
def mvsa(tmp_path_factory):
    return make_mvsa_demo(tmp_path_factory.mktemp("mvsa") / "mvsa", seed=0, n=24)


def _class_config(mvsa, out, **changes) -> ClassAblationConfig:
    fields = dict(
        data=ClassDataConfig(str(mvsa)),
        cache_dir=None,
        experiments=["mode=text"],
        out_dir=str(out),
        seeds=1,
        overrides=["classifier.text_encoder=tiny-bert"],
    )
    return ClassAblationConfig(**{**fields, **changes})


def _stop_at_classifier_training(monkeypatch) -> list:
    started = []

    def train(run_cfg):
        started.append(run_cfg)
        raise Trained

    monkeypatch.setattr(classify, "train_classifier", train)
    return started


def test_full_is_the_base_arm_and_all_or_a_tagging_name_is_refused(mvsa, tmp_path):
    assert _class_config(mvsa, tmp_path / "o", experiments=["full", "head=cnn"]).experiments == [
        "base",
        "head=cnn",
    ]
    for name in ("all", "no_align"):
        with pytest.raises(
            ValueError,
            match=rf"^{re.escape(f'experiment {name!r} is not a classifier diff')}.*are the tagging ablation's$",
        ):
            _class_config(mvsa, tmp_path / "o", experiments=[name])


def test_classifier_an_ablation_failing_before_any_training_leaves_no_folder(mvsa, tmp_path, monkeypatch):
    out = tmp_path / "deep" / "out"

    def fails(run_cfg):
        raise ValueError("the encoder folder is gone")

    monkeypatch.setattr(classify, "train_classifier", fails)
    with pytest.raises(ValueError, match="the encoder folder is gone"):
        run_ablation(_class_config(mvsa, out))
    assert not (tmp_path / "deep").exists()


def test_an_arm_naming_a_path_trains_inside_the_ablation_folder(mvsa, tmp_path, monkeypatch):
    out = tmp_path / "a" / "b" / "out"
    started = _stop_at_classifier_training(monkeypatch)
    with pytest.raises(Trained):
        run_ablation(
            _class_config(
                mvsa, out, experiments=["text_encoder=../../../x"], overrides=["classifier.mode=text"]
            )
        )
    assert started[0].out_dir == str(out / "text_encoder=.._.._.._x" / "seed1")
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # nothing was trained: nothing is left


def test_classifier_a_rerun_with_other_settings_is_refused_naming_the_difference(mvsa, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ablation.json").write_text(json.dumps(_class_config(mvsa, out, epochs=1).record()))
    for changes, difference in (
        (dict(epochs=3), "arms.mode=text.epochs 1 -> 3"),
        (
            dict(epochs=1, overrides=["classifier.text_encoder=minilm"]),
            'arms.mode=text.text_encoder "tiny-bert"',
        ),
        (dict(epochs=1, experiments=["mode=text", "mode=image"]), "arms.mode=image null -> "),
    ):
        with pytest.raises(
            ValueError,
            match=rf"^{re.escape(f'the classifier ablation in {out} was started with other settings: ')}.*"
            + re.escape(difference),
        ):
            run_ablation(_class_config(mvsa, out, **changes))
    started = _stop_at_classifier_training(monkeypatch)
    with pytest.raises(Trained):  # the same settings continue it; the device is not one of them
        run_ablation(
            _class_config(
                mvsa, out, epochs=1, overrides=["classifier.text_encoder=tiny-bert", "classifier.device=cpu"]
            )
        )
    assert [run.classifier.epochs for run in started] == [1]


def test_classifier_the_seed_and_the_epochs_are_not_overridden_in_silence(mvsa, tmp_path):
    for changes, message in (
        (
            dict(overrides=["classifier.seed=9"]),
            "--set classifier.seed=9 sets classifier.seed, but the seed comes from --seeds",
        ),
        (
            dict(experiments=["seed=3"]),
            "experiment 'seed=3' sets classifier.seed, but the seed comes from --seeds",
        ),
        (
            dict(experiments=["epochs=3"], epochs=2),
            "experiment 'epochs=3' sets classifier.epochs, and so does --epochs 2",
        ),
        (
            dict(overrides=["classifier.epochs=3"], epochs=2),
            "--set classifier.epochs=3 sets classifier.epochs, and so does --epochs 2",
        ),
    ):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            _class_config(mvsa, tmp_path / "o", **changes)
    assert (
        _class_config(mvsa, tmp_path / "o", experiments=["epochs=3"]).arm_config("epochs=3", seed=1).epochs
        == 3
    )


def test_arms_that_train_the_same_classifier_are_refused(mvsa, tmp_path):
    with pytest.raises(
        ValueError,
        match=re.escape("experiments 'base' and 'mode=both' would train the same model the same way"),
    ):
        run_ablation(_class_config(mvsa, tmp_path / "o", experiments=["base", "mode=both"], cache_dir="c"))
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ text states


def _record_builds_and_training(tmp_path, monkeypatch, train_module, train_name) -> list:
    """Events in order: ("build", split) for every text-state cache computed, ("train", run folder) for
    every run started (which then stops the ablation). The caches go to a root of the test's own: the
    data of make_data and the mvsa fixture are the same in every test, and so would their caches be."""
    import mner.train.engine.text_states as text_states

    monkeypatch.setenv("MNER_TEXT_CACHE", str(tmp_path / "text-states"))

    events, compute = [], text_states.compute_text_states

    def counting(encoder, frozen, posts, device):
        events.append(("build", posts.name))
        return compute(encoder, frozen, posts, device)

    def train(run_cfg):
        events.append(("train", run_cfg.out_dir))
        raise Trained

    monkeypatch.setattr(text_states, "compute_text_states", counting)
    monkeypatch.setattr(train_module, train_name, train)
    return events


def test_ablate_builds_the_shared_text_states_once_before_the_first_arm(tmp_path, monkeypatch, caplog):
    import logging

    data_dir, _ = make_data(tmp_path)
    events = _record_builds_and_training(tmp_path, monkeypatch, loop, "train_from_cache")
    base = dict(
        cache_dir=None,
        data=DataConfig(data_dir=str(data_dir)),
        text_encoder="tiny-bert",
        experiments=[],
        seeds=2,
        overrides=[*OVERRIDES, "model.text_only=true", "model.text_frozen_layers=1"],
        epochs=1,
        bootstrap=0,
    )
    # Two arms (x 2 seeds) share N = 1: each split's cache is built once, all before the first run.
    with caplog.at_level(logging.INFO, logger="mner.train.report.ablate"):
        with pytest.raises(Trained):
            run_ablation(AblationConfig(**base, grid=["model.dropout=0.1,0.2"], out_dir=str(tmp_path / "a")))
    assert events[:3] == [("build", "train"), ("build", "valid"), ("build", "test")]
    assert events[3:] == [("train", str(tmp_path / "a" / "model.dropout=0.1" / "seed1"))]
    built = [r.getMessage() for r in caplog.records if "built before the first arm" in r.getMessage()]
    assert len(built) == 3 and all(
        re.match(r"text-state cache built before the first arm in \d+\.\d s: ", m) for m in built
    )
    # A second ablation reads them: nothing is computed again.
    events.clear()
    with pytest.raises(Trained):
        run_ablation(AblationConfig(**base, grid=["model.dropout=0.3"], out_dir=str(tmp_path / "b")))
    assert [kind for kind, _ in events] == ["train"]
    # Arms that freeze nothing build nothing.
    events.clear()
    no_freeze = {**base, "overrides": [*OVERRIDES, "model.text_only=true"]}
    with pytest.raises(Trained):
        run_ablation(AblationConfig(**no_freeze, grid=["model.dropout=0.1,0.2"], out_dir=str(tmp_path / "c")))
    assert [kind for kind, _ in events] == ["train"]


def test_classifier_ablate_builds_the_text_states_before_the_first_arm_and_not_for_n0(
    mvsa, tmp_path, monkeypatch
):
    events = _record_builds_and_training(tmp_path, monkeypatch, classify, "train_classifier")
    overrides = ["classifier.text_encoder=tiny-bert", "classifier.mode=text", "classifier.max_length=32"]
    # base (N = 0) first: it builds nothing, and the N = 1 arms' caches are still built before it trains.
    cfg = _class_config(
        mvsa,
        tmp_path / "a",
        experiments=["base", "text_frozen_layers=1", "text_frozen_layers=1,dropout=0.2"],
        overrides=overrides,
    )
    with pytest.raises(Trained):
        run_ablation(cfg)
    splits = ["train", "valid", "test", "test_without_label"]
    assert events == [
        *(("build", name) for name in splits),
        ("train", str(tmp_path / "a" / "base" / "seed1")),
    ]
    events.clear()
    with pytest.raises(Trained):
        run_ablation(
            _class_config(mvsa, tmp_path / "b", experiments=["base", "dropout=0.2"], overrides=overrides)
        )
    assert [kind for kind, _ in events] == ["train"]


def test_the_arms_read_the_text_states_ablate_built(tmp_path, mvsa, monkeypatch):
    """The caches built before the first arm are the ones its training looks for (same fingerprint):
    the runs compute nothing again, for either task."""
    import mner.train.engine.text_states as text_states

    computed, compute = [], text_states.compute_text_states

    def counting(encoder, frozen, posts, device):
        computed.append(posts.name)
        return compute(encoder, frozen, posts, device)

    monkeypatch.setattr(text_states, "compute_text_states", counting)
    monkeypatch.setenv("MNER_TEXT_CACHE", str(tmp_path / "text-states"))  # of its own, as above
    data_dir, _ = make_data(tmp_path)
    tagging = AblationConfig(
        cache_dir=None,
        data=DataConfig(data_dir=str(data_dir)),
        text_encoder="tiny-bert",
        experiments=["full"],
        seeds=1,
        overrides=[*OVERRIDES, "model.text_only=true", "model.text_frozen_layers=1"],
        epochs=1,
        bootstrap=0,
        out_dir=str(tmp_path / "tagging"),
    )
    run_ablation(tagging)
    assert computed == ["train", "valid", "test"]
    record = json.loads((tmp_path / "tagging" / "full" / "seed1" / "config.json").read_text())
    assert len(set(record["text_states"].values())) == 3
    computed.clear()
    run_ablation(
        _class_config(
            mvsa,
            tmp_path / "classifier",
            experiments=["text_frozen_layers=1"],
            overrides=[
                "classifier.text_encoder=tiny-bert",
                "classifier.mode=text",
                "classifier.max_length=32",
            ],
            epochs=1,
            bootstrap=0,
        )
    )
    assert computed == ["train", "valid", "test", "test_without_label"]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_an_arm_needing_vision_state_the_cache_lacks_is_refused_before_the_first_arm(
    rank, tmp_path, monkeypatch
):
    # mango trains CLIP's last 2 blocks by default: on a cache without their state it is refused before
    # bert-crf, listed first, spends its training time, and no folder is left; on every torchrun rank, so
    # that no rank starts a first arm the others never join.
    monkeypatch.setenv("RANK", rank)
    data_dir, posts = make_data(tmp_path)
    cache_dir = make_cache(tmp_path, posts)
    started = _stop_at_training(monkeypatch)
    cfg = AblationConfig(
        cache_dir=str(cache_dir),
        data=DataConfig(data_dir=str(data_dir)),
        text_encoder="tiny-bert",
        experiments=["model=bert-crf", "model=mango"],
        seeds=1,
        out_dir=str(tmp_path / "out"),
        overrides=OVERRIDES,
    )
    with pytest.raises(
        ValueError, match=re.escape("(model mango's default, configs/models/mango.toml) trains")
    ):
        run_ablation(cfg)
    assert started == [] and not (tmp_path / "out").exists()


def test_classifier_an_arm_needing_layer3s_map_the_cache_lacks_is_refused_before_the_first_arm(
    mvsa, tmp_path, monkeypatch
):
    from mner.extract.config import ExtractConfig
    from mner.extract.run import extract_features

    k0 = extract_features(
        ExtractConfig(
            data=DataConfig(data_dir=str(mvsa)),
            out=str(tmp_path / "k0"),
            vision="tiny-resnet",
            detector="none",
            batch_size=8,
            num_workers=0,
            device="cpu",
        )
    )
    started = _stop_at_classifier_training(monkeypatch)
    cfg = _class_config(mvsa, tmp_path / "out", cache_dir=str(k0), experiments=["mode=text", "mode=both"])
    with pytest.raises(
        ValueError, match=re.escape("classifier.vision_trainable_blocks = 1 trains the last 1")
    ):
        run_ablation(cfg)
    assert started == [] and not (tmp_path / "out").exists()
