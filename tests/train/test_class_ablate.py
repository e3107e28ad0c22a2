"""The classifier ablation's own rules; the runs themselves are tested in test_classify.py."""

from __future__ import annotations

import json
import re

import pytest

import mner.train.class_ablate as class_ablate
from mner.cache.classification import ClassDataConfig
from mner.demo.classification import make_mvsa_demo
from mner.train.class_ablate import ClassAblationConfig, run_class_ablation


class Trained(Exception):
    """Raised by a stand-in for training: the ablation got as far as a run."""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_mvsa_demo(tmp_path_factory.mktemp("demo") / "mvsa", seed=0, n=24)


def _config(demo, out, **changes) -> ClassAblationConfig:
    fields = dict(
        data=ClassDataConfig(str(demo)),
        cache_dir=None,
        experiments=["mode=text"],
        out_dir=str(out),
        seeds=1,
        overrides=["classifier.text_encoder=tiny-bert"],
    )
    return ClassAblationConfig(**{**fields, **changes})


def _stop_at_training(monkeypatch) -> list:
    started = []

    def train(run_cfg):
        started.append(run_cfg)
        raise Trained

    monkeypatch.setattr(class_ablate, "train_classifier", train)
    return started


def test_full_is_the_base_arm_and_all_or_a_tagging_name_is_refused(demo, tmp_path):
    assert _config(demo, tmp_path / "o", experiments=["full", "head=cnn"]).experiments == ["base", "head=cnn"]
    for name in ("all", "no_align"):
        with pytest.raises(
            ValueError,
            match=rf"^{re.escape(f'experiment {name!r} is not a classifier diff')}.*are the tagging ablation's$",
        ):
            _config(demo, tmp_path / "o", experiments=[name])


def test_an_ablation_failing_before_any_training_leaves_no_folder(demo, tmp_path, monkeypatch):
    out = tmp_path / "deep" / "out"

    def fails(run_cfg):
        raise ValueError("the encoder folder is gone")

    monkeypatch.setattr(class_ablate, "train_classifier", fails)
    with pytest.raises(ValueError, match="the encoder folder is gone"):
        run_class_ablation(_config(demo, out))
    assert not (tmp_path / "deep").exists()


def test_an_arm_naming_a_path_trains_inside_the_ablation_folder(demo, tmp_path, monkeypatch):
    out = tmp_path / "a" / "b" / "out"
    started = _stop_at_training(monkeypatch)
    with pytest.raises(Trained):
        run_class_ablation(
            _config(demo, out, experiments=["text_encoder=../../../x"], overrides=["classifier.mode=text"])
        )
    assert started[0].out_dir == str(out / "text_encoder=.._.._.._x" / "seed1")
    assert sorted(p.name for p in tmp_path.rglob("*")) == []  # nothing was trained: nothing is left


def test_a_rerun_with_other_settings_is_refused_naming_the_difference(demo, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "ablation.json").write_text(json.dumps(_config(demo, out, epochs=1).record()))
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
            run_class_ablation(_config(demo, out, **changes))
    started = _stop_at_training(monkeypatch)
    with pytest.raises(Trained):  # the same settings continue it; the device is not one of them
        run_class_ablation(
            _config(
                demo, out, epochs=1, overrides=["classifier.text_encoder=tiny-bert", "classifier.device=cpu"]
            )
        )
    assert [run.classifier.epochs for run in started] == [1]


def test_the_seed_and_the_epochs_are_not_overridden_in_silence(demo, tmp_path):
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
            _config(demo, tmp_path / "o", **changes)
    assert _config(demo, tmp_path / "o", experiments=["epochs=3"]).arm_config("epochs=3", seed=1).epochs == 3


def test_arms_that_train_the_same_classifier_are_refused(demo, tmp_path):
    with pytest.raises(
        ValueError,
        match=re.escape("experiments 'base' and 'mode=both' would train the same model the same way"),
    ):
        run_class_ablation(_config(demo, tmp_path / "o", experiments=["base", "mode=both"], cache_dir="c"))
    assert not (tmp_path / "o").exists()
