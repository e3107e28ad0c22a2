"""The classifier's trainable vision blocks (`classifier.vision_trainable_blocks`, default 1): from a
tiny-resnet cache extracted with `--vision-trainable-blocks 1` layer4 trains on the stored layer3 map at
lr_vision, gives before any step the frozen model's output, survives evaluate and predict, and a cache
without the state is refused with the command that makes one."""

from __future__ import annotations

import json
import re
import shlex
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from mner.cache.classification import UNLABELLED_FILE, ClassDataConfig, read_classification
from mner.cache.reader import CacheReader
from mner.cli import main
from mner.demo.classification import make_mvsa_demo
from mner.runtime import Runtime
from mner.train.engine.classifier_config import ClassifierConfig, ClassifierRunConfig
from mner.train.engine.classifier_data import image_statistics, post_loader
from mner.train.engine.classify import (
    SUBMISSION_FILE,
    build_classifier,
    classifier_settings,
    param_groups,
    train_classifier,
)
from mner.train.engine.loop import make_optimizer, train_step
from mner.train.engine.runs import trainable_vision_blocks
from mner.train.report.evaluate import evaluate_classifier
from mner.train.report.predict import predict_classifier
from mner.train.zoo.text import resolve_text_encoder
from tests.train.engine.test_classify import extract
from tests.train.run_factories import single_thread  # noqa: F401 (autouse fixture)

SETTING = "classifier.vision_trainable_blocks"
QUICK = dict(text_encoder="tiny-bert", epochs=1, batch_size=8, max_length=32, device="cpu")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A 24-post MVSA demo whose first train post has no image, its tiny-resnet cache with layer3's map
    (K = 1) and the same cache without it (K = 0)."""
    root = tmp_path_factory.mktemp("classify-vision")
    folder = make_mvsa_demo(root / "demo", seed=0, n=24)
    first = read_classification(ClassDataConfig(str(folder))).splits["train"].examples[0]
    first.image.unlink()
    return SimpleNamespace(
        root=root, folder=folder, k1=extract(folder, root / "k1", 1), k0=extract(folder, root / "k0", 0)
    )


def model_and_batch(demo, seed: int = 0, **settings):
    """(the classifier a run on the K = 1 cache starts from, torch seeded first, image statistics set;
    one batch of every train post; the config)."""
    c = ClassifierConfig(**{**QUICK, **settings})
    train = read_classification(ClassDataConfig(str(demo.folder))).splits["train"]
    reader = CacheReader(demo.k1)
    vision = trainable_vision_blocks(c.trained_blocks, reader, demo.folder, SETTING)
    labels = sorted({e.label for e in train.examples})
    torch.manual_seed(seed)
    model, tokenizer = build_classifier(
        c, len(labels), resolve_text_encoder("tiny-bert"), reader.spec, None, *(vision or (None, None))
    )
    if model.standardises:
        model.set_image_statistics(*image_statistics(train, reader, c))
    loader = post_loader(train, reader, labels, tokenizer, ClassifierConfig(**{**QUICK, **settings,
                         "batch_size": len(train.examples)}), False, 0)  # fmt: skip
    return model, next(iter(loader)), c


def test_the_default_trains_layer4_and_text_mode_needs_no_blocks():
    assert ClassifierConfig().vision_trainable_blocks == 1 and ClassifierConfig().lr_vision == 1e-5
    assert ClassifierConfig(mode="text").trained_blocks == 0
    with pytest.raises(ValueError, match=rf"^{SETTING} must be >= 0, got -1$"):
        ClassifierConfig(vision_trainable_blocks=-1)
    with pytest.raises(ValueError, match=r"^classifier.lr_vision must be > 0, got 0.0$"):
        ClassifierConfig(lr_vision=0.0)


def test_a_run_recorded_without_the_setting_rebuilds_without_blocks():
    """A record made before vision_trainable_blocks existed read the cached vector: its missing key is 0."""
    old = ClassifierConfig(mode="both").to_dict()
    del old["vision_trainable_blocks"]
    assert classifier_settings({"classifier": old}, "config.json").vision_trainable_blocks == 0
    recorded = {"classifier": {**old, "vision_trainable_blocks": 1}}
    assert classifier_settings(recorded, "config.json").vision_trainable_blocks == 1


@pytest.mark.parametrize("settings", [dict(mode="both"), dict(mode="image", head="xattn")])
def test_layer4_learns_from_the_loss_at_lr_vision(demo, settings):
    """k = 1 on a ResNet cache: layer4 whole trains (no frozen prefix), every parameter of it gets a
    gradient and is in the lr_vision group, decayed as every parameter of the seed's AdamW, and a step
    moves it; the cache's weights were loaded."""
    model, batch, c = model_and_batch(demo, **settings, dropout=0.0)
    blocks = model.vision_blocks
    assert blocks is not None and blocks.kind == "resnet" and len(blocks.frozen) == 0
    with CacheReader(demo.k1) as reader:
        stored = reader.vision_blocks()[1]
    before = {n: p.detach().clone() for n, p in blocks.named_parameters()}
    assert before and all(torch.equal(v, torch.from_numpy(stored[n]).float()) for n, v in before.items())
    assert batch["has_image"].any() and not batch["has_image"].all()  # the first has no image

    model.train()
    model(batch)["loss"].backward()
    for name, parameter in blocks.named_parameters():
        assert parameter.requires_grad and parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name

    groups = param_groups(model, ClassifierConfig(**{**QUICK, **settings, "lr_vision": 3e-4}))
    vision = [g for g in groups if any(p is next(blocks.parameters()) for p in g["params"])]
    assert len(vision) == 1 and (vision[0]["lr"], vision[0]["weight_decay"]) == (3e-4, c.weight_decay)
    assert {id(p) for p in vision[0]["params"]} == {id(p) for p in blocks.parameters()}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())

    runtime = Runtime(torch.device("cpu"), None)
    optimizer, scheduler, scaler = make_optimizer(groups, c.weight_decay, 0.0, 10, runtime, "cosine")
    model.zero_grad()
    train_step(model, batch, optimizer, scheduler, scaler, 0.0, runtime)
    moved = [n for n, p in blocks.named_parameters() if not torch.equal(p, before[n])]
    assert sorted(moved) == sorted(before)


@pytest.mark.parametrize(
    "settings",
    [
        dict(mode="both", head="mlp"),
        dict(mode="image", head="mlp", image_feature="patches"),
        dict(mode="both", head="xattn", attention_heads=2),
        dict(mode="both", head="attention", image_norm="none"),
    ],
)
def test_before_any_step_the_blocks_give_the_frozen_models_logits(demo, settings):
    """k = 1 against k = 0 (the cached vector) from the same seed, in eval mode (BatchNorm on the stored
    running statistics): every module but the blocks starts from the same weights, the image statistics
    are the same (image_norm "standard" computes them from the cached vectors in both), and the logits
    agree to the cache's float16 rounding."""
    trained, batch, _ = model_and_batch(demo, **settings)
    frozen, same, _ = model_and_batch(demo, **settings, vision_trainable_blocks=0)
    assert "vision_state" in batch and "vision_state" not in same
    assert torch.equal(batch["image"], same["image"])
    weights = frozen.state_dict()
    kept = {n: v for n, v in trained.state_dict().items() if not n.startswith("vision_blocks.")}
    assert kept.keys() == weights.keys() and all(torch.equal(v, weights[n]) for n, v in kept.items())
    trained.eval(), frozen.eval()
    ok = batch["has_image"]
    with torch.no_grad():
        made = trained.block_image(batch)
        a, b = trained(batch)["logits"], frozen(same)["logits"]
        control = frozen({**same, "image": same["image"].roll(1, 0)})["logits"]
    assert not torch.equal(made, batch["image"])  # made by layer4, not read from the cache
    assert torch.equal(made[~ok], torch.zeros_like(made[~ok]))
    # The stored layer3 map and the cached vector are each rounded to float16: they differ by up to
    # 1.5e-4 on features up to 0.5 (measured). Divided by the train std (about 0.017 per dimension) that
    # reaches the logits as up to 1.3e-3 (measured; 5e-6 without standardising); 5e-3 leaves a margin of 4.
    torch.testing.assert_close(made[ok], batch["image"][ok], rtol=4e-3, atol=1e-4)
    torch.testing.assert_close(a, b, rtol=0, atol=5e-3)
    # Another post's image moves the logits at least 500 times as far (measured: 0.011 to 1.4).
    assert (control - b).abs().max() > 100 * (a - b).abs().max()


def test_in_training_batchnorm_keeps_its_stored_statistics_unless_batch(demo):
    """vision_batchnorm "stored" (the default): a training forward is the evaluation forward, so the
    first step's loss is the frozen model's, and BatchNorm's statistics stay as stored; "batch" (the
    notebook's model.train()) normalises by the batch and updates them, which moves the loss. Image mode:
    no text encoder, whose dropout would draw other masks in each forward."""
    stored, batch, _ = model_and_batch(demo, mode="image")
    frozen, same, _ = model_and_batch(demo, mode="image", vision_trainable_blocks=0)
    norms = [m for m in stored.vision_blocks.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in norms]
    stored.train(), frozen.train()
    with torch.no_grad():
        loss = stored(batch)["loss"]
        torch.testing.assert_close(loss, frozen(same)["loss"], rtol=0, atol=1e-3)
    assert norms and all(not m.training for m in norms) and stored.head.training
    assert all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))
    assert torch.equal(stored.eval()(batch)["loss"], loss)

    moving, batch, _ = model_and_batch(demo, mode="image", vision_batchnorm="batch")
    norms = [m for m in moving.vision_blocks.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    moving.train()
    with torch.no_grad():
        moved = moving(batch)["loss"]
    assert all(m.training for m in norms)
    assert not all(torch.equal(m.running_mean, b) for m, b in zip(norms, before))
    assert (moved - loss).abs() > 0.1
    with pytest.raises(
        ValueError, match=r"^classifier.vision_batchnorm must be one of stored, batch; got 'x'$"
    ):
        ClassifierConfig(vision_batchnorm="x")


def test_a_cache_without_the_state_is_refused_with_the_command_that_makes_one(demo, tmp_path):
    """The default k = 1, image and both modes: the CLI's error is the exact message, naming the
    extraction that stores layer3's map; nothing is created. Text mode trains on the same cache."""
    command = (
        f"mner extract-features --data-dir {demo.folder} --out NEW_CACHE --vision tiny-resnet --detector none "
        "--region-features frcnn --topk 20 --score-thr 0.2 --nms-iou 0.5 --vision-trainable-blocks 1"
    )
    want = (
        f"Error: {SETTING} = 1 trains the last 1 vision blocks on the state the cache stores before them, "
        f"but the cache {demo.k0} stores no vision state (extracted without --vision-trainable-blocks); "
        f"extract one with `{command}` and train on it, or set {SETTING} = 0\n"
    )
    for mode in ("image", "both"):
        out = tmp_path / mode
        args = ["train-classifier", "--data-dir", str(demo.folder), "--cache", str(demo.k0)]
        result = CliRunner().invoke(
            main, [*args, "--mode", mode, "--text-encoder", "tiny-bert", "--out", str(out)]
        )
        assert result.exit_code == 1 and result.output == want, result.output
        assert not out.exists()
    # the hinted command makes a cache the default trains on
    made = tmp_path / "made"
    words = shlex.split(command.replace("NEW_CACHE", str(made)))[1:]
    assert CliRunner().invoke(main, [*words, "--num-workers", "0", "--device", "cpu"]).exit_code == 0
    with CacheReader(made) as reader:
        assert reader.trainable_blocks == 1
    text = train_classifier(
        ClassifierRunConfig(
            data=ClassDataConfig(str(demo.folder)),
            out_dir=str(tmp_path / "text"),
            classifier=ClassifierConfig(**QUICK, mode="text"),
            cache_dir=str(demo.k0),
        )
    )
    assert json.loads((text / "config.json").read_text())["cache"] is None


def test_a_resnet_cache_trains_layer4_alone(demo):
    with CacheReader(demo.k1) as reader, pytest.raises(ValueError) as refused:
        trainable_vision_blocks(2, reader, demo.folder, SETTING)
    assert str(refused.value) == (
        f"{SETTING} = 2, but the cache {demo.k1} is a ResNet's, whose stage two trains layer4 alone (its "
        f"stages differ in width and stride); set {SETTING} = 1"
    )


def test_a_run_with_layer4_trained_survives_evaluate_and_predict(demo, tmp_path):
    """Trained at k = 1 (the default): config.json's cache holds the blocks' config, model.safetensors
    their trained weights; evaluate rebuilds the model and reproduces the training-time scores, predict
    the submission training wrote; new posts are extracted by the hinted command, which stores layer3's
    map, and a cache of them without it is refused."""
    cfg = ClassifierRunConfig(
        data=ClassDataConfig(str(demo.folder)),
        out_dir=str(tmp_path / "run"),
        classifier=ClassifierConfig(**{**QUICK, "epochs": 2, "lr_vision": 1e-2}, mode="both"),
        cache_dir=str(demo.k1),
    )
    run = train_classifier(cfg)
    record = json.loads((run / "config.json").read_text())
    with CacheReader(demo.k1) as reader:
        config, stored = reader.vision_blocks()
    assert record["classifier"]["vision_trainable_blocks"] == 1
    assert record["cache"]["vision_blocks"] == config
    weights = load_file(run / "model.safetensors")
    layer4 = {n: v for n, v in weights.items() if n.startswith("vision_blocks.")}
    assert layer4.keys() == {f"vision_blocks.{n}" for n in stored}
    assert any(not torch.equal(v, torch.from_numpy(stored[n[len("vision_blocks."):]]))
               for n, v in layer4.items() if v.is_floating_point())  # fmt: skip

    results = json.loads((run / "results.json").read_text())
    scores, _ = evaluate_classifier(run, split="test", device="cpu")
    assert scores["accuracy"] == results["test"]["accuracy"]
    assert scores["macro_f1"] == results["test"]["macro_f1"]
    source = demo.folder / UNLABELLED_FILE
    out = predict_classifier(run, source, tmp_path / "sub.txt", device="cpu")
    assert out.read_text(encoding="utf-8") == (run / SUBMISSION_FILE).read_text(encoding="utf-8")

    # New posts: the hint extracts them with layer3's map; a K = 0 cache of them is refused.
    other = make_mvsa_demo(tmp_path / "other", seed=5, n=24)
    for name in ("train.txt", "valid.txt", "test.txt", "demo.json"):
        (other / name).unlink(missing_ok=True)
    with pytest.raises(ValueError) as caught:
        predict_classifier(run, other / UNLABELLED_FILE, tmp_path / "p.txt", device="cpu")
    command = re.search(r"`(mner extract-features [^`]*)`", str(caught.value)).group(1)
    assert command.endswith("--vision-trainable-blocks 1")
    without = extract(other, tmp_path / "other-k0", 0)
    with pytest.raises(ValueError, match=r"differs: spec\.vision_state_shape: cache null, run \[32, 4, 4\]"):
        predict_classifier(run, other / UNLABELLED_FILE, tmp_path / "p.txt", cache_dir=without, device="cpu")
    words = shlex.split(command.replace("NEW_CACHE", str(tmp_path / "other-k1")))[1:]
    assert CliRunner().invoke(main, [*words, "--num-workers", "0", "--device", "cpu"]).exit_code == 0
    labelled = predict_classifier(
        run, other / UNLABELLED_FILE, tmp_path / "p.txt", cache_dir=tmp_path / "other-k1", device="cpu"
    )
    assert len(labelled.read_text(encoding="utf-8").splitlines()) == len(
        (other / UNLABELLED_FILE).read_text(encoding="utf-8").splitlines()
    )
