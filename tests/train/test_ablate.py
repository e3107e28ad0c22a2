"""run_ablation: experiments x seeds from one cache, resumable, and a mean ± std table checked by hand."""

from __future__ import annotations

import dataclasses
import json
import re
import statistics

import pandas as pd
import pytest

import mner.train.ablate as ablate
from mner.cache.datasets import DataConfig
from mner.train.ablate import ABLATIONS, AblationConfig, experiment_file, run_ablation
from mner.train.config import load_run_config
from tests.train.factories import MODEL_ABLATIONS, make_cache, model_file_overrides
from tests.train.run_factories import FAST_LR, make_data, single_thread, tree  # noqa: F401 (autouse fixture)

# Small, fast runs for every experiment.
OVERRIDES = ["train.batch_size=4", "train.device=cpu", "model.max_length=32"] + [
    f"train.{k}={v}" for k, v in FAST_LR.items()
]


def test_every_registry_experiment_changes_one_documented_key():
    base_model, base_train = load_run_config()
    assert experiment_file("full") is None
    changed = {}
    for name in ABLATIONS:
        if name == "full":
            continue
        path = experiment_file(name)
        assert path.read_text().startswith(f"# {name}: ")
        # A model's ablation is a diff over its model file: compare with the model file alone.
        model = MODEL_ABLATIONS.get(name)
        reference_model, reference_train = (
            load_run_config(overrides=model_file_overrides(model)) if model else (base_model, base_train)
        )
        over = model_file_overrides(model, path) if model else []
        model_cfg, train_cfg = load_run_config(config_file=path, overrides=over)
        assert train_cfg == reference_train
        changed[name] = {
            f.name: getattr(model_cfg, f.name)
            for f in dataclasses.fields(model_cfg)
            if getattr(model_cfg, f.name) != getattr(reference_model, f.name)
        }
    assert changed == {
        "no_align": {"alignment_loss_weight": 0.0},
        "no_adapt": {"adaptive_gate": False},
        "no_region": {"use_regions": False},
        "no_patch": {"use_patches": False},
        "text_only": {"text_only": True},
        "qfnet1": {"qfnet_layers": 1},
        "no_resampler": {"resampler": False},
        "no_preserve": {"preserve_lambda": 0.0},
    }


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
    return json.loads((ablate.Path(cfg.out_dir) / name / f"seed{seed}" / "results.json").read_text())


@pytest.mark.slow
def test_runs_land_in_experiment_seed_folders_with_their_config(ablation):
    cfg, md_path = ablation
    assert md_path.name == "ablation.md"
    for name in ("full", "text_only", "two_slots"):
        for seed in (1, 2):
            record = json.loads((md_path.parent / name / f"seed{seed}" / "config.json").read_text())
            assert record["train"]["seed"] == seed and record["train"]["epochs"] == 1
            assert record["model"]["text_encoder"] == "tiny-bert"
            assert record["model"]["text_only"] == (name == "text_only")
            assert record["model"]["slots_per_type"] == (2 if name == "two_slots" else 4)
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
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[4:]}
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
def test_rerun_skips_finished_runs_and_redoes_only_the_missing_one(ablation, monkeypatch):
    cfg, md_path = ablation
    before = md_path.read_text()
    trained = []
    real = ablate.train_from_cache

    def counting(run_cfg):
        trained.append(run_cfg.out_dir)
        return real(run_cfg)

    monkeypatch.setattr(ablate, "train_from_cache", counting)
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
        ablate.summary_markdown(table).splitlines()[-1]
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
        f"experiment same_layers ({same}) changes nothing: the base config with these overrides already"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        run_ablation(cfg)
    assert not (tmp_path / "out").exists()


def test_no_adapt_cannot_be_silent_over_a_fusion_without_a_gate(tmp_path):
    # Before issue 9, fusion "adaptive" (or "gated") ignored adaptive_gate, so no_adapt trained the base.
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


def test_a_seed_folder_that_is_not_a_run_of_ours_is_refused_not_skipped(tmp_path):
    data_dir, _ = make_data(tmp_path)
    cfg = _config(
        data=DataConfig(data_dir=str(data_dir)), experiments=["text_only"], out_dir=str(tmp_path / "out")
    )
    seed = tmp_path / "out" / "text_only" / "seed1"
    seed.mkdir(parents=True)
    (seed / "results.json").write_text('{"the user": 1}')
    (tmp_path / "out" / "ablation.json").write_text(json.dumps(ablate._record(cfg)))
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
