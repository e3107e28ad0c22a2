"""The classifier's settings, torch-free: `ClassifierConfig` (the TOML table [classifier]),
`ClassifierRunConfig` (one run) and `load_classifier_config` (file, then `--set`, then options), with
the names each setting may take. The classifier itself is train/zoo/classifier_model.py's, its training
train/engine/classify.py's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mner import configs
from mner.cache.classification import ClassDataConfig
from mner.runtime import DEVICE_PATTERN
from mner.train.engine.config import Config
from mner.train.engine.config_files import merge_layers, override_layers
from mner.train.engine.tasks import SENTENCE_CLASSIFICATION

MODES = ("text", "image", "both")
CLASS_HEADS = SENTENCE_CLASSIFICATION.heads  # the classification task's heads (train/zoo/classifier_model.py)
TEXT_POOLS = ("cls", "mean")
IMAGE_FEATURES = ("global", "patches")
IMAGE_NORMS = ("standard", "none")
VISION_BATCHNORMS = ("stored", "batch")
SCHEDULES = ("cosine", "linear")  # train/engine/loop.py's SCHEDULES
CLASS_WEIGHTS = ("none", "balanced")
SELECT = SENTENCE_CLASSIFICATION.selects


@dataclass
class ClassifierConfig(Config):
    """The classifier and its optimisation; the TOML table [classifier], `--set classifier.KEY=VALUE`."""

    SECTION = "classifier"

    mode: str = "both"  # text | image | both: what the head sees (text never opens the cache)
    head: str = "mlp"  # mlp | cnn | attention | xattn (train/zoo/classifier_model.py)
    text_encoder: str = "minilm"  # "minilm", "tiny-bert" or a local Hugging Face folder
    text_pool: str = "cls"  # cls ([CLS] state, the seed's) | mean (over real sub-words)
    image_feature: str = (
        "global"  # global (the cached global vector) | patches (their mean); xattn reads patches
    )
    # standard: each dimension of the image feature centred and scaled by its mean and std over the train
    # split's images (kept in the weights); before a linear layer (mlp, xattn) a reparametrisation, the
    # same functions. The seed fine-tunes its ResNet, whose features can grow to the head's scale; a
    # frozen cached vector cannot, and the untrained tiny-resnet's varies 13x less per dimension than
    # MiniLM's [CLS], so its weights learn that much slower (README, Sentence classification, with the
    # measured runs). none: the raw cached vector, the seed's input.
    image_norm: str = "standard"
    max_length: int = 128  # sub-words per post; longer texts are cut (counted in config.json)
    # The text encoder's embeddings and bottom N layers frozen (eval mode, no gradient): their output is
    # computed once per split into a text-state cache (train/engine/text_states.py, as
    # model.text_frozen_layers) and only the top layers and the head train. 0: the whole encoder trains.
    # Mode image has no text encoder: nothing to freeze.
    text_frozen_layers: int = 0
    hidden_size: int = 512  # the seed's hidden size of mlp_both (mlp, attention heads)
    attention_heads: int = 4  # heads of the xattn layer
    dropout: float = 0.0  # after mlp_both's ReLU, and in xattn; the notebook's TwoInputMLP has none (cell 32)
    class_weights: str = "none"  # none | balanced (n / (labels * count) per label, from train)
    select: str = "macro_f1"  # macro_f1 | accuracy: the valid score that picks the best epoch
    # The optimiser follows TOMYUE/BertResNet@0d5c628 BertResNet.ipynb (code cells as at 90e59ac): cell 21
    # sets batch_size = 4, learning_rate = 1.0e-5, weight_decay = 0.01, warmup_steps = 0; cell 39 trains
    # with AdamW(model.parameters(), lr, weight_decay) under get_scheduler("cosine", num_warmup_steps=0),
    # no gradient clipping; cell 50 runs 5 epochs of mode both; cell 10 draws valid as 0.2 of train
    # (ClassDataConfig.valid_fraction).
    epochs: int = 5  # cell 50: run_bert_resnet_model(epochs=5, mode='both')
    batch_size: int = 4  # cell 21
    lr_encoder: float = 1e-5  # AdamW learning rate of the text encoder; cell 21's learning_rate
    lr_head: float = 1e-5  # of the head; cell 21's learning_rate too (cell 39: one rate for every parameter)
    weight_decay: float = 0.01  # cell 21; on every parameter, as cell 39's AdamW(model.parameters())
    schedule: str = "cosine"  # cosine | linear: the decay after warm-up; cell 39's get_scheduler("cosine")
    warmup_ratio: float = 0.0  # cell 21's warmup_steps = 0
    max_grad_norm: float = 0.0  # gradient clipping (global L2 norm); 0: none, as cell 39
    # The vision blocks that train on the state the cache stores before them (`mner extract-features
    # --vision-trainable-blocks K`; train/zoo/vision_blocks.py): cell 33's BertResNetModel fine-tunes its
    # whole ResNet (cell 39 hands model.parameters() to AdamW). From a ResNet cache 1 trains layer4, the
    # most a cache allows (it stores layer3's output, so the stages below stay frozen); from a CLIP cache
    # 1..K of its last layers. 0 reads the cached vector as it is. Image and both modes refuse a cache
    # without the state, with the command that makes one; text mode reads no image and ignores it.
    vision_trainable_blocks: int = 1
    lr_vision: float = 1e-5  # of the vision blocks; cell 21's learning_rate, cell 39's one rate
    # The BatchNorm layers of the trained blocks while training. stored: their stored running statistics
    # (as in evaluation), so the first step computes the frozen model's output, on which image_norm
    # "standard"'s statistics were taken. batch: each batch's own statistics, as cell 39's model.train();
    # with the standardisation that puts layer4's output on another scale (measured on the classify demo,
    # one epoch: train loss 121 against 0.17, valid accuracy 0.36 against 1.00; README).
    vision_batchnorm: str = "stored"
    patience: int = 3  # stop after this many epochs without a better valid score
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # torch intra-op threads; 0: the CPUs this process may use (mner.runtime.set_threads)

    def __post_init__(self):
        self._check_types()
        for name, known in (
            ("mode", MODES),
            ("head", CLASS_HEADS),
            ("text_pool", TEXT_POOLS),
            ("image_feature", IMAGE_FEATURES),
            ("image_norm", IMAGE_NORMS),
            ("vision_batchnorm", VISION_BATCHNORMS),
            ("schedule", SCHEDULES),
            ("class_weights", CLASS_WEIGHTS),
            ("select", SELECT),
        ):
            if getattr(self, name) not in known:
                raise ValueError(
                    f"classifier.{name} must be one of {', '.join(known)}; got {getattr(self, name)!r}"
                )
        for name in ("max_length", "hidden_size", "attention_heads", "epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"classifier.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_encoder", "lr_head", "lr_vision"):
            if getattr(self, name) <= 0:
                raise ValueError(f"classifier.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("classifier.dropout and classifier.warmup_ratio must be in [0, 1)")
        for name in (
            "weight_decay",
            "max_grad_norm",
            "seed",
            "threads",
            "text_frozen_layers",
            "vision_trainable_blocks",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"classifier.{name} must be >= 0, got {getattr(self, name)}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"classifier.device must be auto, cpu, mps, cuda or cuda:N; got {self.device!r}")

    @property
    def trained_blocks(self) -> int:
        """The vision blocks that train: vision_trainable_blocks, 0 in text mode (no image is read)."""
        return 0 if self.mode == "text" else self.vision_trainable_blocks


@dataclass
class ClassifierRunConfig:
    """Everything one classifier run needs; recorded in its config.json."""

    data: ClassDataConfig  # the classification folder
    out_dir: str  # the run folder to create (new or empty)
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    cache_dir: str | None = None  # the feature cache; required unless classifier.mode is text (then unused)
    resume: bool = False  # continue a run of ours from its checkpoint/
    # root folder of the text-state caches (classifier.text_frozen_layers > 0); None: $MNER_TEXT_CACHE,
    # else ~/.cache/mner/text-states (cache/text_states.py)
    text_cache: str | None = None

    def __post_init__(self):
        if not isinstance(self.data, ClassDataConfig):
            raise ValueError(f"data must be a ClassDataConfig, got {self.data!r}")
        if not self.out_dir:
            raise ValueError("out_dir must name the run folder, got ''")
        if self.classifier.mode != "text" and self.cache_dir is None:
            raise ValueError(
                f"mode {self.classifier.mode} reads images from a feature cache: pass --cache DIR "
                "(from `mner extract-features --data-dir` on this folder), or --mode text"
            )

    def to_dict(self) -> dict:
        return {
            "data": self.data.to_dict(),
            "out_dir": self.out_dir,
            "classifier": self.classifier.to_dict(),
            "cache_dir": self.cache_dir,
            "resume": self.resume,
            "text_cache": self.text_cache,
        }


def load_classifier_config(
    config_file: str | Path | None = None, overrides=(), **settings
) -> ClassifierConfig:
    """A ClassifierConfig from an optional TOML file (table [classifier]), then `--set classifier.KEY=VALUE`
    overrides, then `settings` (the CLI's options; None values are skipped), later ones winning.

    Raises ValueError naming the file or the override for an unknown table or key, a bad value.
    """
    layers = [(configs.load_toml(Path(config_file)), str(config_file))] if config_file is not None else []
    layers += override_layers(overrides)
    layers.append(({"classifier": {k: v for k, v in settings.items() if v is not None}}, "the options"))
    return ClassifierConfig(**merge_layers({"classifier": ClassifierConfig}, layers)["classifier"])
