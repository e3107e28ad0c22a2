"""Stage two's extension points: the name -> builder tables that a ModelConfig composes a model from.

    fusion       model.fusion     how word states meet the visual tokens       train/zoo/fusion.py
    head         model.head       emissions -> loss and decoded label ids      train/zoo/heads.py
    aux loss     (one weight each) extra training losses, added with a weight   train/zoo/losses.py
    task         model.task       what is predicted: labels, targets, metric,  train/engine/tasks.py
                 (a classifier    selection, metrics line, prediction files
                 run: its record)

A config holds names only. Each table maps a name to its builder written as "module:attribute" and
imported on first use (the lazy mapping of Hugging Face's auto classes), so validating a config, or
listing the names for `--help`, never imports torch. The table is the one source of the names: the
config checks against `Registry.names`, the model builds through `Registry.get`, and the tests
parametrise over the table, so a new entry is checked the day it is added.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Registry:
    """Names -> builders for one extension point."""

    key: str  # what names an entry, for error messages: "model.fusion"
    entries: dict[str, str]  # name -> "package.module:attribute" of its builder
    # aux losses only: name -> the ModelConfig field holding its weight (0 turns the loss off)
    weights: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        assert not self.weights or set(self.weights) == set(self.entries), "every aux loss needs a weight"

    @property
    def names(self) -> tuple[str, ...]:
        """The registered names, in table order."""
        return tuple(self.entries)

    def check(self, name: str) -> None:
        """ValueError naming the config key and the choices when `name` is not registered."""
        if name not in self.entries:
            raise ValueError(f"{self.key} must be one of {', '.join(self.names)}; got {name!r}")

    def get(self, name: str):
        """The builder registered as `name` (its module is imported now)."""
        self.check(name)
        module, _, attribute = self.entries[name].partition(":")
        return getattr(importlib.import_module(module), attribute)


# Builders: (cfg: ModelConfig, width: int, entity_types: Sequence[str]) -> nn.Module, whose forward is
# (text (B, T, D), text_mask (B, T), visual (B, V, D), visual_mask (B, V), pooled (B, D) | None) -> (B, T, D).
FUSIONS = Registry(
    "model.fusion",
    {
        "qgf": "mner.train.zoo.fusion:QueryGuidedFusion",  # AFDVQF query-guided fusion (+ model.adaptive_gate)
        "concat": "mner.train.zoo.fusion:ConcatFusion",  # BertResNet: pooled image vector beside every word
        "gated": "mner.train.zoo.fusion:GatedFusion",  # MANGO's gate alone, qfnet_layers times (no stack)
        "mango": "mner.train.zoo.mango:MangoFusion",  # MANGO: resampler -> 7-block stack -> gated relevance
        # IFAformer: visual tokens appended to the encoder's input, one stream (train/zoo/ifaformer.py)
        "single_stream": "mner.train.zoo.ifaformer:SingleStreamFusion",
        # IFAformer as DeepKE: a vision tower and the text layers exchange keys and values (two_tower.py)
        "two_tower": "mner.train.zoo.two_tower:TwoTowerFusion",
    },
)

# Builders: (cfg: ModelConfig, label_names: Sequence[str]) -> heads.Head.
HEADS = Registry(
    "model.head",
    {
        "crf": "mner.train.zoo.heads:CRFHead",
        "softmax": "mner.train.zoo.heads:SoftmaxHead",  # token cross-entropy, argmax decode
    },
)

# Builders: (cfg: ModelConfig, width: int) -> losses.AuxLoss; each loss is weighted by its own field.
AUX_LOSSES = Registry(
    "auxiliary loss",
    {
        "align": "mner.train.zoo.losses:AlignmentLoss",
        "slot_type": "mner.train.zoo.losses:SlotTypeLoss",  # AFNER typed slots: type presence
        # MANGO's losses (train/zoo/mango.py); they read its fusion's relevance, so need model.fusion = "mango"
        "mango_align": "mner.train.zoo.mango:MangoAlignLoss",
        "mango_preserve": "mner.train.zoo.mango:MangoPreserveLoss",
        "mango_nce": "mner.train.zoo.mango:MangoNCELoss",
        "mango_sparsity": "mner.train.zoo.mango:MangoSparsityLoss",
    },
    weights={
        "align": "alignment_loss_weight",
        "slot_type": "slot_type_loss_weight",
        "mango_align": "align_lambda",
        "mango_preserve": "preserve_lambda",
        "mango_nce": "nce_lambda",
        "mango_sparsity": "sparsity_lambda",
    },
)

# Entries: tasks.Task instances (what a task needs from the data and gives the heads).
TASKS = Registry(
    "model.task",
    {
        "tagging": "mner.train.engine.tasks:TOKEN_TAGGING",  # one BIO tag per word (mner train-from-cache)
        "classification": "mner.train.engine.tasks:SENTENCE_CLASSIFICATION",  # one label per post
    },
)
