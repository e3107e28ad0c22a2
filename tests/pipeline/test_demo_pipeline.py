"""The demo's promise, end to end through the stage functions: on the embedded demo (an entity's type shows
only in its post's image) every multimodal model of the zoo (afner, afdvqf, mango, ifaformer) reaches test
F1 >= text-only (bert-crf) F1 + 0.20, and the gap comes from the image path.

The demo is built smaller than the default (120/40/40 posts) and every model uses the tiny-bert preset with
the same settings over its own configs/models/<name>.toml,
so each model's run takes seconds on two busy CPU cores. The README's demo uses
MiniLM; here the question is only whether the cached image tokens carry the type signal through fusion
and the CRF to the predictions. Over demo seeds 7, 13, 21 and training seeds 1-5 the text-only test F1
was 0.14-0.29 (it finds the spans, type-blind F1 0.80-0.97, and guesses among four types), multimodal
0.89-0.99, and the multimodal model with its images masked 0.18-0.31: the bound holds with a wide margin.
With the zoo at its originals' defaults (demo seed 13, training seed 1, on a loaded 2-core machine):
text-only 0.29, afdvqf 1.00, afner 1.00, ifaformer 0.83, mango 0.66 with its gated update opened
(PER_MODEL; 0.61 once its dropout sat where the original's does, with its classifier a plain Linear); the
three added models cost about 45 s together. MANGO trains its last 2 CLIP blocks (its
default; the cache stores their input) and scored 0.66 with them as with them frozen (k = 0).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from mner.cache.datasets import DataConfig, resolve_data
from mner.cache.reader import CacheReader
from mner.demo.build import DemoConfig, build_demo
from mner.extract.config import ExtractConfig
from mner.extract.run import extract_features
from mner.runtime import resolve_runtime
from mner.train.engine.config import RunConfig
from mner.train.engine.config_files import load_run_config
from mner.train.engine.data import make_loader
from mner.train.engine.loop import train_from_cache
from mner.train.engine.metrics import entity_scores
from mner.train.engine.run_files import read_record, run_config
from mner.train.engine.runs import load_run_model

# Subprocess / end-to-end: outside the `pytest -m "not slow"` inner loop.
pytestmark = pytest.mark.slow

DEMO = {"n_train": 120, "n_valid": 40, "n_test": 40, "image_size": 48}
# Identical for every model but PER_MODEL_MODEL / PER_MODEL_TRAIN, set over its model file; the text-only
# run is bert-crf. Learning rates high enough that ten short epochs let the fusion learn image -> type
# (demo.toml raises lr_fusion for the same reason).
MODEL = {"text_encoder": "tiny-bert", "qfnet_heads": 2, "slots_per_type": 2, "max_length": 32}
TRAIN = {
    "epochs": 10,
    "batch_size": 8,
    "lr_encoder": 1e-3,
    "lr_fusion": 5e-3,
    "lr_crf": 5e-2,
    "patience": 4,
    "device": "cpu",
}
# MANGO at its original's init (gate_alpha_init 0.02, gate_bias_init -1.5) adds an update to the words
# that never grows enough to carry the image here: test F1 0.25 at the rates above, 0.04-0.24 over
# rates 1e-4..5e-2, 10-40 epochs, regions or CLS back, align/preserve off, temperature 1 (demo seed 13,
# training seed 1). Opened (1.0, 0.0) it reaches 0.66; one optimiser step per batch, since the demo has
# 15 batches an epoch and mango.toml's grad_accum 2 (the original's) leaves 7, stopped early at 0.00.
# Its classifier as the original's (model.emission_norm: LayerNorm + Linear with weights from N(0, 0.02))
# starts so small that the tiny-bert model predicts only O for 5 epochs here (test F1 0.00, stopped early;
# 0.19 without early stopping, 0.23 with the N(0, 0.02) init and no LayerNorm: the init is the slow part);
# with the plain Linear at PyTorch's init it reaches 0.61. The README's demo (MiniLM) keeps the original's.
PER_MODEL_MODEL = {"mango": {"gate_alpha_init": 1.0, "gate_bias_init": 0.0, "emission_norm": False}}
PER_MODEL_TRAIN = {"mango": {"grad_accum": 1}}
SEED = 1
TEXT_ONLY = "bert-crf"
MULTIMODAL = ("afner", "afdvqf", "mango", "ifaformer")
# The model whose images are masked in test_masking_the_images_takes_the_gain_away: the default.
MASKED = "afdvqf"
# The bound: the image must be worth at least 20 F1 points on the demo.
MIN_GAP = 0.20
# Type-blind F1 the text-only model reaches at least (measured 0.80-0.97): the spans are in the words.
MIN_SPAN_F1 = 0.6


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(data folder, cache folder): the seeded demo extracted with the untrained tiny presets."""
    root = tmp_path_factory.mktemp("demo")
    data_dir = build_demo(DemoConfig(out_dir=str(root / "data"), **DEMO))
    cache_dir = extract_features(
        ExtractConfig(
            data=DataConfig(data_dir=str(data_dir)),
            out=str(root / "cache"),
            num_workers=0,
            device="cpu",
            topk=8,
            vision_trainable_blocks=2,  # as run_pipeline.sh: the state mango's default trains from
        )
    )  # topk 8 instead of 20: fewer region tokens, same signal, a faster test
    return data_dir, cache_dir


def train(out_dir: Path, data_dir: Path, cache_dir: Path | None, seed: int, model: str) -> Path:
    """One run of `model` (a name of `mner models`) on the demo; text-only when cache_dir is None."""
    model_cfg, train_cfg = load_run_config(model=model)
    cfg = RunConfig(
        model=dataclasses.replace(
            model_cfg, **{**MODEL, **PER_MODEL_MODEL.get(model, {})}, text_only=cache_dir is None
        ),
        train=dataclasses.replace(train_cfg, **{**TRAIN, **PER_MODEL_TRAIN.get(model, {})}, seed=seed),
        cache_dir=None if cache_dir is None else str(cache_dir),
        data=DataConfig(data_dir=str(data_dir)),
        out_dir=str(out_dir),
    )
    return train_from_cache(cfg)


def recorded_f1(run_dir: Path) -> float:
    """Test micro F1 of the run's best epoch, as training wrote it into results.json."""
    return json.loads((run_dir / "results.json").read_text())["test"]["micro"]["f1"]


def type_blind_f1(run_dir: Path) -> float:
    """Test micro F1 of the run's best model with every entity type renamed to one: are the spans found?

    Reads pred_test.conll (`token gold pred`). Renaming cannot merge two spans here: the demo's gold
    tags are clean BIO and decoding forbids B-X -> I-Y.
    """
    gold, pred = [], []
    for block in (run_dir / "pred_test.conll").read_text(encoding="utf-8").strip().split("\n\n"):
        rows = [line.split()[-2:] for line in block.splitlines()]
        gold.append([_untyped(tag) for tag, _ in rows])
        pred.append([_untyped(tag) for _, tag in rows])
    return entity_scores(gold, pred)["micro"]["f1"]


def _untyped(tag: str) -> str:
    return tag if tag == "O" else f"{tag[:2]}ENTITY"


def f1_with_image_mask(run_dir: Path, data_dir: Path, cache_dir: Path, images: bool) -> float:
    """Test micro F1 of a multimodal run's best model; with images=False every post's image_mask is
    False, as if no image could be read, so the model sees no visual token at all."""
    record = read_record(run_dir)
    cfg = run_config(record)
    labels = record["label_names"]
    model, tokenizer = load_run_model(run_dir, record, resolve_runtime("cpu", "off"))
    split = resolve_data(data_dir=data_dir).read("test")
    with CacheReader(cache_dir) as reader:
        loader = make_loader(split, reader, tokenizer, labels, cfg.model, cfg.train, shuffle=False)
        predicted = []
        with torch.no_grad():
            for batch in loader:
                if not images:
                    batch["image_mask"] = torch.zeros_like(batch["image_mask"])  # (B,)
                predicted.extend([labels[i] for i in ids] for ids in model.decode(batch))
    return entity_scores([list(post.tags) for post in split.posts], predicted)["micro"]["f1"]


@pytest.fixture(scope="module")
def text_run(demo, tmp_path_factory):
    """The text-only run (bert-crf), trained once for every multimodal model's comparison."""
    data_dir, _ = demo
    return train(tmp_path_factory.mktemp("runs") / "text_only", data_dir, None, SEED, TEXT_ONLY)


@pytest.fixture(scope="module")
def multimodal_runs(demo, tmp_path_factory):
    """{model name: its run}, each trained on first use with the same encoder, settings and seed."""
    data_dir, cache_dir = demo
    root = tmp_path_factory.mktemp("runs")
    done: dict[str, Path] = {}

    def run(model: str) -> Path:
        if model not in done:
            done[model] = train(root / model, data_dir, cache_dir, SEED, model)
        return done[model]

    return run


@pytest.mark.parametrize("model", MULTIMODAL)
def test_multimodal_f1_is_at_least_twenty_points_above_text_only(text_run, multimodal_runs, model):
    text_f1, full_f1 = recorded_f1(text_run), recorded_f1(multimodal_runs(model))
    assert full_f1 >= text_f1 + MIN_GAP, (model, text_f1, full_f1)


def test_text_only_finds_the_spans_but_not_their_types(text_run):
    text_f1, blind_f1 = recorded_f1(text_run), type_blind_f1(text_run)
    assert blind_f1 >= MIN_SPAN_F1 and blind_f1 >= text_f1 + MIN_GAP, (blind_f1, text_f1)


def test_masking_the_images_takes_the_gain_away(demo, multimodal_runs):
    data_dir, cache_dir = demo
    full = multimodal_runs(MASKED)
    full_f1 = recorded_f1(full)
    # The scorer reproduces training's own test score when the images are kept ...
    assert f1_with_image_mask(full, data_dir, cache_dir, images=True) == pytest.approx(full_f1)
    # ... and without them the same weights lose the gain: it was the image that told the type.
    masked_f1 = f1_with_image_mask(full, data_dir, cache_dir, images=False)
    assert masked_f1 <= full_f1 - MIN_GAP, (masked_f1, full_f1)
