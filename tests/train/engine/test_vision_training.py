"""Stage two with trainable vision blocks (model.vision_trainable_blocks = k): the blocks make the tokens
the cache stores, they learn from the model's loss at train.lr_vision, a cache without their input is
refused with the command that makes one, an image-less post stays image-less, and a run survives
evaluate, predict and a resume."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import mner.train.engine.loop as loop
from mner.cache.conll import read_split
from mner.cache.datasets import DataConfig
from mner.cache.reader import CacheReader
from mner.extract.config import ExtractConfig
from mner.extract.reextract import extract_from_record
from mner.extract.run import extract_features
from mner.runtime import Runtime, resolve_runtime
from mner.train.engine.config import ModelConfig, RunConfig, TrainConfig, model_names
from mner.train.engine.config_files import load_run_config
from mner.train.engine.data import PostDataset, make_loader
from mner.train.engine.loop import train_from_cache
from mner.train.engine.run_files import make_record
from mner.train.engine.runs import build_model, vision_blocks_of
from mner.train.report.ablate import run_ablation
from mner.train.report.ablation_config import AblationConfig
from mner.train.report.evaluate import evaluate_run
from mner.train.report.predict import predict as predict_without_stage_one
from mner.train.zoo.model import decayed_parameters
from mner.train.zoo.text import load_tokenizer, resolve_text_encoder
from tests.train.run_factories import (  # noqa: F401 (single_thread: autouse fixture)
    make_data,
    make_images,
    run_config,
    single_thread,
)

predict = functools.partial(predict_without_stage_one, extract=extract_from_record)
TINY = {"text_encoder": "tiny-bert", "qfnet_heads": 2, "slots_per_type": 2, "max_length": 32}
# Dropout and image dropout draw random numbers in training; off where outputs are compared.
NO_DROPOUT = {"dropout": 0.0, "image_dropout": 0.0}


def extract(tmp, data_dir, name: str, **changes):
    cfg = ExtractConfig(
        data=DataConfig(data_dir=str(data_dir)),
        out=str(tmp / name),
        num_workers=0,
        device="cpu",
        topk=4,
        **changes,
    )
    return extract_features(cfg)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A data folder (train/valid/test 10/4/4) whose images exist but for tr3 and va1 (missing), a
    tiny-clip / tiny-frcnn cache storing the input of both of tiny-clip's 2 layers (K = 2, all), the same
    cache without it (K = 0) and a tiny-resnet cache storing its layer3 map (K = 1)."""
    tmp = tmp_path_factory.mktemp("vision-training")
    data_dir, posts = make_data(tmp)
    make_images(data_dir / "images", [post.key for post in posts if post.key not in ("tr3", "va1")])
    return {
        "tmp": tmp,
        "data": data_dir,
        "k2": extract(tmp, data_dir, "cache-k2", vision_trainable_blocks=2),
        "k0": extract(tmp, data_dir, "cache-k0"),
        "resnet": extract(tmp, data_dir, "cache-resnet", vision="tiny-resnet", vision_trainable_blocks=1),
    }


def model_and_batch(data, cache: str, seed: int = 0, **model):
    """(the model a run on data[cache] starts from, with torch seeded first; one batch of every train post)."""
    cfg = run_config(data["tmp"] / "unused", data[cache], data["data"], **{**TINY, **model})
    source = cfg.data.resolve()
    split = source.read("train")
    reader = CacheReader(data[cache])
    vision = vision_blocks_of(cfg.model, reader, source.data_dir)
    labels = ["O", "B-LOC", "B-PER"]
    record = make_record(cfg, source, labels, resolve_text_encoder("tiny-bert"), reader)
    if vision is not None:
        record["cache"]["vision_blocks"] = vision[0]
    torch.manual_seed(seed)
    built = build_model(record, "tiny-bert", None if vision is None else vision[1])
    train = dataclasses.replace(cfg.train, batch_size=len(split.posts))
    loader = make_loader(split, reader, load_tokenizer("tiny-bert"), labels, cfg.model, train, shuffle=False)
    return built, next(iter(loader))


def test_the_blocks_as_stored_give_the_cached_tokens_and_the_frozen_models_emissions(data):
    """k = K, before any step: the visual input is the cache's final tokens to float16 tolerance (the
    stored state and the tokens are each rounded to float16, about 5e-4 relative), and the emissions
    are those of the k = 0 model of the same seed, which reads those tokens."""
    trained, batch = model_and_batch(data, "k2", vision_trainable_blocks=2)
    frozen, same = model_and_batch(data, "k2")
    assert torch.equal(batch["patch_tokens"], same["patch_tokens"]) and "vision_state" not in same
    ok = batch["image_mask"]
    assert ok.any() and not ok.all()  # tr3 has no image
    trained.eval(), frozen.eval()
    with torch.no_grad():
        inputs = trained.vision_inputs(batch, ok)
        for name in ("patch_tokens", "global_embed"):
            torch.testing.assert_close(inputs[name][ok], batch[name][ok], rtol=4e-3, atol=4e-3)
            assert torch.equal(inputs[name][~ok], torch.zeros_like(inputs[name][~ok]))
            assert not torch.equal(inputs[name], batch[name])  # made by the blocks, not read from the cache
        # Every module but the blocks starts from the k = 0 model's weights (same seed).
        weights = frozen.state_dict()
        assert all(torch.equal(value, weights[name]) for name, value in trained.state_dict().items()
                   if not name.startswith("vision_blocks."))  # fmt: skip
        a, b = trained._emissions(batch, ok)[0], frozen._emissions(same, ok)[0]
    # The blocks' tokens differ from the cached ones by the cache's float16 rounding (1.4e-3 at most
    # here, on tokens up to 3); the projections and LayerNorms carry that into the emissions as about
    # 3e-5 (measured). 1e-3 leaves a margin of 30 and is 700 times below what another image moves them
    # by (the control below, 0.75).
    torch.testing.assert_close(a, b, rtol=0, atol=1e-3)
    shuffled = {
        **same,
        "patch_tokens": same["patch_tokens"].roll(1, 0),
        "global_embed": same["global_embed"].roll(1, 0),
    }
    with torch.no_grad():
        assert (frozen._emissions(shuffled, ok)[0] - b).abs().max() > 0.1


@pytest.mark.parametrize(
    ("cache", "k", "fusion"), [("k2", 2, "qgf"), ("k2", 1, "mango"), ("resnet", 1, "qgf")]
)
def test_the_blocks_learn_from_the_loss_at_lr_vision(data, cache, k, fusion):
    """Every block parameter that trains gets a gradient from the model's loss, and sits in the lr_vision
    groups; the global embedding's post_layernorm and projection train only for a fusion that reads it."""
    model, batch = model_and_batch(
        data,
        cache,
        vision_trainable_blocks=k,
        use_regions=cache != "resnet",
        fusion=fusion,
        adaptive_gate=fusion == "qgf",
        nce_lambda=0.1 if fusion == "mango" else 0.0,  # MANGO's InfoNCE reads the global embedding
        **NO_DROPOUT,
    )
    blocks = model.vision_blocks
    assert all(p.requires_grad == (fusion == "mango") for p in blocks.global_parameters())
    if fusion == "mango":
        assert blocks.global_parameters()  # CLIP's post_layernorm is among the trained ones
    model.train()
    model(batch)["loss"].backward()
    trained = {
        n: p for n, p in model.named_parameters() if n.startswith("vision_blocks.") and p.requires_grad
    }
    assert trained
    for name, parameter in trained.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.vision_blocks.frozen.parameters())
    assert len(model.vision_blocks.frozen) == (2 - k if cache == "k2" else 0)

    train = TrainConfig(lr_vision=2e-5, weight_decay=0.05)
    optimizer, _, _ = loop.build_optimizer(model, train, 10, resolve_runtime("cpu", "off"))
    groups = {group["name"]: group for group in optimizer.param_groups}
    ids = {name: {id(p) for p in groups[name]["params"]} for name in ("vision", "vision_no_decay")}
    assert ids["vision"] | ids["vision_no_decay"] == {id(p) for p in trained.values()}
    assert (groups["vision"]["initial_lr"], groups["vision"]["weight_decay"]) == (2e-5, 0.05)
    assert (groups["vision_no_decay"]["initial_lr"], groups["vision_no_decay"]["weight_decay"]) == (2e-5, 0.0)
    decayed = decayed_parameters(model)
    for name, parameter in trained.items():
        # Weight matrices (linear layers, convolutions) decay; LayerNorm, BatchNorm and biases do not.
        matrix = parameter.dim() >= 2
        assert (id(parameter) in ids["vision"]) == matrix == (id(parameter) in decayed), name
    assert any(n.endswith(".bias") for n in trained) and any("norm" in n or "bn" in n for n in trained)


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_training_step_moves_the_trained_block_and_not_the_frozen_one(data, amp):
    """k = 1 on the K = 2 cache through the loop's own optimiser and train_step: after one step every
    parameter of the trained block has moved, the frozen block before it and the global embedding's
    post_layernorm (qgf reads no global embedding) are bitwise the cache's. bf16: under the step's
    autocast (the CPU one here; the loop autocasts on CUDA only) the block runs in bf16, the loss is
    finite and the step still reaches the block."""
    model, batch = model_and_batch(data, "k2", vision_trainable_blocks=1, **NO_DROPOUT)
    runtime = Runtime(device=torch.device("cpu"), amp_dtype=amp)
    train = TrainConfig(warmup_ratio=0.0)  # no warm-up: the first step has the full lr_vision
    optimizer, scheduler, scaler = loop.build_optimizer(model, train, 10, runtime)
    blocks = model.vision_blocks
    before = {name: p.detach().clone() for name, p in blocks.named_parameters()}
    ran = []  # dtype of the trained block's MLP output in the step
    hook = blocks.layers[0].mlp.fc1.register_forward_hook(lambda module, args, out: ran.append(out.dtype))
    loss = loop.train_step(model.train(), batch, optimizer, scheduler, scaler, train.max_grad_norm, runtime)
    hook.remove()
    assert math.isfinite(loss) and ran == [amp or torch.float32]
    after = dict(blocks.named_parameters())
    for name in ("frozen", "layers", "post_layernorm"):
        assert any(n.startswith(f"{name}.") for n in after), name  # every part is checked below
    for name, parameter in after.items():
        moved = not torch.equal(parameter, before[name])
        assert moved == name.startswith("layers."), name
        assert parameter.requires_grad == moved, name


def test_a_cache_without_the_state_is_refused_with_the_command_that_makes_one(data):
    data_dir = data["data"]
    clip = CacheReader(data["k0"]).config["clip"]
    command = (
        f"mner extract-features --data-dir {data_dir} --out NEW_CACHE --vision clip --clip {clip} "
        "--detector tiny-frcnn --region-features frcnn --topk 4 --score-thr 0.0 --nms-iou 0.5 "
        "--vision-trainable-blocks {k}"
    )
    # The value asked is named as given (-1: all), and the way out is a value the cache can take:
    # -1 on a cache without state would be refused again.
    none = "stores no vision state (extracted without --vision-trainable-blocks)"
    for cache, k, asked, n, held, fix in (
        ("k0", 1, "1", "1", none, "= 0"),
        ("k0", -1, "-1 (all the cache stores)", "1", none, "= 0"),
        ("k2", 3, "3", "3", "stores the state before the last 2 only (--vision-trainable-blocks 2)", "<= 2"),
    ):
        with pytest.raises(ValueError) as refused:
            model_and_batch(data, cache, vision_trainable_blocks=k)
        assert str(refused.value) == (
            f"model.vision_trainable_blocks = {asked} trains the last {n} vision blocks on the state the cache "
            f"stores before them, but the cache {data[cache]} {held}; extract one with "
            f"`{command.format(k=n)}` and train on it, or set model.vision_trainable_blocks {fix}"
        )
    with pytest.raises(ValueError, match=re.escape("is a ResNet's, whose stage two trains layer4 alone")):
        model_and_batch(data, "resnet", vision_trainable_blocks=2, use_regions=False)


def test_training_refuses_it_before_making_a_folder(data):
    out = data["tmp"] / "refused"
    cfg = run_config(out, data["k0"], data["data"], epochs=1, vision_trainable_blocks=2)
    with pytest.raises(ValueError, match=re.escape("--vision-trainable-blocks 2` and train on it")):
        train_from_cache(cfg)
    assert not out.exists()


def test_nothing_reads_the_blocks_is_refused(data):
    with pytest.raises(
        ValueError,
        match=re.escape(
            "model.vision_trainable_blocks = 2 trains the blocks that make the patch tokens and the global "
            "embedding, but model.use_patches is false and model.fusion 'qgf' reads no global embedding; "
            "set model.vision_trainable_blocks = 0"
        ),
    ):
        model_and_batch(data, "k2", vision_trainable_blocks=2, use_patches=False)


@pytest.mark.parametrize("name", [n for n in model_names() if not load_run_config(model=n)[0].text_only])
def test_a_masked_image_stays_bitwise_image_less(data, name):
    """Every model of the zoo with k = 2: posts whose image is masked (their state scrambled) give the
    emissions of the same posts with no image in the cache."""
    cfg = load_run_config(model=name)[0]
    zoo = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    model, batch = model_and_batch(data, "k2", **{**zoo, **TINY, **NO_DROPOUT, "vision_trainable_blocks": 2})
    model.eval()
    ok = batch["image_mask"].clone()
    masked = {**batch, "image_mask": torch.zeros_like(ok), "vision_state": batch["vision_state"] * 100 + 1}
    imageless = {
        **batch,
        "image_mask": torch.zeros_like(ok),
        "vision_state": torch.zeros_like(batch["vision_state"]),
    }
    for key in ("patch_tokens", "global_embed", "region_feats"):
        imageless[key] = torch.zeros_like(batch[key])
    with torch.no_grad():
        a = model._emissions(masked, masked["image_mask"])[0]
        b = model._emissions(imageless, imageless["image_mask"])[0]
        seen = model._emissions(batch, ok)[0]
    assert torch.equal(a, b)
    assert not torch.equal(seen, b)  # a present image does move the output: the check is not vacuous


def _metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


@pytest.mark.slow
def test_a_run_evaluates_predicts_and_resumes_as_it_trained(data, tmp_path, monkeypatch):
    """train -> evaluate reproduces the test scores; predict (which re-extracts the images with the
    state) tags valid as training did; a kill after epoch 2's metrics, resumed, equals a straight run."""
    model = {"vision_trainable_blocks": 1, "use_regions": False}
    train = {"lr_vision": 1e-3}
    straight = train_from_cache(
        run_config(tmp_path / "straight", data["k2"], data["data"], epochs=2, train=train, **model)
    )
    record = json.loads((straight / "config.json").read_text())
    assert record["cache"]["vision_blocks"]["blocks"] == 2
    weights = load_file(straight / "model.safetensors")
    stored = CacheReader(data["k2"]).vision_blocks()[1]
    # The trained block moved; the frozen one is the cache's, kept in the run's weights for evaluate.
    assert not torch.equal(
        weights["vision_blocks.layers.0.mlp.fc1.weight"], torch.from_numpy(stored["layers.1.mlp.fc1.weight"])
    )
    assert torch.equal(
        weights["vision_blocks.frozen.0.mlp.fc1.weight"], torch.from_numpy(stored["layers.0.mlp.fc1.weight"])
    )

    check_evaluate_predict_resume(data, tmp_path, monkeypatch, straight, model, train)


def check_evaluate_predict_resume(data, tmp_path, monkeypatch, straight, model: dict, train: dict) -> None:
    """The run `straight` (2 epochs on data["k2"] with `model` and `train`): evaluate reproduces its test
    scores; predict (which re-extracts the images with the state) tags valid as training did; a kill after
    epoch 2's metrics, resumed, equals it."""
    trained = json.loads((straight / "results.json").read_text())
    assert evaluate_run(straight, split="test") == trained["test"]
    out = predict(straight, data["data"] / "valid.txt", data["data"] / "images", tmp_path / "valid.pred")
    pred = [line.split(" ")[2] for line in (straight / "pred_valid.conll").read_text().split("\n") if line]
    assert [tag for post in read_split(out).posts for tag in post.tags] == pred

    real_save = loop.save_checkpoint

    class Killed(Exception):
        pass

    def save_then_die(folder, model, optimizer, scheduler, scaler, progress, device, generator=None):
        if progress.epoch == 2:
            raise Killed
        real_save(folder, model, optimizer, scheduler, scaler, progress, device, generator)

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        train_from_cache(run_config(killed, data["k2"], data["data"], epochs=2, train=train, **model))
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    resumed = train_from_cache(
        run_config(killed, data["k2"], data["data"], epochs=2, train=train, resume=True, **model)
    )
    assert _metrics(resumed) == _metrics(straight)
    x, y = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(x[key], y[key]) for key in x)
    shutil.rmtree(killed)


def test_mango_as_its_file_sets_it_trains_the_last_two_clip_blocks_and_predicts(data, tmp_path):
    """`--model mango` as users get it (its file; tiny sizes): on a cache that stores the state before
    tiny-clip's 2 layers, both layers train at train.lr_vision 1e-5, and predict, which re-extracts the
    images with that state, tags valid as training did."""
    sizes = [f"model.{key}={value}" for key, value in TINY.items()]
    model_cfg, train_cfg = load_run_config(
        model="mango", overrides=[*sizes, "train.epochs=1", "train.batch_size=4", "train.device=cpu"]
    )
    assert (model_cfg.vision_trainable_blocks, train_cfg.lr_vision) == (2, 1e-5)
    source = DataConfig(data_dir=str(data["data"]))
    run = train_from_cache(RunConfig(model_cfg, train_cfg, str(data["k2"]), source, str(tmp_path / "mango")))
    record = json.loads((run / "config.json").read_text())
    assert record["model"]["vision_trainable_blocks"] == record["cache"]["vision_blocks"]["blocks"] == 2
    weights, stored = load_file(run / "model.safetensors"), CacheReader(data["k2"]).vision_blocks()[1]
    assert not any(name.startswith("vision_blocks.frozen.") for name in weights)
    for layer in (0, 1):
        name = f"layers.{layer}.self_attn.q_proj.weight"
        assert not torch.equal(weights[f"vision_blocks.{name}"], torch.from_numpy(stored[name])), name
    # MANGO reads the CLS token, not CLIP's pooled output: post_layernorm gets no gradient and stays as
    # stored (the original's unfreeze_last_vision_blocks unfreezes the encoder layers alone).
    name = "post_layernorm.weight"
    assert torch.equal(weights[f"vision_blocks.{name}"], torch.from_numpy(stored[name]))
    out = predict(run, data["data"] / "valid.txt", data["data"] / "images", tmp_path / "valid.pred")
    pred = [line.split(" ")[2] for line in (run / "pred_valid.conll").read_text().split("\n") if line]
    assert [tag for post in read_split(out).posts for tag in post.tags] == pred


def test_an_ablation_of_mango_trains_its_blocks_in_every_arm_that_reads_the_image(data, tmp_path):
    """`mner ablate --model mango` on a cache that stores the blocks' input: full and no_preserve train
    MANGO's 2 blocks, text_only (which reads no image) drops them and never opens the cache."""
    cfg = AblationConfig(
        cache_dir=str(data["k2"]),
        data=DataConfig(data_dir=str(data["data"])),
        text_encoder="tiny-bert",
        experiments=["full", "no_preserve", "text_only"],
        seeds=1,
        out_dir=str(tmp_path / "ablation"),
        overrides=[f"model.{key}={value}" for key, value in TINY.items() if key != "text_encoder"]
        + ["train.batch_size=4", "train.device=cpu"],
        epochs=1,
        model="mango",
    )
    run_ablation(cfg)
    for arm, blocks in (("full", 2), ("no_preserve", 2), ("text_only", 0)):
        record = json.loads((tmp_path / "ablation" / arm / "seed1" / "config.json").read_text())
        assert (record["model"]["name"], record["model"]["vision_trainable_blocks"]) == ("mango", blocks)
        assert (record["cache"] is None) == (arm == "text_only"), arm


def test_settings_that_train_nothing_are_refused(data):
    for changes, message in (
        (
            {"vision_trainable_blocks": -2},
            "model.vision_trainable_blocks must be >= 0, or -1 for all, got -2",
        ),
        (
            {"vision_trainable_blocks": 2, "text_only": True},
            "model.vision_trainable_blocks = 2 trains vision blocks, but model.text_only = true reads no "
            "image; set model.vision_trainable_blocks = 0",
        ),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            ModelConfig(**TINY, **changes)
    with pytest.raises(ValueError, match=re.escape("train.lr_vision must be > 0, got 0.0")):
        TrainConfig(lr_vision=0.0)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"cache {data['k0']} stores no vision state (extracted without --vision-trainable-blocks), so "
            "there is none to add to the items"
        ),
    ):
        PostDataset([], CacheReader(data["k0"]), vision_state=True)


def test_a_record_without_the_blocks_config_is_refused(data):
    """A config.json whose cache entry lost "vision_blocks" cannot rebuild the blocks' structure."""
    cfg = run_config(data["tmp"] / "unused", data["k2"], data["data"], vision_trainable_blocks=2, **TINY)
    record = make_record(
        cfg, cfg.data.resolve(), ["O", "B-LOC"], resolve_text_encoder("tiny-bert"), CacheReader(data["k2"])
    )
    with pytest.raises(
        ValueError,
        match=re.escape(
            "model.vision_trainable_blocks = 2 needs the vision blocks of a cache extracted with "
            "--vision-trainable-blocks; pass the cache's vision blocks config"
        ),
    ):
        build_model(record, "tiny-bert")
