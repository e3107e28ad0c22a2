"""The classifier's optimisation follows the BertResNet notebook (TOMYUE/BertResNet@0d5c628,
BertResNet.ipynb): its values, AdamW's weight decay on every parameter, the cosine schedule without
warm-up, and no gradient clipping."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from mner.cache.classification import ClassDataConfig
from mner.runtime import Runtime
from mner.train.engine.classifier_config import ClassifierConfig
from mner.train.engine.classify import param_groups
from mner.train.engine.loop import make_optimizer, train_step
from mner.train.zoo.classifier_model import ClassifierHead, SentenceClassifier


def test_the_optimiser_defaults_are_the_notebooks():
    c = ClassifierConfig()
    notebook = dict(  # cell 21, cell 39 (cosine, no clipping), cell 50 (epochs=5), cell 32 (no dropout)
        batch_size=4, lr_encoder=1e-5, lr_head=1e-5, weight_decay=0.01, warmup_ratio=0.0, schedule="cosine",
        max_grad_norm=0.0, epochs=5, dropout=0.0, seed=42,
    )  # fmt: skip
    assert {key: getattr(c, key) for key in notebook} == notebook
    assert ClassDataConfig("x").valid_fraction == 0.2  # cell 10: train_test_split(test_size=0.2)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)


def test_every_parameter_decays_at_its_parts_rate():
    head = ClassifierHead("mlp", "both", 4, 3, 2, hidden=5)
    model = SentenceClassifier(Encoder(), head, "cls", image_norm="standard", image_dim=3)
    c = ClassifierConfig(lr_encoder=1e-5, lr_head=1e-3, weight_decay=0.01)
    groups = param_groups(model, c)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-5, 0.01), (1e-3, 0.01)]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # biases and LayerNorm included
    assert not any(id(b) in grouped for b in model.buffers())  # the image statistics never train


def test_the_cosine_schedule_without_warmup_is_the_notebooks():
    """get_scheduler("cosine", num_warmup_steps=0, T) multiplies the rate by (1 + cos(pi t / T)) / 2."""
    runtime = Runtime(torch.device("cpu"), None)
    weight = nn.Parameter(torch.zeros(1))
    optimizer, scheduler, _ = make_optimizer(
        [{"params": [weight], "lr": 1e-5}], 0.01, 0.0, 10, runtime, "cosine"
    )
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == [1e-5 * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(10)]


def test_max_grad_norm_0_clips_nothing():
    runtime = Runtime(torch.device("cpu"), None)
    layer = nn.Linear(3, 1)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, batch):
            return {"loss": 1000.0 * self.layer(batch["x"]).sum()}

    batch = {"x": torch.ones(2, 3)}
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    train_step(Model(), batch, optimizer, scheduler, scaler, 0.0, runtime)
    assert torch.equal(layer.weight.grad, torch.full((1, 3), 2000.0))  # unclipped: its norm is ~3464
    train_step(Model(), batch, optimizer, scheduler, scaler, 1.0, runtime)
    assert torch.allclose(torch.cat([layer.weight.grad.flatten(), layer.bias.grad]).norm(), torch.tensor(1.0))


def test_the_readme_names_the_original_and_every_deviation_of_bertresnet():
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text(encoding="utf-8")
    row = next(
        line for line in readme.splitlines() if line.startswith("| BertResNet (`mner train-classifier`")
    )
    seed, _, knobs, leaves_out = [cell.strip() for cell in row.strip("|").split(" | ")][1:]
    assert re.search(r"follows TOMYUE/BertResNet@[0-9a-f]{7}\b", seed), seed
    for knob in ("image_norm", "lr_head", "schedule"):
        assert f"`{knob}`" in knobs
    for deviation in (
        "forced by the cache",
        '`image_norm = "standard"`',
        "Bugs in the original",
    ):
        assert deviation in leaves_out
    section = readme[readme.index("## Sentence classification") :]
    section = section[: section.index("\n## ", 1)]
    assert "**Defaults**" in section and "**The image signal at the defaults.**" in section
