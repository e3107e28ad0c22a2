"""Figures of `mner results --plot` (train/report/plots.py): the numbers behind each figure are checked
against the folders' files, and each PNG is a real image."""

import json
import math
import re
import sys

import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from mner.cli import main
from mner.train.engine.run_files import RECORD_KEYS
from mner.train.report import plots


def fake_run(folder, losses, dev_f1, per_type):
    """A finished run folder as training leaves it, as far as the figures read it."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({**{key: {} for key in RECORD_KEYS}, "model": {"task": "tagging"}})
    )
    lines = [
        {
            "epoch": i + 1,
            "train_loss": loss,
            "dev_precision": f1,
            "dev_recall": f1,
            "dev_f1": f1,
            "best": True,
            "seconds": 1.0,
        }
        for i, (loss, f1) in enumerate(zip(losses, dev_f1))
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    scores = {kind: {"precision": f1, "recall": f1, "f1": f1, "support": 3} for kind, f1 in per_type.items()}
    micro = {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 9}
    results = {
        "best_epoch": 1,
        "epochs_run": len(losses),
        "valid": {"micro": micro, "per_type": scores},
        "test": {"micro": micro, "per_type": scores},
    }
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def folders(tmp_path):
    a = fake_run(tmp_path / "text_only", [3.0, 2.0, 1.5], [0.2, 0.3, 0.35], {"LOC": 0.5, "PER": 0.25})
    b = fake_run(tmp_path / "full", [2.5, 1.0], [0.4, 0.6], {"PER": 0.75, "ORG": 0.1})
    ablation = tmp_path / "abl"
    ablation.mkdir()
    pd.DataFrame(
        {
            "experiment": ["full", "full", "no_region", "no_region", "text_only"],
            "seed": [1, 2, 1, 2, 1],
            "f1": [60.0, 64.0, 50.0, 51.0, 40.0],
        }
    ).to_csv(ablation / "ablation.csv", index=False)
    return a, b, ablation


def test_the_figures_and_the_numbers_behind_them(folders, tmp_path):
    a, b, ablation = folders
    written = plots.write_plots([a, b, ablation], tmp_path / "figs")
    assert [p.name for p in written] == ["learning_curves.png", "per_type_f1.png", "ablation_abl.png"]
    for png in written:
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
    record = json.loads((tmp_path / "figs" / "plots.json").read_text())
    assert record["figures"] == [p.name for p in written] and record["inputs"] == [
        str(a),
        str(b),
        str(ablation),
    ]

    curve = plots.curves(b)
    assert curve["epoch"].tolist() == [1, 2] and curve["train_loss"].tolist() == [2.5, 1.0]
    assert curve["dev_f1"].tolist() == pytest.approx([40.0, 60.0])
    types = plots.type_scores([a, b], "test")
    assert types.index.tolist() == ["LOC", "ORG", "PER"]  # every type of either run, a missing one as 0
    assert types["text_only"].tolist() == pytest.approx([50.0, 0.0, 25.0])
    assert types["full"].tolist() == pytest.approx([0.0, 10.0, 75.0])
    arms = plots.arm_scores(ablation)
    assert arms["experiment"].tolist() == ["full", "no_region", "text_only"]
    assert arms["mean"].tolist() == pytest.approx([62.0, 50.5, 40.0])
    assert arms["std"].tolist() == pytest.approx([math.sqrt(8.0), math.sqrt(0.5), 0.0])
    assert arms["seeds"].tolist() == [2, 2, 1]


def test_a_second_plot_replaces_ours_and_other_folders_are_refused(folders, tmp_path):
    a, b, _ = folders
    out = tmp_path / "figs"
    plots.write_plots([a], out)
    assert [p.name for p in plots.write_plots([a, b], out)] == ["learning_curves.png", "per_type_f1.png"]
    foreign = tmp_path / "paper"
    foreign.mkdir()
    (foreign / "draft.tex").write_text("mine")
    with pytest.raises(ValueError, match="--plot"):
        plots.write_plots([a], foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["draft.tex"]
    with pytest.raises(ValueError, match="an input of this command, and would replace what is there"):
        plots.write_plots([a], a)


def test_what_cannot_be_plotted(folders, tmp_path):
    a, _, _ = folders
    with pytest.raises(
        ValueError,
        match=rf"^{tmp_path} is neither a run folder \(config.json\) nor an ablation folder \(ablation.csv\); "
        "there is nothing to plot$",
    ):
        plots.write_plots([tmp_path], tmp_path / "figs")
    with pytest.raises(
        ValueError, match=rf"^{a} has no train results; run `mner evaluate {a} --split train`$"
    ):
        plots.write_plots([a], tmp_path / "figs", split="train")


def test_missing_matplotlib_says_how_to_install_it(folders, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    a, _, _ = folders
    with pytest.raises(ValueError) as caught:
        plots.write_plots([a], tmp_path / "figs")
    assert str(caught.value) == (
        "--plot needs matplotlib, which is not installed: pip install 'mner-cache[plot]' (or: pip install matplotlib)"
    )
    assert not (tmp_path / "figs").exists()


def test_results_command_plots_and_prints_the_ablation_table(folders, tmp_path):
    a, b, ablation = folders
    (ablation / "ablation.md").write_text("| experiment | F1 |\n")
    result = CliRunner().invoke(
        main, ["results", str(a), str(b), str(ablation), "--plot", str(tmp_path / "f")]
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split()[:5] == ["run", "P", "R", "F1", "support"]
    assert f"{ablation}:\n| experiment | F1 |" in result.output
    assert f"wrote {tmp_path / 'f' / 'ablation_abl.png'}" in result.output


def test_runs_of_the_same_name_get_distinct_labels(tmp_path):
    runs = [tmp_path / "abl" / arm / "seed1" for arm in ("full", "no_region")] + [tmp_path / "other"]
    assert plots.run_labels(runs) == ["full/seed1", "no_region/seed1", str(tmp_path.name) + "/other"]
    assert plots.run_labels([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]


def test_a_run_still_training_is_drawn_as_far_as_it_got(folders, tmp_path, caplog):
    a, b, _ = folders
    (b / "results.json").unlink()  # b has finished 2 of its 5 epochs
    (b / "config.json").write_text(
        json.dumps({**{key: {} for key in RECORD_KEYS}, "model": {"task": "tagging"}, "train": {"epochs": 5}})
    )
    out = tmp_path / "figs"
    with caplog.at_level("WARNING"):
        written = plots.write_plots([a, b], out)
    assert [p.name for p in written] == ["learning_curves.png", "per_type_f1.png"]
    assert f"{b} is unfinished (epoch 2/5): its learning curves show the epochs so far" in caplog.text
    record = json.loads((out / "plots.json").read_text())
    assert record["unfinished"] == {str(b): "unfinished (epoch 2/5)"}
    only = plots.write_plots([b], tmp_path / "only")  # nothing finished: no per-type figure
    assert [p.name for p in only] == ["learning_curves.png"]


def test_a_classifier_ablation_is_drawn_by_accuracy_and_macro_f1(tmp_path):
    ablation = tmp_path / "mvsa"
    ablation.mkdir()
    pd.DataFrame(
        {
            "experiment": ["mode=text", "mode=text", "mode=both"],
            "seed": [1, 2, 1],
            "accuracy": [60.0, 70.0, 80.0],
            "macro_f1": [50.0, 54.0, 75.0],
        }
    ).to_csv(ablation / "ablation.csv", index=False)
    scores = plots.ablation_scores(ablation)
    assert list(scores) == ["accuracy", "macro F1"]
    assert list(scores["accuracy"]["mean"]) == [65.0, 80.0]
    assert list(scores["macro F1"]["mean"]) == [52.0, 75.0]
    assert scores["macro F1"]["std"][0] == pytest.approx(math.sqrt(8.0))
    [png] = plots.write_plots([ablation], tmp_path / "figs")
    assert png.name == "ablation_mvsa.png" and Image.open(png).format == "PNG"


def test_what_is_not_a_tagging_run_is_refused_before_anything_is_made(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    pd.DataFrame({"experiment": ["x"], "score": [1.0]}).to_csv(other / "ablation.csv", index=False)
    classifier = tmp_path / "clf"
    classifier.mkdir()
    record = {"task": "classification", "classifier": {}, "label_names": [], "data": {}, "cache": None}
    (classifier / "config.json").write_text(json.dumps(record))
    running = tmp_path / "running"
    running.mkdir()
    (running / "ablation.json").write_text("{}")
    from mner.train.engine.run_files import load_run

    assert load_run(classifier).task.name == "classification", "the fake must look like a classifier run"
    for path, message in (
        (other, f"{other / 'ablation.csv'} has none of the columns an ablation is drawn by"),
        (
            classifier,
            f"{classifier} is a classifier run: --plot draws the learning curves and per-type F1 of tagging runs only",
        ),
        (running, f"{running} is an ablation that has not finished (no ablation.csv yet)"),
    ):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            plots.write_plots([path], tmp_path / "figs")
        assert not (tmp_path / "figs").exists()
