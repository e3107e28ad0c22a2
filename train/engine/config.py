"""Stage-two configs: the model (ModelConfig) and the training run (TrainConfig, RunConfig).

Dataclasses of names and plain values, each field commented and validated in `__post_init__`; how
they are read from the TOML layers (base, model file, experiment diffs, `--set`) is config_files.py.
The knob names follow the systems this project grew from (AFDVQF: `qfnet_layers`, `qfnet_heads`,
`slots_per_type`, `alignment_loss_weight`, `alignment_temperature`; MANGO: `image_dropout`, and the
seed-003 block at the end of ModelConfig: `rel_temp`, `align_lambda`, `nce_tau`, ...).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mner import configs
from mner.cache.datasets import DataConfig
from mner.runtime import AMP_MODES, DEVICE_PATTERN, SettingError
from mner.train.zoo.registry import AUX_LOSSES, FUSIONS, HEADS, TASKS

# The model zoo: one small TOML diff over the base per model, configs/models/<name>.toml. Its first two
# comment lines say the seed it follows and what it adds (`mner models` prints them); the files are
# the one list of model names.
MODELS_DIR = "models"

# AFDVQF's adaptive fusion after QGF (ModelConfig.adaptive_fusion; train/zoo/fusion.py).
ADAPTIVE_FUSIONS = ("weights", "gate")

# How cached tokens become visual tokens (ModelConfig.visual_builder; train/zoo/visual.py).
VISUAL_BUILDERS = ("shared", "dual")

# The text side of the InfoNCE alignment (ModelConfig.alignment_pooling; train/zoo/losses.py).
ALIGNMENT_POOLINGS = ("cls", "mean")

# The learning rates the emission layer may train at (ModelConfig.emission_lr): train.lr_<name>.
EMISSION_LRS = ("fusion", "crf")
# Fusions that feed the image into the text encoder's first layer (IFAformer's two forms), so no
# encoder layer's output is a function of the text alone.
IMAGE_IN_EVERY_LAYER = ("single_stream", "two_tower")

# Readable names of the value types a config field may hold, for error messages.
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


class Config:
    """Shared helpers of the flat configs (model, train, classifier): type checks, dict round trip,
    the refusal of an unknown key."""

    SECTION = ""  # the TOML table this config is read from

    def _check_types(self) -> None:
        # TOML and JSON hand us plain values; a wrong type must fail here, not deep in the model.
        for f in dataclasses.fields(self):
            value, expected = getattr(self, f.name), type(f.default)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, value := float(value))
            elif isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
                raise ValueError(f"{self.SECTION}.{f.name} must be {_TYPE_NAMES[expected]}, got {value!r}")
            # TOML has nan and inf literals; a range check (`lr > 0`) lets inf through and NaN
            # compares false to everything, so a non-finite value would only fail mid-training.
            if expected is float and not math.isfinite(value):
                raise ValueError(f"{self.SECTION}.{f.name} must be a finite number, got {value}")

    def to_dict(self) -> dict:
        """Plain JSON/TOML-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "dict"):
        """Build from a dict holding some or all fields (missing ones keep their defaults).

        Raises ValueError naming `source` and the key for a key that is not a field.
        """
        cls.check_keys(data, source)
        return cls(**data)

    @classmethod
    def check_keys(cls, keys, source: str) -> None:
        """ValueError naming `source`, the first key that is not a field, and the known keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in keys:
            if key not in names:
                raise ValueError(
                    f"{source}: unknown key {cls.SECTION}.{key}; known keys: {', '.join(sorted(names))}"
                )


@dataclass
class ModelConfig(Config):
    """The stage-two model: text encoder -> visual token builder -> fusion -> emissions -> head.

    task, fusion and head are names in the registries of train/zoo/registry.py; each auxiliary loss
    there has its own weight field here (alignment_loss_weight), 0 turning it off.
    """

    SECTION = "model"

    # the model file (configs/models/<name>.toml) the settings start from; `mner models` lists them
    name: str = "afdvqf"
    # "minilm", "tiny-bert" (tests) or a local Hugging Face folder (BERT/RoBERTa/XLM-R)
    text_encoder: str = "minilm"
    task: str = "tagging"  # registry name: tagging (one BIO tag per word) (train/engine/tasks.py)
    fusion: str = (
        "qgf"  # registry name: qgf | concat | gated | mango | single_stream | two_tower (registry.py)
    )
    qfnet_layers: int = 2  # query-guided fusion layers (AFNER, AFDVQF); the gated fusion stacks as many
    qfnet_heads: int = 4  # attention heads in every fusion attention; must divide the text width
    slots_per_type: int = 4  # learnable query slots per entity type (QGF)
    # AFDVQF's adaptive fusion after QGF; the one switch of it, so it must be false for a fusion other
    # than qgf. Which one is adaptive_fusion.
    adaptive_gate: bool = True
    # "weights": AFDVQF's AdaptiveFusionLayer, text_weight * fused + vision_weight * mean visual token, two
    # learnable scalars from 1 (liguochun0304/AFDVQF, model/query_guided_fusion.py); "gate": ours, a
    # per-word, per-dimension sigmoid gate between the text states and the fused states
    adaptive_fusion: str = "weights"
    use_patches: bool = True  # visual tokens include the CLIP patch tokens
    use_regions: bool = True  # visual tokens include the detector region tokens
    text_only: bool = False  # no image at all: no visual modules are built, the cache is never read
    alignment_loss_weight: float = 0.1  # weight of the text-image InfoNCE loss; 0 turns it off
    alignment_temperature: float = 0.07  # InfoNCE temperature (CLIP's initial value)
    # training only: drop all visual tokens of a post with this probability (MANGO)
    image_dropout: float = 0.1
    dropout: float = 0.1  # dropout in the fusion, the visual tokens and before the emission layer
    # the learning rate the emission layer trains at: "fusion" (train.lr_fusion) or "crf" (train.lr_crf,
    # DeepKE's IFAformer: its `fc` is in the CRF's group, modules/train.py multiModal_before_train)
    emission_lr: str = "fusion"
    head: str = "crf"  # registry name: crf (train/zoo/heads.py); must be one the task allows
    bio_constraints: bool = True  # no illegal BIO move (O -> I-X, ...) at decode, either head (heads.py)
    # sub-words per post given to the encoder, specials included; later words are predicted O
    max_length: int = 128
    # the embeddings and the bottom N text encoder layers are frozen (eval mode, no gradient); their
    # output is computed once per split into a text-state cache (train/engine/text_states.py). 0: all train
    text_frozen_layers: int = 0
    # the last N vision blocks train (at train.lr_vision) on the state the cache stores before them
    # (`extract-features --vision-trainable-blocks K`, N <= K; train/zoo/vision_blocks.py). 0: the cached
    # tokens are read as they are, frozen; -1: all K. With fusion "two_tower" the whole tower always runs
    # and N counts its top layers that train
    vision_trainable_blocks: int = 0
    # --- model zoo: switches the seeds' models differ by; each is off at the AFDVQF value
    # region tokens add embeddings of the detector's label, score and box (AFNER, AFDVQF)
    region_meta: bool = True
    # weight of the slot type-presence loss (ours, no seed has it): each entity type's mean final QGF
    # slot predicts whether the post holds an entity of that type (BCE); 0 turns it off
    slot_type_loss_weight: float = 0.0
    label_smoothing: float = 0.0  # softmax head only: cross-entropy label smoothing, in [0, 1)
    emission_temperature: float = 1.0  # softmax head only: emissions are divided by it in the loss
    # a LayerNorm before the emission layer, whose weights start at N(0, 0.02), bias 0 (MANGO's classifier)
    emission_norm: bool = False
    bilstm: bool = False  # a BiLSTM between the (fused) word states and the emission layer, any model
    # BiLSTM width per direction (the emission layer reads 2 * lstm_hidden); with bilstm only
    lstm_hidden: int = 256
    # --- fusion "single_stream" (IFAformer, seed 002; train/zoo/ifaformer.py) ---
    # learned position embeddings of the visual tokens appended after the text; the cache's
    # P patches + K regions per post must fit
    visual_positions: int = 256

    # ---- MANGO (seed 003; fusion "mango", train/zoo/mango.py); the seed's names. Its model file sets them.
    resampler: bool = True  # learned queries resample the visual tokens; false: the stack reads them all
    resampler_queries: int = 8  # learned queries of the visual resampler (Q)
    stack_layers: int = 7  # multimodal Transformer blocks: self-attn over words, cross-attn to the image, FFN
    rel_temp: float = 1.0  # temperature of the per-word relevance sigmoid(rel_head(.) / rel_temp)
    # the gated fusion's update starts small: alpha (a learned scale) and the gate's bias at their
    # original inits (liguochun0304/AFDVQF@a20bc9e model.py GatedConcatFusion: 0.02 and -1.5). On a small
    # set that update never grows enough to carry the image (README, MANGO row): 1.0 and 0.0 open it
    gate_alpha_init: float = 0.02
    gate_bias_init: float = -1.5
    align_lambda: float = 0.0  # weight of the relevance + entity weighted text/fused alignment loss
    align_warmup_epochs: int = 5  # align_lambda grows linearly to its value over this many epochs; 0: none
    preserve_lambda: float = 0.0  # weight of the (1 - relevance) weighted fused/text MSE
    nce_lambda: float = 0.0  # weight of the text / CLIP global embedding InfoNCE
    nce_tau: float = 0.15  # temperature of that InfoNCE
    sparsity_lambda: float = 0.0  # weight of the mean relevance (few words lean on the image)
    # ---- the CLIP CLS state (patch token 0 of a cache whose patch_source says "CLS first")
    # a visual token like the patches; false drops it (the originals read last_hidden_state[:, 1:])
    patch_cls: bool = True
    # the pooled image vector is the patch projection of the CLS state (MANGO's clip_proj(v_cls)),
    # not the projection of the cache's global embedding
    global_from_cls: bool = False
    # ---- query-guided fusion's queries, patch resampler and alignment (AFNER, AFDVQF: the originals'
    # TypeQueryGenerator + MultiGrainedQuerySet, DualVisionTokenExtractor, alignment_pooling)
    # the QGF query slots start as the text encoder's state at [MASK] in "[MASK] is TYPE" for their type
    # plus a random offset per slot (N(0, 0.02^2)); false: random slots alone. Fusion "qgf" only
    typed_queries: bool = True
    # learned queries resample the projected patch tokens, LayerNorm(attention(queries, patches)), to this
    # many visual tokens (the originals: 16); 0 keeps every patch as a visual token. Without patches
    # (the no_patch ablation) there is nothing to resample and it is not built
    patch_resampler_queries: int = 0
    # how cached tokens become visual tokens (train/zoo/visual.py): "shared", the zoo's (a type embedding, one
    # LayerNorm and dropout over all tokens; a region's box as 7 numbers), or "dual", the originals'
    # DualVisionTokenExtractor (no type embedding, no shared LayerNorm or dropout; a region's feature,
    # label, box (x1, y1, x2, y2) and score embeddings summed under a LayerNorm)
    visual_builder: str = "shared"
    # the text side of the InfoNCE alignment: "cls", the encoder's [CLS] state (AFDVQF's default), or
    # "mean", the mean word state
    alignment_pooling: str = "cls"

    def __post_init__(self):
        self._check_types()
        check_model_name(self.name)
        if not self.text_encoder:
            raise ValueError("model.text_encoder must name a preset (minilm, tiny-bert) or a folder, got ''")
        TASKS.check(self.task)
        FUSIONS.check(self.fusion)
        HEADS.check(self.head)
        task_heads = TASKS.get(self.task).heads
        if self.head not in task_heads:
            raise ValueError(
                f"model.head {self.head!r} does not fit model.task {self.task!r}; "
                f"its heads are {', '.join(task_heads)}"
            )
        if self.adaptive_gate and self.fusion != "qgf":
            # A switch that does nothing would make an ablation that flips it (no_adapt) a silent no-op.
            raise ValueError(
                f"model.adaptive_gate = true gates query-guided fusion only, but model.fusion is "
                f"{self.fusion!r}; set model.adaptive_gate = false"
            )
        if self.adaptive_fusion not in ADAPTIVE_FUSIONS:
            raise ValueError(
                f"model.adaptive_fusion must be one of {', '.join(map(repr, ADAPTIVE_FUSIONS))}, "
                f"got {self.adaptive_fusion!r}"
            )
        if not self.adaptive_gate and self.adaptive_fusion != "weights":
            raise ValueError(
                f"model.adaptive_fusion = {self.adaptive_fusion!r} chooses the adaptive fusion, but "
                "model.adaptive_gate is false; set model.adaptive_gate = true or leave it at 'weights'"
            )
        if self.emission_lr not in EMISSION_LRS:
            raise ValueError(
                f"model.emission_lr must be one of {', '.join(map(repr, EMISSION_LRS))}, got {self.emission_lr!r}"
            )
        for name in ("qfnet_layers", "qfnet_heads", "slots_per_type", "visual_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not self.text_only and not (self.use_patches or self.use_regions):
            raise ValueError(
                "model.use_patches and model.use_regions are both false: there would be no visual tokens; "
                "set model.text_only = true for a text-only model"
            )
        for name in AUX_LOSSES.weights.values():
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.alignment_temperature <= 0:
            raise ValueError(f"model.alignment_temperature must be > 0, got {self.alignment_temperature}")
        for name in ("image_dropout", "dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"model.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.emission_temperature <= 0:
            raise ValueError(f"model.emission_temperature must be > 0, got {self.emission_temperature}")
        for name, default in (("label_smoothing", 0.0), ("emission_temperature", 1.0)):
            # A knob that does nothing would make an experiment that turns it a silent no-op.
            if self.head != "softmax" and getattr(self, name) != default:
                raise ValueError(
                    f"model.{name} applies to the softmax head only, but model.head is {self.head!r}; "
                    f"leave it at {default}"
                )
        if self.lstm_hidden < 1:
            raise ValueError(f"model.lstm_hidden must be >= 1, got {self.lstm_hidden}")
        if not self.bilstm and self.lstm_hidden != 256:
            raise ValueError(
                "model.lstm_hidden sets the BiLSTM's width, but model.bilstm is false; "
                "set model.bilstm = true or leave it at 256"
            )
        self._check_mango()
        self._check_queries()
        if self.global_from_cls and not self.use_patches:
            raise ValueError(
                "model.global_from_cls = true projects the CLS state with the patch projection, but "
                "model.use_patches is false; set model.use_patches = true or model.global_from_cls = false"
            )
        if self.text_frozen_layers < 0:
            raise ValueError(f"model.text_frozen_layers must be >= 0, got {self.text_frozen_layers}")
        if self.text_frozen_layers and self.fusion in IMAGE_IN_EVERY_LAYER:
            # IFAformer's image enters the encoder's first layer, so no layer's output is text alone.
            raise ValueError(
                f"model.text_frozen_layers = {self.text_frozen_layers} freezes text encoder layers whose "
                f"output is computed once from the text, but model.fusion = {self.fusion!r} (IFAformer) "
                "feeds the image into every encoder layer; set model.text_frozen_layers = 0"
            )
        if self.vision_trainable_blocks < -1:
            raise ValueError(
                f"model.vision_trainable_blocks must be >= 0, or -1 for all, got {self.vision_trainable_blocks}"
            )
        if self.vision_trainable_blocks and self.text_only:
            raise ValueError(
                f"model.vision_trainable_blocks = {self.vision_trainable_blocks} trains vision blocks, but "
                "model.text_only = true reads no image; set model.vision_trainable_blocks = 0"
            )
        if self.max_length < 3:
            # [CLS] + one sub-word + [SEP]: anything shorter cannot show the encoder a single word.
            raise ValueError(f"model.max_length must be >= 3, got {self.max_length}")

    @property
    def reads_vision_state(self) -> bool:
        """Whether the model reads the state the cache stores before the last vision blocks: it trains
        some of them, or it is IFAformer's two towers, whose vision tower always runs beside the text."""
        return not self.text_only and (self.vision_trainable_blocks != 0 or self.fusion == "two_tower")

    @property
    def reads_tokens(self) -> bool:
        """Whether the model reads the cache's patch and region tokens: not text-only, and not IFAformer's
        two towers, which run from the stored vision state alone (model.use_patches / use_regions do not
        apply to them)."""
        return not self.text_only and self.fusion != "two_tower"

    def _check_queries(self) -> None:
        if not self.typed_queries and self.fusion != "qgf":
            raise ValueError(
                f"model.typed_queries = false changes the query slots of model.fusion = 'qgf', but "
                f"model.fusion is {self.fusion!r}; leave it at true"
            )
        if self.patch_resampler_queries < 0:
            raise ValueError(
                f"model.patch_resampler_queries must be >= 0, got {self.patch_resampler_queries}"
            )
        if self.visual_builder not in VISUAL_BUILDERS:
            raise ValueError(
                f"model.visual_builder must be one of {', '.join(map(repr, VISUAL_BUILDERS))}, "
                f"got {self.visual_builder!r}"
            )
        if self.alignment_pooling not in ALIGNMENT_POOLINGS:
            raise ValueError(
                f"model.alignment_pooling must be one of {', '.join(map(repr, ALIGNMENT_POOLINGS))}, "
                f"got {self.alignment_pooling!r}"
            )

    def _check_mango(self) -> None:
        for name in ("resampler_queries", "stack_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rel_temp", "nce_tau"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.align_warmup_epochs < 0:
            raise ValueError(f"model.align_warmup_epochs must be >= 0, got {self.align_warmup_epochs}")
        for name in ("gate_alpha_init", "gate_bias_init"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"model.{name} must be a finite number, got {getattr(self, name)}")
        if self.fusion == "mango":
            return
        for name, default in (("gate_alpha_init", 0.02), ("gate_bias_init", -1.5)):
            if getattr(self, name) != default:
                raise ValueError(
                    f"model.{name} sets the init of model.fusion = 'mango''s gated fusion, but model.fusion "
                    f"is {self.fusion!r}; leave it at {default}"
                )
        # Off the mango fusion these knobs would do nothing: an ablation flipping one must fail, not no-op.
        if not self.resampler:
            raise ValueError(
                f"model.resampler = false removes the resampler of model.fusion = 'mango', but model.fusion "
                f"is {self.fusion!r}"
            )
        for name in ("align_lambda", "preserve_lambda", "nce_lambda", "sparsity_lambda"):
            if getattr(self, name) > 0:
                raise ValueError(
                    f"model.{name} > 0 weighs a loss of model.fusion = 'mango' (it reads that fusion's "
                    f"relevance and states), but model.fusion is {self.fusion!r}; set it to 0"
                )


@dataclass
class TrainConfig(Config):
    """The optimisation: schedule, learning rates, early stopping, hardware."""

    SECTION = "train"

    epochs: int = 10  # passes over the training split
    batch_size: int = 16  # posts per step
    lr_encoder: float = 3e-5  # AdamW learning rate of the text encoder
    lr_fusion: float = 1e-4  # learning rate of the visual token builder, fusion and emission layer
    # learning rate of the CRF transition scores: they start small (pytorch-crf draws them from
    # U(-0.1, 0.1)) and must grow to several units to forbid moves, so they need a larger step
    lr_crf: float = 5e-3
    # learning rate of the vision blocks that train (model.vision_trainable_blocks > 0); MANGO trains
    # CLIP's last 2 blocks at 1e-5
    lr_vision: float = 1e-5
    # AdamW weight decay on weight matrices; none on biases, LayerNorm, embeddings, the CRF's
    # transition scores or the fusion's query slots (the BERT recipe; MNERModel.param_groups)
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1  # fraction of all steps spent in linear warm-up, then linear decay to 0
    max_grad_norm: float = 1.0  # gradient clipping (global L2 norm)
    # batches whose gradients are summed (each loss / grad_accum) before one optimiser step: an effective
    # batch of batch_size x grad_accum at the memory of batch_size (AFNER's original uses 2)
    grad_accum: int = 1
    patience: int = 3  # stop after this many epochs without a better valid F1
    seed: int = 42  # seeds Python, NumPy and torch (model init, shuffling, dropout, image dropout)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    amp: str = "auto"  # mixed precision: auto | off | fp16 | bf16
    num_workers: int = 0  # DataLoader worker processes (the cache reader is fork-safe)
    threads: int = 0  # torch intra-op threads; 0: the CPUs this process may use (mner.runtime.set_threads)
    cache_in_memory: bool = False  # load the whole feature cache into RAM before training

    def __post_init__(self):
        self._check_types()
        for name in ("epochs", "batch_size", "patience", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_encoder", "lr_fusion", "lr_crf", "lr_vision", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for name in ("seed", "num_workers", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"train.device must be auto, cpu, mps, cuda or cuda:N; got {self.device!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"train.amp must be one of {', '.join(AMP_MODES)}; got {self.amp!r}")


# Settings that change how a run is carried out, not the model it trains or the data it sees: a
# --resume may change them (to extend a finished run: --resume --epochs N), and the run's record
# takes the new values. Every other recorded setting must be as the run was started.
RUNTIME_SETTINGS = frozenset(
    {
        "train.epochs",
        "train.patience",
        "train.device",
        "train.amp",
        "train.num_workers",
        "train.threads",
        "train.cache_in_memory",
    }
)


@dataclass
class RunConfig:
    """Everything one training run needs; saved whole as the run folder's config.json."""

    model: ModelConfig  # the model
    train: TrainConfig  # the optimisation
    cache_dir: str | None  # the feature cache folder; None only for a text-only model
    data: DataConfig  # the posts: data folder, or dataset + data_root; image folder
    out_dir: str  # the run folder to create (or resume)
    resume: bool = False  # continue from out_dir/checkpoint instead of starting fresh
    # root folder of the text-state caches (model.text_frozen_layers > 0); None: $MNER_TEXT_CACHE,
    # else ~/.cache/mner/text-states (cache/text_states.py)
    text_cache: str | None = None

    def __post_init__(self):
        if not isinstance(self.data, DataConfig):
            raise ValueError(f"data must be a DataConfig, got {self.data!r}")
        if not self.out_dir:
            raise ValueError("out_dir must name the run folder, got ''")
        if self.cache_dir is None and not self.model.text_only:
            raise SettingError(
                "{cache_dir} is required unless model.text_only is true (pass --cache DIR, or --text-only)"
            )

    def to_dict(self) -> dict:
        """Plain JSON-ready dict, nested by section."""
        return {
            "model": self.model.to_dict(),
            "train": self.train.to_dict(),
            "cache_dir": self.cache_dir,
            "data": self.data.to_dict(),
            "out_dir": self.out_dir,
            "resume": self.resume,
            "text_cache": self.text_cache,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "dict") -> RunConfig:
        """Inverse of `to_dict`; raises ValueError naming `source` for unknown or missing keys.

        A "data" table may hold only some of DataConfig's keys (runs made before it listed all four).
        """
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"{source}: unknown run config keys {unknown}; known keys: {', '.join(names)}")
        missing = [name for name in ("model", "train", "cache_dir", "data", "out_dir") if name not in data]
        if missing:
            raise ValueError(f"{source}: run config is missing {missing}")
        return cls(
            model=ModelConfig.from_dict(data["model"], source),
            train=TrainConfig.from_dict(data["train"], source),
            cache_dir=data["cache_dir"],
            data=DataConfig.from_dict(data["data"], source),
            out_dir=data["out_dir"],
            resume=data.get("resume", False),
            text_cache=data.get("text_cache"),
        )


def model_names() -> tuple[str, ...]:
    """Every model of the zoo: the stems of configs/models/*.toml, sorted."""
    return tuple(sorted(p.stem for p in configs.path(MODELS_DIR).glob("*.toml")))


def check_model_name(name: str) -> None:
    """ValueError listing the models when `name` has no configs/models/<name>.toml."""
    if name not in model_names():
        raise ValueError(f"model.name must be one of {', '.join(model_names())}; got {name!r}")
