"""Tests for sentence classification (issue 12): classification_scores against a brute-force count,
the heads of train/zoo/classifier_model.py (missing images masked bitwise, the seed's shapes), the
classifier configs, and train_classifier end to end on the seeded MVSA demo (text vs both), on a csv
folder with a post given no image, and its refusals (a foreign folder, a cache of other data)."""

from __future__ import annotations

import csv
import json
import logging
import random
import re
import shlex
import shutil
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

import mner.train.engine.classify as classify
import mner.train.engine.loop as loop
import mner.train.report.ablation_tables as ablation_tables
from mner.cache.classification import (
    UNLABELLED_FILE,
    ClassDataConfig,
    csv_text,
    read_classification,
    read_csv_rows,
)
from mner.cache.datasets import DataConfig
from mner.cache.manifest import read_manifest
from mner.cache.reader import CacheReader
from mner.cache.verify import data_for_verify, verify_cache
from mner.cli import main
from mner.demo.classification import make_mvsa_demo
from mner.extract.config import ExtractConfig
from mner.extract.run import collect_images, extract_features
from mner.runtime import write_atomic
from mner.train.engine.classifier_config import ClassifierConfig, ClassifierRunConfig, load_classifier_config
from mner.train.engine.classify import SUBMISSION_FILE, submission_file, train_classifier
from mner.train.engine.loop import NonFiniteLoss
from mner.train.engine.metrics import classification_scores
from mner.train.engine.run_files import load_run
from mner.train.engine.scores import read_pred_csv
from mner.train.report.ablate import run_ablation
from mner.train.report.class_ablation import ClassAblationConfig
from mner.train.report.evaluate import evaluate_classifier
from mner.train.report.predict import predict_classifier
from mner.train.report.results import results_table
from mner.train.zoo.classifier_model import (
    CLASS_HEADS,
    ClassifierHead,
    SeedCNN,
    SentenceClassifier,
    pool_text,
)
from tests.cache.factories import make_cache

REPO = Path(__file__).resolve().parents[3]
# configs/classify/demo.toml's settings, with tiny-bert's learning rate (a random 2-layer BERT needs a
# larger step than MiniLM to learn the cue phrases in 8 epochs).
DEMO_SETTINGS = dict(epochs=8, patience=8, batch_size=16, lr_head=1e-2, lr_encoder=1e-3, device="cpu")
# Small, fast settings for the runs whose scores do not matter.
QUICK = dict(text_encoder="tiny-bert", epochs=1, batch_size=8, max_length=32, device="cpu")


def extract(data_dir: Path, out: Path, blocks: int = 1) -> Path:
    """The classification folder's images through tiny-resnet, no detector (the seed's global vector),
    storing layer3's map (--vision-trainable-blocks 1, `blocks`), so that the classifier's default trains
    layer4; blocks = 0 stores none."""
    cfg = ExtractConfig(
        data=DataConfig(data_dir=str(data_dir)),
        out=str(out),
        vision="tiny-resnet",
        detector="none",
        batch_size=8,
        num_workers=0,
        device="cpu",
        vision_trainable_blocks=blocks,
    )
    return extract_features(cfg)


def run_config(data_dir: Path, out: Path, cache: Path | None, **settings) -> ClassifierRunConfig:
    return ClassifierRunConfig(
        data=ClassDataConfig(str(data_dir)),
        out_dir=str(out),
        classifier=ClassifierConfig(**settings),
        cache_dir=None if cache is None else str(cache),
    )


def split_file(path: Path) -> list[list[str]]:
    """The rows of a `guid,...` file after its header (the header is checked by the callers)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.split(",") for line in lines[1:]]


def all_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refuse_cache(*args, **kwargs):
    raise AssertionError("text mode opened the feature cache")


# ============================================================================ classification_scores


def reference_scores(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    """Every number of classification_scores, counted the slow way."""
    pairs = list(zip(gold, pred))
    per_class = {}
    for label in labels:
        correct = sum(g == label and p == label for g, p in pairs)
        predicted = sum(p == label for _, p in pairs)
        support = sum(g == label for g, _ in pairs)
        precision = correct / predicted if predicted else 0.0
        recall = correct / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = dict(
            precision=precision,
            recall=recall,
            f1=f1,
            support=support,
            predicted=predicted,
            correct=correct,
        )
    seen = [label for label in labels if per_class[label]["support"] or per_class[label]["predicted"]]
    macro = {
        f"macro_{key}": sum(per_class[label][key] for label in seen) / len(seen)
        for key in ("precision", "recall", "f1")
    }
    matrix = [[sum(g == a and p == b for g, p in pairs) for b in labels] for a in labels]
    return {
        "accuracy": sum(g == p for g, p in pairs) / len(pairs),
        **macro,
        "support": len(pairs),
        "per_class": per_class,
        "matrix": matrix,
        "seen": seen,
    }


# Not sorted, so that following the given order is checked; "sad" is never predicted, "surprise" never
# gold, "unused" neither.
SCORE_LABELS = ["neutral", "sad", "anger", "unused", "joy", "surprise"]


def random_labels(seed: int, n: int = 60) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    gold = [rng.choice(["neutral", "sad", "anger", "joy"]) for _ in range(n)]
    pred = [
        g if g != "sad" and rng.random() < 0.5 else rng.choice(["neutral", "anger", "joy", "surprise"])
        for g in gold
    ]
    return gold, pred


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_classification_scores_match_a_brute_force_count(seed):
    gold, pred = random_labels(seed)
    want = reference_scores(gold, pred, SCORE_LABELS)
    got = classification_scores(gold, pred, SCORE_LABELS)

    assert got["accuracy"] == pytest.approx(want["accuracy"], rel=1e-12)
    assert got["support"] == want["support"] == len(gold)
    assert list(got["per_class"]) == SCORE_LABELS
    for label in SCORE_LABELS:
        for key, value in want["per_class"][label].items():
            assert got["per_class"][label][key] == pytest.approx(value, rel=1e-12), (label, key)
    for key in ("macro_precision", "macro_recall", "macro_f1"):
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    # rows gold, columns predicted, in the given label order
    assert got["confusion"] == {"labels": SCORE_LABELS, "matrix": want["matrix"]}
    assert sum(map(sum, got["confusion"]["matrix"])) == len(gold)

    # The case the test data was built for: a gold label never predicted, a predicted label never gold.
    sad, surprise, unused = (got["per_class"][label] for label in ("sad", "surprise", "unused"))
    assert sad["support"] > 0 and sad["predicted"] == 0 and sad["recall"] == sad["f1"] == 0.0
    assert surprise["support"] == 0 and surprise["predicted"] > 0 and surprise["precision"] == 0.0
    assert unused["support"] == unused["predicted"] == 0
    # The macro averages run over the 5 labels in gold or pred: "unused" does not pull them down ...
    assert want["seen"] == [label for label in SCORE_LABELS if label != "unused"]
    over_all = sum(s["f1"] for s in got["per_class"].values()) / len(SCORE_LABELS)
    assert got["macro_f1"] > over_all
    # ... but the never-predicted and the never-gold labels do count (as zeros).
    over_some = [
        s["f1"] for label, s in got["per_class"].items() if label not in ("unused", "sad", "surprise")
    ]
    assert got["macro_f1"] < sum(over_some) / len(over_some)


@pytest.mark.parametrize("seed", [0, 5])
def test_classification_scores_agree_with_scikit_learn(seed):
    from sklearn import metrics  # a declared test dependency (setup.cfg [test]): never skipped

    gold, pred = random_labels(seed)
    got = classification_scores(gold, pred, SCORE_LABELS)
    precision, recall, f1, _ = metrics.precision_recall_fscore_support(
        gold, pred, average="macro", zero_division=0
    )
    assert (got["macro_precision"], got["macro_recall"], got["macro_f1"]) == pytest.approx(
        (precision, recall, f1), rel=1e-12
    )
    assert got["accuracy"] == pytest.approx(metrics.accuracy_score(gold, pred), rel=1e-12)
    assert got["confusion"]["matrix"] == metrics.confusion_matrix(gold, pred, labels=SCORE_LABELS).tolist()


def test_classification_scores_of_a_perfect_and_an_empty_split():
    gold, _ = random_labels(7)
    perfect = classification_scores(gold, gold, SCORE_LABELS)
    assert perfect["accuracy"] == perfect["macro_f1"] == perfect["macro_precision"] == 1.0
    assert all(perfect["confusion"]["matrix"][i][j] == 0 for i in range(6) for j in range(6) if i != j)
    empty = classification_scores([], [], SCORE_LABELS)
    assert empty["accuracy"] == empty["macro_f1"] == 0.0 and empty["support"] == 0
    assert empty["confusion"]["matrix"] == [[0] * 6 for _ in range(6)]


@pytest.mark.parametrize(
    "gold, pred, message",
    [
        (["joy", "sad", "joy"], ["joy", "sad"], "gold has 3 posts but pred has 2"),
        (["joy"], ["joy", "joy"], "gold has 1 posts but pred has 2"),
        (["joy", "sad"], ["joy", "happy"], "post 1: predicted label 'happy' is not one of"),
        (["glad", "sad"], ["joy", "sad"], "post 0: gold label 'glad' is not one of"),
    ],
)
def test_classification_scores_refuse_bad_input(gold, pred, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        classification_scores(gold, pred, SCORE_LABELS)


# ============================================================================ heads: masked images

B, DT, DI, P, NL = 6, 8, 12, 3, 3  # batch, text width, image width, patch tokens (xattn), labels
HAS_IMAGE = torch.tensor([True, False, True, False, False, True])


def tiny_head(head: str, mode: str = "both", seed: int = 0) -> ClassifierHead:
    torch.manual_seed(seed)
    return ClassifierHead(head, mode, DT, DI, NL, hidden=16, dropout=0.5, heads=2).eval()


def image_shape(head: str, mode: str) -> tuple[int, ...]:
    return (B, P, DI) if head == "xattn" and mode == "both" else (B, DI)


def fill(kind: str, shape, generator) -> torch.Tensor:
    """What a cache may hold for a post without a usable image: anything, non-finite values included."""
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "random":
        return torch.randn(shape, generator=generator)
    if kind == "huge":
        return torch.randn(shape, generator=generator).sign() * 1e30
    return torch.full(shape, float(kind))  # "inf", "-inf", "nan"


def no_image_reference(head: ClassifierHead, text: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """By hand, from the head's own layers: what it must give a post that has no image."""
    if head.head == "cnn":
        return head.cnn(torch.cat([text, zeros], dim=1))
    if head.head == "xattn":
        return head.out(head.norm(text))
    return head.mlp_both(text, zeros)  # mlp; attention: weights exactly (1, 0)


@pytest.mark.parametrize("head_name", CLASS_HEADS)
@torch.no_grad()
def test_a_masked_image_changes_no_logit_bitwise(head_name):
    head = tiny_head(head_name)
    g = torch.Generator().manual_seed(1)
    text = torch.randn(B, DT, generator=g)
    shape = image_shape(head_name, "both")
    base = torch.randn(shape, generator=g)
    masked = ~HAS_IMAGE

    outputs = {}
    for kind in ("zeros", "random", "huge", "inf", "-inf", "nan"):
        image = base.clone()
        image[masked] = fill(kind, image[masked].shape, g)
        outputs[kind] = head(text, image, HAS_IMAGE)
        assert outputs[kind].shape == (B, NL)
    reference = outputs["zeros"]
    for kind, logits in outputs.items():
        assert torch.equal(logits[masked], reference[masked]), kind
        assert torch.isfinite(logits).all(), kind
    # The posts that have their image see it: a new image changes their logits, not the others'.
    changed = base.clone()
    changed[HAS_IMAGE] = torch.randn(changed[HAS_IMAGE].shape, generator=g)
    other = head(text, changed, HAS_IMAGE)
    assert torch.equal(other[masked], reference[masked])
    for i in torch.nonzero(HAS_IMAGE).flatten().tolist():
        assert not torch.allclose(other[i], reference[i]), i
    # ... and a masked post gets exactly what the head gives without any image.
    by_hand = no_image_reference(head, text, torch.zeros(B, DI))
    assert torch.equal(reference[masked], by_hand[masked])


@torch.no_grad()
def test_attention_weights_are_a_softmax_over_the_two_modalities():
    head = tiny_head("attention")
    g = torch.Generator().manual_seed(2)
    text, image = torch.randn(B, DT, generator=g), torch.randn(B, DI, generator=g)
    got = head(text, image, HAS_IMAGE)
    scores = torch.cat([head.attention_text(text), head.attention_image(image)], dim=1)  # (B, 2)
    weights = torch.softmax(scores, dim=1)
    want = head.mlp_both(weights[:, :1] * text, weights[:, 1:] * image)
    assert torch.allclose(got[HAS_IMAGE], want[HAS_IMAGE], atol=1e-6)
    # Not the seed's per-score softmax (always 1, weights doing nothing): that gives other logits.
    seed_way = head.mlp_both(text, image)
    assert not torch.allclose(got[HAS_IMAGE], seed_way[HAS_IMAGE], atol=1e-4)
    # Masked: exactly mlp_both(text, zeros).
    assert torch.equal(got[~HAS_IMAGE], head.mlp_both(text, torch.zeros(B, DI))[~HAS_IMAGE])


@pytest.mark.parametrize("head_name", CLASS_HEADS)
@torch.no_grad()
def test_image_mode_scores_a_masked_post_as_a_zero_image(head_name):
    head = tiny_head(head_name, mode="image")
    g = torch.Generator().manual_seed(3)
    base = torch.randn(B, DI, generator=g)
    zeros = base.clone()
    zeros[~HAS_IMAGE] = 0.0
    want = head(None, zeros, torch.ones(B, dtype=torch.bool))
    for kind in ("random", "huge", "nan"):
        image = base.clone()
        image[~HAS_IMAGE] = fill(kind, image[~HAS_IMAGE].shape, g)
        assert torch.equal(head(None, image, HAS_IMAGE), want), kind


@pytest.mark.parametrize("head_name", CLASS_HEADS)
@torch.no_grad()
def test_text_mode_reads_no_image(head_name):
    head = tiny_head(head_name, mode="text")
    text = torch.randn(B, DT, generator=torch.Generator().manual_seed(4))
    logits = head(text, None, None)
    assert logits.shape == (B, NL)
    want = head.cnn(text) if head_name == "cnn" else head.mlp_text(text)
    assert torch.equal(logits, want)


# ============================================================================ heads: the seed's shapes

SEED_TEXT, SEED_IMAGE, SEED_HIDDEN, SEED_LABELS = 768, 2048, 512, 3  # BERT-base, ResNet avgpool


def seed_head(head: str, mode: str) -> ClassifierHead:
    torch.manual_seed(0)
    return ClassifierHead(head, mode, SEED_TEXT, SEED_IMAGE, SEED_LABELS, hidden=SEED_HIDDEN, heads=4).eval()


def linears(module: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, nn.Linear)]


def test_the_cnn_head_has_the_seeds_layers():
    head = seed_head("cnn", "both")
    layers = list(head.cnn.net)
    convs = [
        (m.in_channels, m.out_channels, m.kernel_size, m.padding) for m in layers if isinstance(m, nn.Conv1d)
    ]
    assert convs == [(1, 32, (3,), (1,)), (32, 64, (3,), (1,))]
    assert [type(m) for m in layers] == [
        nn.Conv1d, nn.ReLU, nn.MaxPool1d, nn.Conv1d, nn.ReLU, nn.MaxPool1d, nn.Flatten, nn.Linear,
    ]  # fmt: skip
    final = layers[-1]
    assert final.in_features == 64 * ((SEED_TEXT + SEED_IMAGE) // 4) == 45056
    assert final.out_features == SEED_LABELS
    # One modality: its own width.
    assert seed_head("cnn", "text").cnn.net[-1].in_features == 64 * (SEED_TEXT // 4)
    assert seed_head("cnn", "image").cnn.net[-1].in_features == 64 * (SEED_IMAGE // 4)


def test_the_mlp_heads_have_the_seeds_layers():
    both = seed_head("mlp", "both")
    assert linears(both) == [(SEED_TEXT + SEED_IMAGE, SEED_HIDDEN), (SEED_HIDDEN, SEED_LABELS)]
    assert (both.mlp_both.hidden.in_features, both.mlp_both.hidden.out_features) == (2816, 512)
    assert linears(seed_head("mlp", "text")) == [(SEED_TEXT, SEED_LABELS)]
    assert linears(seed_head("mlp", "image")) == [(SEED_IMAGE, SEED_LABELS)]
    # Nothing else is built: a single Linear's parameters, no unused mlp_both in a single mode.
    text = seed_head("mlp", "text")
    assert sum(p.numel() for p in text.parameters()) == SEED_TEXT * SEED_LABELS + SEED_LABELS
    attention = seed_head("attention", "both")
    assert sorted(linears(attention)) == sorted(
        [(SEED_TEXT + SEED_IMAGE, SEED_HIDDEN), (SEED_HIDDEN, SEED_LABELS), (SEED_TEXT, 1), (SEED_IMAGE, 1)]
    )


@pytest.mark.parametrize("mode", ["text", "image", "both"])
@pytest.mark.parametrize("head_name", CLASS_HEADS)
@torch.no_grad()
def test_every_head_gives_batch_by_labels_at_the_seeds_sizes(head_name, mode):
    head = seed_head(head_name, mode)
    g = torch.Generator().manual_seed(0)
    text = torch.randn(2, SEED_TEXT, generator=g) if mode != "image" else None
    image = None
    if mode != "text":
        shape = (2, 49, SEED_IMAGE) if head.reads_tokens else (2, SEED_IMAGE)
        image = torch.randn(shape, generator=g)
    has_image = torch.tensor([True, False]) if mode != "text" else None
    assert head(text, image, has_image).shape == (2, SEED_LABELS)
    assert head.reads_tokens == (head_name == "xattn" and mode == "both")


def test_heads_refuse_bad_settings():
    with pytest.raises(ValueError, match="unknown classifier head 'rnn'"):
        ClassifierHead("rnn", "both", DT, DI, NL)
    with pytest.raises(ValueError, match="unknown mode 'audio'"):
        ClassifierHead("mlp", "audio", DT, DI, NL)
    with pytest.raises(ValueError, match="at least 4 values, got 3"):
        SeedCNN(3, NL)
    with pytest.raises(ValueError, match="text width 10 is not divisible by 4 heads"):
        ClassifierHead("xattn", "both", 10, DI, NL, heads=4)


def test_pool_text_against_a_loop():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    assert torch.equal(pool_text(hidden, mask, "cls"), hidden[:, 0])
    mean = pool_text(hidden, mask, "mean")
    for i in range(3):
        real = [hidden[i, j] for j in range(5) if mask[i, j]]
        assert torch.allclose(mean[i], sum(real) / len(real), atol=1e-6)
    # Padding does not count, whatever it holds.
    padded = hidden.clone()
    padded[mask == 0] = 1e6
    assert torch.allclose(pool_text(padded, mask, "mean"), mean, atol=1e-6)
    with pytest.raises(ValueError, match="unknown text_pool 'max'"):
        pool_text(hidden, mask, "max")


class FakeEncoder(nn.Module):
    """Embeds ids: last_hidden_state (B, S, DT)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, DT)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))


def test_sentence_classifier_loss_is_the_weighted_cross_entropy():
    torch.manual_seed(0)
    head = tiny_head("mlp")
    weights = torch.tensor([0.5, 1.0, 2.0])
    model = SentenceClassifier(FakeEncoder(), head, "mean", weights).eval()
    g = torch.Generator().manual_seed(5)
    batch = {
        "input_ids": torch.randint(0, 20, (B, 4), generator=g),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]] * 3),
        "image": torch.randn(B, DI, generator=g),
        "has_image": HAS_IMAGE,
        "labels": torch.tensor([0, 1, 2, 2, 1, 0]),
    }
    out = model(batch)
    text = pool_text(model.encoder.embed(batch["input_ids"]), batch["attention_mask"], "mean")
    assert torch.allclose(out["logits"], head(text, batch["image"], HAS_IMAGE), atol=1e-6)
    want = nn.functional.cross_entropy(out["logits"], batch["labels"], weight=weights)
    assert torch.allclose(out["loss"], want)
    assert not torch.allclose(out["loss"], nn.functional.cross_entropy(out["logits"], batch["labels"]))
    assert "loss" not in model({k: v for k, v in batch.items() if k != "labels"})


# ============================================================================ configs


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("mode", "x", "classifier.mode must be one of text, image, both; got 'x'"),
        ("head", "rnn", "classifier.head must be one of mlp, cnn, attention, xattn"),
        ("text_pool", "max", "classifier.text_pool must be one of cls, mean"),
        ("image_feature", "regions", "classifier.image_feature must be one of global, patches"),
        ("class_weights", "inverse", "classifier.class_weights must be one of none, balanced"),
        ("select", "loss", "classifier.select must be one of macro_f1, accuracy"),
        ("epochs", 0, "classifier.epochs must be >= 1, got 0"),
        ("batch_size", 0, "classifier.batch_size must be >= 1"),
        ("patience", 0, "classifier.patience must be >= 1"),
        ("max_length", 0, "classifier.max_length must be >= 1"),
        ("hidden_size", -1, "classifier.hidden_size must be >= 1"),
        ("attention_heads", 0, "classifier.attention_heads must be >= 1"),
        ("lr_head", 0.0, "classifier.lr_head must be > 0"),
        ("lr_encoder", -1e-5, "classifier.lr_encoder must be > 0"),
        ("max_grad_norm", -1.0, "classifier.max_grad_norm must be >= 0, got -1.0"),
        ("image_norm", "l2", "classifier.image_norm must be one of standard, none; got 'l2'"),
        ("schedule", "step", "classifier.schedule must be one of cosine, linear; got 'step'"),
        ("lr_head", float("nan"), "classifier.lr_head must be a finite number"),
        ("lr_head", float("inf"), "classifier.lr_head must be a finite number"),
        ("lr_encoder", float("-inf"), "classifier.lr_encoder must be a finite number"),
        ("dropout", float("nan"), "classifier.dropout must be a finite number"),
        ("dropout", 1.0, "classifier.dropout and classifier.warmup_ratio must be in [0, 1)"),
        ("warmup_ratio", -0.1, "classifier.dropout and classifier.warmup_ratio must be in [0, 1)"),
        ("weight_decay", -0.1, "classifier.weight_decay must be >= 0, got -0.1"),
        ("seed", -1, "classifier.seed must be >= 0, got -1"),
        ("threads", -2, "classifier.threads must be >= 0, got -2"),
        ("device", "gpu", "classifier.device must be auto, cpu, mps, cuda or cuda:N; got 'gpu'"),
        ("epochs", "3", "classifier.epochs must be"),
        ("epochs", True, "classifier.epochs must be"),
        ("mode", 1, "classifier.mode must be"),
    ],
)
def test_classifier_config_names_the_bad_key(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ClassifierConfig(**{field: value})


def test_classifier_config_takes_an_int_for_a_float_and_round_trips():
    cfg = ClassifierConfig(lr_head=1, mode="text", head="cnn")
    assert cfg.lr_head == 1.0 and isinstance(cfg.lr_head, float)
    assert ClassifierConfig.from_dict(cfg.to_dict()) == cfg


def test_load_classifier_config_layers_file_then_set_then_options(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[classifier]\nepochs = 3\nlr_head = 0.5\nhead = 'cnn'\n")
    cfg = load_classifier_config(
        toml, ["classifier.epochs=4", "classifier.text_encoder=tiny-bert"], epochs=None
    )
    assert (cfg.epochs, cfg.lr_head, cfg.head, cfg.text_encoder) == (4, 0.5, "cnn", "tiny-bert")
    assert load_classifier_config(toml, ["classifier.epochs=4"], epochs=6, head=None).epochs == 6
    assert load_classifier_config() == ClassifierConfig()


def test_the_demo_config_file_loads_as_written():
    path = REPO / "configs" / "classify" / "demo.toml"
    table = tomllib.loads(path.read_text())["classifier"]
    cfg = load_classifier_config(path)
    assert {key: getattr(cfg, key) for key in table} == table


@pytest.mark.parametrize(
    "overrides, toml, message",
    [
        (["classifier.nope=1"], None, "--set classifier.nope=1: unknown key classifier.nope; known keys:"),
        (["train.epochs=2"], None, "--set train.epochs=2: unknown section [train]; expected [classifier]"),
        (["classifier.lr_head=nan"], None, "classifier.lr_head must be a finite number"),
        (["classifier.lr_encoder=inf"], None, "classifier.lr_encoder must be a finite number"),
        (["classifier.epochs"], None, "expected section.key=value"),
        ([], "[classifier]\nnope = 1\n", "c.toml: unknown key classifier.nope"),
        ([], "[model]\nepochs = 1\n", "c.toml: unknown section [model]; expected [classifier]"),
        ([], "[classifier]\nlr_head = nan\n", "classifier.lr_head must be a finite number"),
    ],
)
def test_load_classifier_config_names_the_bad_key(tmp_path, overrides, toml, message):
    path = None
    if toml is not None:
        path = tmp_path / "c.toml"
        path.write_text(toml)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_classifier_config(path, overrides)


def test_unknown_option_setting_is_named():
    with pytest.raises(ValueError, match=re.escape("the options: unknown key classifier.heads")):
        load_classifier_config(heads=2)


def test_run_config_needs_a_cache_unless_text(tmp_path):
    data = ClassDataConfig(str(tmp_path))
    for mode in ("both", "image"):
        with pytest.raises(ValueError, match=rf"mode {mode} reads images .*--cache DIR"):
            ClassifierRunConfig(data=data, out_dir="run", classifier=ClassifierConfig(mode=mode))
    text = ClassifierRunConfig(data=data, out_dir="run", classifier=ClassifierConfig(mode="text"))
    assert text.to_dict()["cache_dir"] is None and text.to_dict()["classifier"]["mode"] == "text"
    with pytest.raises(ValueError, match="out_dir must name the run folder"):
        ClassifierRunConfig(data=data, out_dir="", cache_dir="c")
    with pytest.raises(ValueError, match="data must be a ClassDataConfig"):
        ClassifierRunConfig(data=str(tmp_path), out_dir="run", cache_dir="c")


# ============================================================================ end to end: the demo


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The 300-post demo (built by `mner demo-data --classification`), its tiny-resnet cache, a text
    run through `mner train-classifier` (given a cache that does not exist, with CacheReader made to
    fail) and a both/mlp run through train_classifier."""
    root = tmp_path_factory.mktemp("mvsa")
    demo = root / "demo"
    built = CliRunner().invoke(
        main, ["demo-data", "--classification", "--out", str(demo), "--seed", "0", "--posts", "300"]
    )
    assert built.exit_code == 0, built.output
    cache = extract(demo, root / "cache")
    sets = [f"--set=classifier.{key}={value}" for key, value in DEMO_SETTINGS.items()]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(classify, "CacheReader", refuse_cache)
        text = CliRunner().invoke(
            main,
            [
                "train-classifier", "--data-dir", str(demo), "--cache", str(root / "no-such-cache"),
                "--mode", "text", "--text-encoder", "tiny-bert", *sets, "--out", str(root / "text"),
            ],
        )  # fmt: skip
    assert text.exit_code == 0, text.output
    both = train_classifier(
        run_config(
            demo, root / "both", cache, mode="both", head="mlp", text_encoder="tiny-bert", **DEMO_SETTINGS
        )
    )
    return SimpleNamespace(root=root, demo=demo, cache=cache, text=root / "text", both=both, cli=text)


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.mark.slow
def test_the_cli_demo_is_make_mvsa_demo(demo_runs, tmp_path):
    direct = make_mvsa_demo(tmp_path / "direct", seed=0, n=300)
    assert all_bytes(demo_runs.demo) == all_bytes(direct)


@pytest.mark.slow
def test_both_beats_text_by_the_issue_margin(demo_runs):
    text, both = results(demo_runs.text)["test"]["accuracy"], results(demo_runs.both)["test"]["accuracy"]
    assert both >= text + 0.15, (text, both)


@pytest.mark.slow
def test_text_mode_never_opens_the_cache(demo_runs):
    """The fixture's text run had CacheReader replaced by a function that fails, and a --cache that
    does not exist: it trained anyway, and the CLI dropped the cache from the record."""
    assert f"run written to {demo_runs.text}" in demo_runs.cli.output
    config = json.loads((demo_runs.text / "config.json").read_text())
    assert config["cache_dir"] is None and config["cache"] is None and config["no_image"] == {}
    assert not (demo_runs.root / "no-such-cache").exists()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["text", "both"])
def test_run_folder_config(demo_runs, which):
    run = getattr(demo_runs, which)
    assert load_run(run).task.name == "classification"
    config = json.loads((run / "config.json").read_text())
    data = read_classification(ClassDataConfig(str(demo_runs.demo)))
    assert config["task"] == "classification"
    assert (
        config["classifier"]
        == ClassifierConfig(mode=which, text_encoder="tiny-bert", **DEMO_SETTINGS).to_dict()
    )
    assert config["label_names"] == list(data.labels) == sorted(data.splits["train"].label_counts())
    assert config["data_report"]["sizes"] == {name: len(s.examples) for name, s in data.splits.items()}
    assert config["data_report"]["split_made"]["valid"] == len(data.splits["valid"].examples)
    assert config["data_report"]["fallbacks"] == data.report.fallbacks
    assert config["encoder_dir"] is not None
    if which == "both":
        with CacheReader(demo_runs.cache) as reader:
            assert config["cache"]["fingerprint"] == reader.fingerprint
            assert config["cache_dir"] == str(demo_runs.cache)
            want = {n: sum(reader.status(e.guid) != "ok" for e in s.examples) for n, s in data.splits.items()}
        assert config["no_image"] == want
    assert (run / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["text", "both"])
def test_run_folder_scores_and_predictions(demo_runs, which):
    run = getattr(demo_runs, which)
    data = read_classification(ClassDataConfig(str(demo_runs.demo)))
    labels = list(data.labels)
    scores = results(run)
    for split in ("valid", "test"):
        for key in ("accuracy", "macro_f1"):
            assert 0.0 <= scores[split][key] <= 1.0, (split, key)
        assert scores[split]["support"] == len(data.splits[split].examples)
    assert 1 <= scores["best_epoch"] <= scores["epochs_run"] <= DEMO_SETTINGS["epochs"]

    # pred_test.csv: guid,gold,pred, one row per test example in test.txt's order ...
    lines = (run / "pred_test.csv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "guid,gold,pred"
    rows = [line.split(",") for line in lines[1:]]
    test_file = split_file(demo_runs.demo / "test.txt")
    assert [r[:2] for r in rows] == test_file
    assert all(r[2] in labels for r in rows)
    # ... whose scores are results.json's, as scikit-learn computes them from the same predictions.
    from sklearn import metrics  # a declared test dependency (setup.cfg [test])

    gold, pred = [r[1] for r in rows], [r[2] for r in rows]
    assert scores["test"]["accuracy"] == pytest.approx(metrics.accuracy_score(gold, pred), rel=1e-12)
    macro = metrics.f1_score(gold, pred, labels=labels, average="macro", zero_division=0)
    assert scores["test"]["macro_f1"] == pytest.approx(macro, rel=1e-12)
    valid_rows = split_file(run / "pred_valid.csv")
    assert [r[0] for r in valid_rows] == [e.guid for e in data.splits["valid"].examples]

    # The submission: guid,tag in test_without_label.txt's order.
    submission = (run / SUBMISSION_FILE).read_text(encoding="utf-8").splitlines()
    assert submission[0] == "guid,tag"
    unlabelled = split_file(demo_runs.demo / UNLABELLED_FILE)
    got = [line.split(",") for line in submission[1:]]
    assert [g for g, _ in got] == [g for g, _ in unlabelled]
    assert all(tag in labels for _, tag in got)

    # metrics.jsonl: one line per epoch; the best epoch's valid score is the reloaded weights' score.
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == list(range(1, scores["epochs_run"] + 1))
    f1s = [e["valid_macro_f1"] for e in epochs]
    assert scores["best_epoch"] == f1s.index(max(f1s)) + 1
    assert epochs[scores["best_epoch"] - 1]["best"]
    assert scores["valid"]["macro_f1"] == max(f1s)
    assert scores["valid"]["accuracy"] == epochs[scores["best_epoch"] - 1]["valid_accuracy"]


@pytest.mark.slow
def test_a_finished_run_is_not_overwritten(demo_runs):
    before = all_bytes(demo_runs.both)
    cfg = run_config(demo_runs.demo, demo_runs.both, demo_runs.cache, mode="both", **QUICK)
    with pytest.raises(ValueError, match="already holds a classifier run"):
        train_classifier(cfg)
    assert all_bytes(demo_runs.both) == before


@pytest.mark.slow
def test_a_killed_run_is_called_unfinished_by_a_rerun_and_by_evaluate(demo_runs, tmp_path, caplog):
    killed = tmp_path / "killed"
    shutil.copytree(demo_runs.both, killed)
    (killed / "results.json").unlink()  # killed before the end: config.json and the best weights so far
    cfg = run_config(demo_runs.demo, killed, demo_runs.cache, mode="both", **QUICK)
    with pytest.raises(ValueError) as refused:
        train_classifier(cfg)
    assert str(refused.value) == (
        f"{killed} holds an unfinished classifier run (config.json but no results.json: it was stopped before "
        "the end); pass --resume to continue it or choose another --out"
    )
    with caplog.at_level(logging.WARNING):
        evaluate_classifier(killed, split="test", device="cpu")
    done = len((killed / "metrics.jsonl").read_text().splitlines())
    epochs = json.loads((killed / "config.json").read_text())["classifier"]["epochs"]
    assert (
        f"{killed} is an unfinished (epoch {done}/{epochs}) run (no results.json: training stopped before the end)"
        in caplog.text
    )


@pytest.mark.slow
def test_the_cli_needs_a_cache_for_both(demo_runs, tmp_path):
    result = CliRunner().invoke(
        main, ["train-classifier", "--data-dir", str(demo_runs.demo), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 1 and "--cache DIR" in result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_evaluate_and_predict_commands_take_the_classifier_path_by_the_run_record(demo_runs, tmp_path):
    """`mner evaluate` / `mner predict` read the run's task: a classifier run is scored as one (its
    eval folder named in the output) and refuses the tagging options, naming them as flags."""
    run = demo_runs.both
    result = CliRunner().invoke(main, ["evaluate", str(run), "--split", "test"])
    assert result.exit_code == 0, result.output
    [folder] = (run / "eval").glob("test-*")
    assert result.output.startswith(f"{run} on test (written to {folder}):\n")
    refused = CliRunner().invoke(main, ["evaluate", str(run), "--amp", "off"])
    assert refused.exit_code == 1 and refused.output.strip().splitlines()[-1] == (
        "Error: --amp, --long-posts and --text-cache apply to tagging runs, not to a classifier run"
    )
    source = demo_runs.demo / "test.txt"
    args = ["predict", str(run), "--input", str(source), "--out", str(tmp_path / "pred.txt")]
    refused = CliRunner().invoke(main, [*args, "--image-dir", str(tmp_path)])
    assert refused.exit_code == 1 and refused.output.strip().splitlines()[-1] == (
        "Error: --image-dir, --amp and --long-posts apply to tagging runs; a classifier run reads images "
        "from --cache"
    )
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0 and done.output == f"predictions written to {tmp_path / 'pred.txt'}\n"


# ============================================================================ small runs and refusals


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A 24-post demo and its cache, for runs whose scores do not matter."""
    root = tmp_path_factory.mktemp("small")
    demo = make_mvsa_demo(root / "demo", seed=0, n=24)
    return SimpleNamespace(root=root, demo=demo, cache=extract(demo, root / "cache"))


@pytest.mark.parametrize(
    "settings",
    [
        dict(mode="both", head="cnn"),
        dict(mode="both", head="attention", text_pool="mean"),
        dict(mode="both", head="xattn", attention_heads=2),
        dict(mode="both", head="mlp", image_feature="patches", class_weights="balanced", select="accuracy"),
        dict(mode="image", head="mlp"),
    ],
    ids=["cnn", "attention", "xattn", "patches-balanced", "image"],
)
@pytest.mark.slow
def test_every_head_and_mode_trains_end_to_end(small, tmp_path, settings):
    run = train_classifier(run_config(small.demo, tmp_path / "run", small.cache, **{**QUICK, **settings}))
    config = json.loads((run / "config.json").read_text())
    scores = results(run)
    assert scores["select"] == settings.get("select", "macro_f1")
    assert set(scores) >= {"valid", "test", "best_epoch", "epochs_run"}
    if settings["mode"] == "image":
        assert config["encoder_dir"] is None and config["truncated_posts"] == {}
    if settings.get("class_weights") == "balanced":
        counts = read_classification(ClassDataConfig(str(small.demo))).splits["train"].label_counts()
        n = sum(counts.values())
        want = {label: n / (len(counts) * c) for label, c in counts.items()}
        assert config["class_weights"] == pytest.approx(want)
    else:
        assert config["class_weights"] is None
    assert (run / SUBMISSION_FILE).is_file()


@pytest.mark.slow
def test_the_bertresnet_seeds_folder_extracts_and_trains_as_it_is(tmp_path):
    # TOMYUE/BertResNet@90e59ac's layout: train.csv / val.csv / test.csv with `text_id,text,img_path,tag`,
    # images in data/img/, the test tags `null`.
    folder = tmp_path / "bertresnet"
    rng = random.Random(0)
    words = {"positive": "lovely sunny day", "negative": "awful sad news", "neutral": "a bus timetable"}
    files = {"train.csv": range(1, 19), "val.csv": range(19, 25), "test.csv": range(25, 31)}
    for name, ids in files.items():
        rows = [["text_id", "text", "img_path", "tag"]]
        for i, text_id in enumerate(ids):
            label = list(words)[i % 3]
            rows.append([str(text_id), f"{words[label]} #{text_id} \n", f"data/img/{text_id}.jpg",
                         "null" if name == "test.csv" else label])  # fmt: skip
            image = folder / "data/img" / f"{text_id}.jpg"
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), tuple(rng.randrange(256) for _ in range(3))).save(image)
        (folder / name).write_text(csv_text(rows), encoding="utf-8")
    cache = extract(folder, tmp_path / "cache")
    with CacheReader(cache) as reader:
        assert len(reader) == 30 and {reader.status(str(k)) for k in range(1, 31)} == {"ok"}
    run = train_classifier(run_config(folder, tmp_path / "run", cache, **QUICK, mode="both", head="mlp"))
    assert set(results(run)) >= {"valid", "best_epoch"}
    submission = split_file(run / submission_file("test"))
    assert [row[0] for row in submission] == [str(k) for k in files["test.csv"]]
    # the seed's output form: its test.csv as written, the tag column filled in with the predictions
    source = read_csv_rows(folder / "test.csv")
    seed_form = run / "pred_test.seed.csv"
    assert read_csv_rows(seed_form) == [source[0]] + [
        [*row[:3], label] for row, (_, label) in zip(source[1:], submission)
    ]
    assert seed_form.read_text(encoding="utf-8") == csv_text(read_csv_rows(seed_form))
    # predict writes the same beside its --out
    out = predict_classifier(run, folder / "test.csv", tmp_path / "predicted.txt", device="cpu")
    assert out.read_bytes() == (run / submission_file("test")).read_bytes()
    assert (tmp_path / "predicted.seed.csv").read_bytes() == seed_form.read_bytes()


@pytest.fixture(scope="module")
def clip_like(small, tmp_path_factory):
    """A synthetic cache of the small demo's guids whose patch width (8) differs from its global width
    (6), as CLIP's do (768 vs 512); some posts missing or corrupt (tests.cache.factories' mix)."""
    data = read_classification(ClassDataConfig(str(small.demo)))
    keys = [e.guid for split in data.splits.values() for e in split.examples]
    return make_cache(tmp_path_factory.mktemp("clip-like"), keys=keys)


@pytest.mark.parametrize(
    "mode, head_name",
    [
        *(("both", h) for h in CLASS_HEADS),
        *(("image", h) for h in CLASS_HEADS),
    ],
)
@pytest.mark.slow
def test_every_head_trains_on_a_cache_whose_patch_and_global_widths_differ(
    small, clip_like, tmp_path, mode, head_name
):
    # The synthetic cache stores tokens alone, no vision state: the heads read them frozen.
    settings = dict(QUICK, mode=mode, head=head_name, attention_heads=2, vision_trainable_blocks=0)
    run = train_classifier(run_config(small.demo, tmp_path / "run", clip_like, **settings))
    config = json.loads((run / "config.json").read_text())
    with CacheReader(clip_like) as reader:
        assert reader.spec.patch_dim != reader.spec.global_dim
        data = read_classification(ClassDataConfig(str(small.demo)))
        want = {n: sum(reader.status(e.guid) != "ok" for e in s.examples) for n, s in data.splits.items()}
    assert config["no_image"] == want and sum(want.values()) > 0
    assert (run / "results.json").is_file()


@pytest.mark.slow
def test_text_mode_with_a_cache_path_given_does_not_open_it(small, tmp_path, monkeypatch):
    monkeypatch.setattr(classify, "CacheReader", refuse_cache)
    cfg = run_config(small.demo, tmp_path / "run", tmp_path / "absent", mode="text", **QUICK)
    run = train_classifier(cfg)
    assert json.loads((run / "config.json").read_text())["cache"] is None
    assert (run / "results.json").is_file()


@pytest.mark.slow
def test_a_folder_of_other_files_is_refused_untouched(small, tmp_path):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me\n")
    (out / "sub" / "data.bin").write_bytes(bytes(range(256)))
    (out / "config.json").write_text('{"task": "something else"}')
    before = all_bytes(out)
    cfg = run_config(small.demo, out, small.cache, mode="both", **QUICK)
    with pytest.raises(ValueError, match=re.escape(f"--out {out} is not empty")):
        train_classifier(cfg)
    assert all_bytes(out) == before
    assert sorted(p.name for p in out.rglob("*")) == ["config.json", "data.bin", "notes.txt", "sub"]


@pytest.mark.slow
def test_a_cache_of_other_data_is_refused_naming_file_and_line(small, tmp_path):
    other = make_mvsa_demo(tmp_path / "other", seed=1, n=24)
    cache = extract(other, tmp_path / "other-cache")
    data = read_classification(ClassDataConfig(str(small.demo)))
    with CacheReader(cache) as reader:
        first = next(
            (split, e) for split in data.splits.values() for e in split.examples if e.guid not in reader
        )
    split, example = first
    out = tmp_path / "run"
    with pytest.raises(ValueError) as err:
        train_classifier(run_config(small.demo, out, cache, mode="both", **QUICK))
    message = str(err.value)
    assert message.startswith(f"{split.path}:{example.line}: guid {example.guid!r} is not in the cache")
    assert split.path.name == "train.txt"  # the first split read
    assert "mner extract-features --data-dir" in message
    assert not out.exists()


@pytest.mark.slow
def test_images_moved_between_posts_since_extraction_are_warned_about(small, tmp_path, caplog):
    data = shutil.copytree(small.demo, tmp_path / "data")
    with CacheReader(small.cache) as reader:
        ok, n = [key for key in reader.keys if reader.status(key) == "ok"], len(reader.keys)
    # two posts get other pictures (of other sizes) than the cache's tokens were made from
    for guid, size in ((ok[0], (40, 24)), (ok[3], (20, 50))):
        Image.new("RGB", size, (9, 9, 9)).save(data / "data" / f"{guid}.jpg")
    with caplog.at_level(logging.WARNING, logger="mner.train.engine.classify"):
        train_classifier(run_config(data, tmp_path / "run", small.cache, mode="both", **QUICK))
    warned = [r.getMessage() for r in caplog.records if "another size" in r.getMessage()]
    assert warned and warned[0].startswith(f"2 of {n} images have another size than {small.cache} recorded")
    assert f"recorded ({ok[0]}, {ok[3]}): they changed, or moved between posts" in warned[0]
    assert f"`mner cache verify {small.cache} --data-dir {data} --images`" in warned[0]
    caplog.clear()
    with caplog.at_level(
        logging.WARNING, logger="mner.train.engine.classify"
    ):  # the images as extracted: silent
        train_classifier(run_config(small.demo, tmp_path / "run2", small.cache, mode="both", **QUICK))
    assert not [r for r in caplog.records if "another size" in r.getMessage()]


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_and_keeps_nothing(small, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise NonFiniteLoss("training loss", float("nan"), 1)

    monkeypatch.setattr(loop, "train_step", explode)
    out = tmp_path / "run"
    with pytest.raises(
        ValueError,
        match=r"training stopped at epoch 1, step 1 of \d+: the training loss is nan; the epoch was not saved "
        "and no epoch was finished, so nothing is kept",
    ):
        train_classifier(run_config(small.demo, out, None, mode="text", **QUICK))
    assert not out.exists()
    # An empty folder given by the user stays, emptied of what the run wrote (config.json, metrics).
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="nothing is kept"):
        train_classifier(run_config(small.demo, empty, None, mode="text", **QUICK))
    assert empty.is_dir() and not any(empty.iterdir())


# ============================================================================ a csv folder

CSV_TRAIN = [
    ("g1", "pos", "a bright day", "pics/g1.jpg"),
    ("g2", "neg", "so dark", ""),  # no image given
    ("g3", "pos", "sunny again", "pics/g3.jpg"),
    ("g4", "neg", "gloomy", "pics/g4.jpg"),
    ("g5", "pos", "lovely", "pics/g5.jpg"),
    ("g6", "neg", "grim", "pics/absent.jpg"),  # a path to nothing
    ("g7", "neg", "bleak", "pics/g7.jpg"),
    ("g8", "pos", "warm", "pics/g8.jpg"),
]
CSV_TEST = [("t1", "pos", "fine", "pics/t1.jpg"), ("t2", "neg", "meh", "")]


def make_csv_folder(folder: Path) -> Path:
    (folder / "pics").mkdir(parents=True)
    for name, rows in (("train.csv", CSV_TRAIN), ("test.csv", CSV_TEST)):
        with open(folder / name, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["guid", "tag", "text", "image"])
            writer.writerows(rows)
        for _, tag, _, image in rows:
            if image and "absent" not in image:
                colour = (240, 200, 40) if tag == "pos" else (30, 40, 90)
                Image.new("RGB", (24, 20), colour).save(folder / image, quality=90)
    return folder


@pytest.fixture(scope="module")
def csv_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("csv")
    folder = make_csv_folder(root / "data")
    return SimpleNamespace(folder=folder, cache=extract(folder, root / "cache"))


@pytest.mark.slow
def test_a_csv_folder_is_extracted_with_guids_as_keys(csv_cache):
    guids = sorted(row[0] for row in CSV_TRAIN + CSV_TEST)
    keys, paths = collect_images(ExtractConfig(data=DataConfig(data_dir=str(csv_cache.folder)), out="x"))
    assert keys == guids
    assert paths["g2"] is None and paths["t2"] is None
    assert paths["g1"] == csv_cache.folder / "pics" / "g1.jpg"

    images = {image["key"]: image for image in read_manifest(csv_cache.cache)["images"]}
    assert sorted(images) == guids
    for guid in ("g2", "t2"):
        assert images[guid]["status"] == "missing" and "no image given" in images[guid]["error"]
    assert images["g6"]["status"] == "missing" and "no image given" not in images["g6"]["error"]
    assert "absent.jpg" in images["g6"]["error"]
    ok = [g for g in guids if g not in ("g2", "g6", "t2")]
    assert all(images[g]["status"] == "ok" for g in ok)
    with CacheReader(csv_cache.cache) as reader:
        assert reader.keys == guids
        assert not reader.get("g2").global_embed.any()
        assert all(reader.get(g).global_embed.any() for g in ok)


@pytest.mark.slow
def test_a_csv_folder_trains_with_its_missing_images_counted(csv_cache, tmp_path):
    run = train_classifier(
        run_config(csv_cache.folder, tmp_path / "run", csv_cache.cache, mode="both", **QUICK)
    )
    config = json.loads((run / "config.json").read_text())
    data = read_classification(ClassDataConfig(str(csv_cache.folder)))
    missing = {"g2", "g6", "t2"}
    want = {name: sum(e.guid in missing for e in s.examples) for name, s in data.splits.items()}
    assert config["no_image"] == want and sum(want.values()) == 3
    assert config["data_report"]["layout"] == "csv"
    rows = split_file(run / "pred_test.csv")
    assert [r[:2] for r in rows] == [[g, t] for g, t, _, _ in CSV_TEST]
    assert not (run / SUBMISSION_FILE).exists()  # a csv folder has no test_without_label.txt
    # a labelled test.csv also gets the seed's form: its rows, the tag column holding the predictions
    want = [["guid", "tag", "text", "image"]] + [
        [g, p, t, i] for (g, _, t, i), (_, _, p) in zip(CSV_TEST, rows)
    ]
    assert read_csv_rows(run / "pred_test.seed.csv") == want
    _, folder = evaluate_classifier(run, split="test", device="cpu")
    assert (folder / "pred.seed.csv").read_bytes() == (run / "pred_test.seed.csv").read_bytes()


@pytest.mark.slow
def test_an_unlabelled_test_csv_gets_a_submission_file_in_its_order(tmp_path):
    folder = make_csv_folder(tmp_path / "data")
    rows = [("u2", "", "later", ""), ("u1", "null", "earlier", "")]  # unsorted, every tag empty or null
    with open(folder / "test.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["guid", "tag", "text", "image"])
        writer.writerows(rows)
    run = train_classifier(run_config(folder, tmp_path / "run", None, mode="text", **QUICK))
    lines = (run / submission_file("test")).read_text(encoding="utf-8").splitlines()
    assert lines[0] == "guid,tag"
    assert [line.split(",")[0] for line in lines[1:]] == ["u2", "u1"]
    assert all(line.split(",")[1] in ("neg", "pos") for line in lines[1:])
    assert "test" not in json.loads((run / "results.json").read_text())  # nothing to score it against
    assert not (run / "pred_test.csv").exists()


@pytest.mark.slow
def test_guids_with_comma_quote_or_newline_round_trip_through_a_run(tmp_path):
    # a csv folder may name such guids: the run finishes, and every file it writes reads them back
    folder = make_csv_folder(tmp_path / "data")
    odd = ["x,1", 'say "hi"', "two\nlines", "u,2"]
    with open(folder / "train.csv", "a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([(odd[0], "pos", "good", ""), (odd[1], "neg", "bad", "")])
    with open(folder / "test.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([("guid", "tag", "text"), (odd[2], "", "a"), (odd[3], "null", "b")])
    run = train_classifier(run_config(folder, tmp_path / "run", None, mode="text", **QUICK))
    data = read_classification(ClassDataConfig(str(folder)))
    rows = read_pred_csv(run / "pred_valid.csv")
    assert [r[:2] for r in rows] == [[e.guid, e.label] for e in data.splits["valid"].examples]
    submission = read_csv_rows(run / submission_file("test"))
    assert submission[0] == ["guid", "tag"] and [r[0] for r in submission[1:]] == [odd[2], odd[3]]
    # the ablation's bootstrap reads the same rows (it unpacked three fields per line)
    train_rows = [
        ["guid", "gold", "pred"],
        *([e.guid, e.label, e.label] for e in data.splits["train"].examples),
    ]
    (tmp_path / "r").mkdir()
    write_atomic(tmp_path / "r" / "pred_train.csv", csv_text(train_rows))
    gold, preds = ablation_tables._seed_labels(pd.DataFrame({"run_dir": [str(tmp_path / "r")]}), "train")
    assert gold[0] == [e.guid for e in data.splits["train"].examples] and odd[0] in gold[0]
    assert preds == [gold[1]]


# ============================================================================ evaluate / predict / results


@pytest.mark.slow
@pytest.mark.parametrize("which", ["text", "both"])
def test_evaluate_reproduces_the_training_time_test_scores(demo_runs, which):
    run = getattr(demo_runs, which)
    scores, folder = evaluate_classifier(run, split="test", device="cpu")
    assert scores == results(run)["test"]
    assert folder.parent == run / "eval" and (folder / "results.json").is_file()
    assert split_file(folder / "pred.csv") == split_file(run / "pred_test.csv")


@pytest.mark.slow
def test_evaluate_refuses_another_cache_and_an_unlabelled_split(demo_runs, small):
    with pytest.raises(ValueError, match="has fingerprint .* but .* was trained on"):
        evaluate_classifier(demo_runs.both, split="test", cache_dir=small.cache, device="cpu")
    with pytest.raises(ValueError, match="has no labelled test_without_label split"):
        evaluate_classifier(demo_runs.both, split="test_without_label", device="cpu")


@pytest.mark.slow
def test_evaluate_refuses_the_runs_data_folder_changed_since_training(demo_runs, tmp_path):
    # 12 more train lines would redraw the valid split: training posts would be scored as valid
    data = shutil.copytree(demo_runs.demo, tmp_path / "data")
    run = shutil.copytree(demo_runs.text, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    assert set(config["data_files"]) == {"train.txt", "test.txt", UNLABELLED_FILE, "data/"}
    config["data"]["data_dir"] = str(data)
    (run / "config.json").write_text(json.dumps(config))
    scores, _ = evaluate_classifier(run, split="valid", device="cpu")
    assert scores == results(run)["valid"]
    test = (data / "test.txt").read_text().splitlines()[1:13]
    with open(data / "train.txt", "a") as train:
        train.write("".join(f"{line}\n" for line in test))
    expected = (
        f"{data} changed since {run} was trained: train.txt changed (sha256 recorded in {run / 'config.json'}); "
        "the scores would not be on the run's data: restore the files, or pass a copy of the changed folder "
        "with --data-dir to score it deliberately"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        evaluate_classifier(run, split="valid", device="cpu")


@pytest.mark.slow
def test_evaluate_names_a_label_the_run_lacks_by_file_and_line(demo_runs, tmp_path):
    folder = shutil.copytree(demo_runs.demo, tmp_path / "other")
    with open(folder / "train.txt", "a") as train, open(folder / "test.txt", "a") as test:
        train.write("n1,angry\nn2,angry\n")
        test.write("n3,angry\n")
    for guid in ("n1", "n2", "n3"):
        (folder / "data" / f"{guid}.txt").write_text("grr")
    line = len((folder / "test.txt").read_text().splitlines())
    labels = json.loads((demo_runs.text / "config.json").read_text())["label_names"]
    expected = (
        f"{folder / 'test.txt'}:{line}: guid 'n3': tag 'angry' is not one of the model's labels "
        f"({', '.join(labels)})"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}"):
        evaluate_classifier(demo_runs.text, split="test", data_dir=folder, device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("which", ["text", "both"])
def test_predict_writes_the_submission_training_wrote(demo_runs, tmp_path, which):
    run = getattr(demo_runs, which)
    out = predict_classifier(
        run, demo_runs.demo / "test_without_label.txt", tmp_path / "sub.txt", device="cpu"
    )
    assert out.read_text(encoding="utf-8") == (run / SUBMISSION_FILE).read_text(encoding="utf-8")


@pytest.mark.slow
def test_predict_refuses_its_input_as_output_and_guids_not_cached(demo_runs, tmp_path):
    source = demo_runs.demo / "test_without_label.txt"
    before = source.read_bytes()
    with pytest.raises(ValueError, match="would overwrite an input"):
        predict_classifier(demo_runs.both, source, source, device="cpu")
    assert source.read_bytes() == before
    other = make_mvsa_demo(tmp_path / "other", seed=5, n=24)  # guids the run's cache does not hold
    with pytest.raises(ValueError, match=r"test_without_label.txt:\d+: guid .* is not in the cache"):
        predict_classifier(demo_runs.both, other / "test_without_label.txt", tmp_path / "p.txt", device="cpu")


@pytest.mark.slow
def test_predict_hints_an_extraction_that_works_on_a_folder_of_posts_to_label(demo_runs, tmp_path):
    # a new folder holds only the posts to label (no train.txt): the hinted command extracts it
    other = make_mvsa_demo(tmp_path / "other", seed=5, n=24)
    for name in ("train.txt", "valid.txt", "test.txt", "demo.json"):
        (other / name).unlink(missing_ok=True)
    with pytest.raises(ValueError) as caught:
        predict_classifier(demo_runs.both, other / UNLABELLED_FILE, tmp_path / "p.txt", device="cpu")
    command = re.search(r"`(mner extract-features [^`]*)`", str(caught.value)).group(1)
    assert command.startswith(
        f"mner extract-features --data-dir {other} --out NEW_CACHE --vision tiny-resnet"
    )
    assert "--detector none" in command
    args = shlex.split(command.replace("NEW_CACHE", str(tmp_path / "cache")))[1:]
    done = CliRunner().invoke(main, [*args, "--num-workers", "0", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    out = predict_classifier(
        demo_runs.both,
        other / UNLABELLED_FILE,
        tmp_path / "p.txt",
        cache_dir=tmp_path / "cache",
        device="cpu",
    )
    assert [row[0] for row in read_csv_rows(out)[1:]] == [
        row[0] for row in read_csv_rows(other / UNLABELLED_FILE)[1:]
    ]


@pytest.mark.slow
def test_results_table_gives_a_classifier_run_accuracy_and_macro_scores(demo_runs):
    table = results_table([str(demo_runs.text), str(demo_runs.both)], split="test")
    header, *rows = table.splitlines()
    assert header.split()[:6] == ["run", "P", "R", "F1", "support", "Acc"]
    for line, run in zip(rows, (demo_runs.text, demo_runs.both)):
        test = results(run)["test"]
        cells = line.split()
        want = [test[k] * 100 for k in ("macro_precision", "macro_recall", "macro_f1")]
        assert [float(c) for c in cells[1:4]] == pytest.approx(want, abs=0.006)
        assert float(cells[5]) == pytest.approx(test["accuracy"] * 100, abs=0.006)
        assert "classification" in line


# ============================================================================ classifier ablations


@pytest.mark.slow
def test_a_classifier_ablation_tabulates_its_runs_and_resumes(small, tmp_path, monkeypatch):
    cfg = ClassAblationConfig(
        data=ClassDataConfig(str(small.demo)),
        cache_dir=str(small.cache),
        experiments=["mode=text", "mode=both,head=attention"],
        out_dir=str(tmp_path / "abl"),
        seeds=2,
        overrides=[f"classifier.{key}={value}" for key, value in QUICK.items()],
        bootstrap=200,
    )
    md = run_ablation(cfg)
    table = pd.read_csv(md.parent / "ablation.csv")
    assert list(table["experiment"]) == ["mode=text"] * 2 + ["mode=both,head=attention"] * 2
    for row in table.itertuples():
        test = results(Path(row.run_dir))["test"]
        assert row.accuracy == pytest.approx(test["accuracy"] * 100)
        assert row.macro_f1 == pytest.approx(test["macro_f1"] * 100)
        config = json.loads((Path(row.run_dir) / "config.json").read_text())
        assert config["classifier"]["seed"] == row.seed
        assert config["cache_dir"] is None if row.experiment == "mode=text" else config["cache_dir"]
    # The bootstrap's delta is the difference of the seed-mean accuracies (micro F1 of one-word posts).
    means = table.groupby("experiment", sort=False)["accuracy"].mean()
    delta = means["mode=both,head=attention"] - means["mode=text"]
    prefix = "| mode=both,head=attention | 2 | "
    row = [line for line in md.read_text().splitlines() if line.startswith(prefix)][-1]  # the test's table
    if abs(delta) > 0.005:
        assert row.split(" | ")[2] == f"{delta:+.2f}"
    # A re-run trains nothing: every run is finished.
    monkeypatch.setattr(classify, "train_classifier", refuse_cache)
    assert run_ablation(cfg).read_text() == md.read_text()


@pytest.mark.slow
def test_a_classifier_ablation_refuses_a_bad_arm_before_any_run(small, tmp_path):
    for experiments, message in (
        (["mode=sideways"], "experiment 'mode=sideways': classifier.mode must be one of"),
        (["colour=red"], "unknown key classifier.colour"),
        (["seed=3"], "the seed comes from --seeds"),
        (["base", "base"], "given more than once"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            ClassAblationConfig(
                data=ClassDataConfig(str(small.demo)),
                cache_dir=str(small.cache),
                experiments=experiments,
                out_dir=str(tmp_path / "abl"),
            )
    assert not (tmp_path / "abl").exists()


@pytest.mark.slow
def test_cache_verify_checks_a_classification_cache_against_its_guids(small, tmp_path):
    report = verify_cache(small.cache)  # against the recorded folder
    guids = {
        e.guid
        for s in read_classification(ClassDataConfig(str(small.demo))).splits.values()
        for e in s.examples
    }
    assert report.ok and report.checked["data_keys"] == len(guids)
    fewer = tmp_path / "fewer"
    shutil.copytree(small.demo, fewer)
    lines = (fewer / "train.txt").read_text(encoding="utf-8").splitlines()
    dropped = lines[1].split(",")[0]
    (fewer / "train.txt").write_text("\n".join([lines[0], *lines[2:]]) + "\n", encoding="utf-8")
    report = verify_cache(small.cache, data_for_verify(fewer))
    assert not report.ok
    assert [p for p in report.problems if "in no split" in p] == [
        p for p in report.problems if f"(key {dropped!r}): in no split of {fewer}" in p
    ]
    assert len(report.problems) == 1


@pytest.mark.slow
def test_a_max_length_past_the_encoders_positions_is_refused_before_any_folder(small, tmp_path):
    out = tmp_path / "run"
    cfg = run_config(small.demo, out, None, mode="text", **{**QUICK, "max_length": 100000})
    with pytest.raises(ValueError, match=r"^classifier\.max_length = 100000 is more than text encoder .*512"):
        train_classifier(cfg)
    assert not out.exists()


@pytest.fixture(scope="module")
def imageless(tmp_path_factory):
    """The small demo with its image files deleted before extraction: every cache record is missing."""
    root = tmp_path_factory.mktemp("imageless")
    demo = make_mvsa_demo(root / "demo", seed=0, n=24)
    for image in (demo / "data").glob("*.jpg"):
        image.unlink()
    return SimpleNamespace(demo=demo, cache=extract(demo, root / "cache"))


@pytest.mark.slow
def test_image_mode_with_no_usable_train_image_is_refused(imageless, tmp_path):
    out = tmp_path / "run"
    cfg = run_config(imageless.demo, out, imageless.cache, mode="image", **QUICK)
    n = len(read_classification(cfg.data).splits["train"].examples)
    expected = (
        f"none of the {n} train posts has a usable image in the cache {imageless.cache} (missing {n}): a "
        "model of the image alone would learn a constant"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}"):
        train_classifier(cfg)
    assert not out.exists()


@pytest.mark.slow
def test_both_mode_with_no_usable_train_image_warns_and_records_it(imageless, tmp_path, caplog):
    cfg = run_config(imageless.demo, tmp_path / "run", imageless.cache, mode="both", **QUICK)
    with caplog.at_level(logging.WARNING, logger="mner.train.engine.runs"):
        run = train_classifier(cfg)
    assert "this run is text-only in effect" in caplog.text
    record = json.loads((run / "config.json").read_text())
    assert record["no_image"] == record["data_report"]["sizes"]
