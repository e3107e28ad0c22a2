"""The extraction config: which data, which models, how regions are chosen, where the cache goes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from mner.cache.datasets import DATA_FIELDS, DataConfig
from mner.runtime import DEVICE_PATTERN, SettingError

# Registry names understood by `extract.models.build_detector`; the four torchvision ones need an explicit
# checkpoint file, "tiny-frcnn" is the seeded random preset for tests and demos.
DETECTORS = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "tiny-frcnn",
    "none",
)
TINY_CLIP = "tiny-clip"
# The demo's CLIP: untrained too, with the bundled MiniLM's depth, width and heads (6 layers of 384, 12
# heads), so IFAformer's two towers pair with the default text encoder layer for layer.
DEMO_CLIP = "demo-clip"
CLIP_PRESETS = (TINY_CLIP, DEMO_CLIP)
TINY_FRCNN = "tiny-frcnn"
NO_DETECTOR = "none"  # no region tokens: the cache's region datasets hold K = 0 rows
# Visual backbones understood by `extract.models.load_vision`: "clip" reads the --clip folder; the
# torchvision ResNets need --vision-ckpt, "tiny-resnet" is the seeded random preset for tests and demos.
CLIP_VISION = "clip"
RESNETS = ("resnet50", "resnet101", "resnet152")
TINY_RESNET = "tiny-resnet"
VISIONS = (CLIP_VISION, *RESNETS, TINY_RESNET)
# Weak detections still carry context and the model sees each region's score, so keep the bar low.
DEFAULT_SCORE_THR = 0.2
REGION_FEATURES = ("frcnn", "clip-crop")
AMP_MODES = ("off", "fp16", "bf16")


@dataclass
class ExtractConfig:
    """Everything that decides the tokens in a cache, plus how to run the extraction.

    Recorded in the cache manifest as `to_dict()`: the data fields flat at the top level, beside the rest.
    """

    data: DataConfig  # the posts whose images are extracted: data folder or named dataset, image folder
    out: str = ""  # cache folder to write (manifest.json + shard-*.h5)
    # "tiny-clip" (seeded random preset) or a local HF CLIP / CLIP-vision folder. None: tiny-clip for a
    # data folder, refused for a named dataset (real data must not get random-weight tokens by default).
    # Unused (and refused) with a ResNet vision.
    clip: str | None = None
    # detector registry name, one of DETECTORS; None: as for clip (tiny-frcnn); "none": no region tokens
    detector: str | None = None
    # detector state-dict file; required for every detector but tiny-frcnn and none
    detector_ckpt: str | None = None
    # Patch tokens + global embedding from: "clip" (the --clip folder), a torchvision ResNet (layer4 grid +
    # avgpool, from the vision_ckpt state dict) or "tiny-resnet" (seeded random preset); one of VISIONS.
    vision: str = CLIP_VISION
    vision_ckpt: str | None = None  # ResNet state-dict file; required for resnet50/101/152
    # K > 0 also stores the state before the vision model's last K blocks (`vision_state`) and their weights,
    # so stage two can train them: CLIP's hidden_states[-K-1] (K = its layer count: the embedding output),
    # a ResNet's layer3 map for layer4 (K = 1 only). 0: the frozen tokens alone.
    vision_trainable_blocks: int = 0
    # region token: "frcnn" box-head feature or "clip-crop" CLIP embed of the crop
    region_features: str = "frcnn"
    topk: int = 20  # regions kept per image (highest scores after threshold and NMS); K in the shards
    score_thr: float | None = None  # minimum detection score; None: 0.2, or 0.0 for tiny-frcnn (see below)
    nms_iou: float = 0.5  # IoU above which roi_heads' per-class NMS drops the lower-scoring box
    batch_size: int = 16  # images per model forward; batches are fixed per shard so values are reproducible
    num_workers: int = 2  # DataLoader workers decoding and preprocessing images (0: in the main process)
    device: str = "auto"  # "auto" (cuda when available), "cpu", "mps", "cuda" or "cuda:N" (mner.runtime)
    amp: str = "off"  # autocast on CUDA: "off" (fp32), "fp16" or "bf16"; tokens are stored as float16 anyway
    shard_size: int = 512  # images per shard file; shard i holds the same keys whatever the world size
    overwrite: bool = False  # replace a cache made with a different configuration instead of refusing
    splits: tuple[str, ...] = (
        "train",
        "valid",
        "test",
    )  # splits whose images are extracted (those that exist)

    def __post_init__(self) -> None:
        # Absolute paths: the config is recorded in the manifest and re-used by `mner predict` and
        # `mner cache verify/show`, which may run from another folder.
        if not isinstance(self.data, DataConfig):
            raise ValueError(f"data must be a DataConfig, got {self.data!r}")
        self.data = self.data.absolute()
        self._default_models()
        for name in ("out", "detector_ckpt", "vision_ckpt"):
            value = getattr(self, name)
            if value:
                setattr(self, name, str(Path(value).expanduser().absolute()))
        if self.clip and self.clip not in CLIP_PRESETS:
            self.clip = str(Path(self.clip).expanduser().absolute())
        self.splits = tuple(self.splits)
        if not self.out:
            raise SettingError("{out} (the cache folder to write) is required")
        if self.vision not in VISIONS:
            raise ValueError(f"unknown vision {self.vision!r}; known: {', '.join(VISIONS)}")
        self._check_vision()
        self._check_trainable_blocks()
        if self.detector not in DETECTORS:
            raise ValueError(f"unknown detector {self.detector!r}; known: {', '.join(DETECTORS)}")
        if self.region_features not in REGION_FEATURES:
            raise SettingError(
                "{region_features} must be one of {known}, got {got!r}",
                known=", ".join(REGION_FEATURES),
                got=self.region_features,
            )
        if self.topk < 1:
            raise SettingError("{topk} must be >= 1, got {got}", got=self.topk)
        if self.score_thr is None:
            # A random detector scores every class near 1/91; any positive threshold would leave no regions.
            self.score_thr = 0.0 if self.detector == TINY_FRCNN else DEFAULT_SCORE_THR
        if not 0.0 <= self.score_thr <= 1.0:
            raise SettingError("{score_thr} must be in [0, 1], got {got}", got=self.score_thr)
        if not 0.0 < self.nms_iou <= 1.0:
            raise SettingError("{nms_iou} must be in (0, 1], got {got}", got=self.nms_iou)
        if self.batch_size < 1:
            raise SettingError("{batch_size} must be >= 1, got {got}", got=self.batch_size)
        if self.num_workers < 0:
            raise SettingError("{num_workers} must be >= 0, got {got}", got=self.num_workers)
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise SettingError(
                "{device} must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N', got {got!r}",
                got=self.device,
            )
        if self.amp not in AMP_MODES:
            raise SettingError(
                "{amp} must be one of {known}, got {got!r}", known=", ".join(AMP_MODES), got=self.amp
            )
        if self.shard_size < 1:
            raise SettingError("{shard_size} must be >= 1, got {got}", got=self.shard_size)
        if not self.splits:
            raise ValueError("splits must name at least one split")
        if self.detector == NO_DETECTOR:
            if self.detector_ckpt:
                raise ValueError("--detector-ckpt is given, but --detector none runs no detector; drop one")
            if self.region_features == "clip-crop":
                raise ValueError(
                    "--region-features clip-crop embeds the detector's boxes, but --detector none finds none"
                )
        elif self.detector != TINY_FRCNN and not self.detector_ckpt:
            # Checked here, before any data is read or model loaded, with the loader's own message.
            raise ValueError(
                f"--detector-ckpt is required for {self.detector}: give a local state-dict file "
                "(weights are never downloaded)"
            )

    def _check_vision(self) -> None:
        """The CLIP folder for vision clip; for a ResNet no CLIP at all, and its checkpoint."""
        if self.vision == CLIP_VISION:
            if not self.clip:
                raise SettingError("{clip} must be 'tiny-clip' or a local CLIP model folder")
            if self.vision_ckpt:
                raise ValueError(
                    "--vision-ckpt is for a ResNet --vision; --vision clip reads the --clip folder"
                )
            return
        if self.clip:
            raise ValueError(f"--clip is for --vision clip; --vision {self.vision} reads no CLIP model")
        if self.region_features == "clip-crop":
            raise ValueError(
                f"--region-features clip-crop embeds crops with CLIP; --vision {self.vision} has no CLIP "
                "(use --region-features frcnn)"
            )
        if self.vision in RESNETS and not self.vision_ckpt:
            raise ValueError(
                f"--vision-ckpt is required for {self.vision}: give a local torchvision state-dict file "
                "(weights are never downloaded)"
            )

    def _check_trainable_blocks(self) -> None:
        """K >= 0; a ResNet trains layer4 (K = 1) or nothing. CLIP's layer count is checked once it loads."""
        K = self.vision_trainable_blocks
        if isinstance(K, bool) or not isinstance(K, int) or K < 0:
            raise SettingError("{vision_trainable_blocks} must be an integer >= 0, got {got}", got=repr(K))
        if self.vision != CLIP_VISION and K > 1:
            raise ValueError(
                f"--vision-trainable-blocks {K} is not possible with --vision {self.vision}: a ResNet stores "
                "the layer3 map so that its layer4 trains (1), or nothing (0); its stages differ in width "
                "and stride, so there is no stack of equal blocks to cut deeper"
            )

    def _default_models(self) -> None:
        """The untrained presets for a clip/detector left unset, unless the data is a named (real) dataset."""
        models = (("--detector", self.detector),)
        if self.vision == CLIP_VISION:
            models = (("--clip", self.clip), *models)
        unset = [flag for flag, value in models if value is None]
        if unset and self.data.dataset is not None:
            raise ValueError(
                f"--dataset {self.data.dataset} is real data: give {' and '.join(unset)} explicitly "
                f"(e.g. --clip /models/clip-vit-base-patch32 --detector fasterrcnn_resnet50_fpn "
                f"--detector-ckpt /models/frcnn_r50.pth); the defaults {TINY_CLIP} and {TINY_FRCNN} are "
                "untrained random presets whose tokens carry no image content (name them to use them anyway)"
            )
        if self.vision == CLIP_VISION:
            self.clip = TINY_CLIP if self.clip is None else self.clip
        self.detector = TINY_FRCNN if self.detector is None else self.detector

    def check_inputs(self) -> None:
        """Check, from the file system alone (no torch), what extraction will read: the data folder, the
        CLIP folder and the vision and detector checkpoints exist. Run before the models load (and by the CLI before
        it imports the vision stack), so a typo costs no model loading. Raises ValueError."""
        self.data.resolve()  # the data folder or named dataset exists
        if (
            self.vision == CLIP_VISION
            and self.clip not in CLIP_PRESETS
            and not (Path(self.clip) / "config.json").is_file()
        ):
            raise ValueError(
                f"CLIP model folder not found or has no config.json: {self.clip} "
                f"(give a local Hugging Face CLIP folder or '{TINY_CLIP}')"
            )
        if self.vision_ckpt and not Path(self.vision_ckpt).is_file():
            raise ValueError(f"vision checkpoint not found: {self.vision_ckpt}")
        if self.detector_ckpt and not Path(self.detector_ckpt).is_file():
            raise ValueError(f"detector checkpoint not found: {self.detector_ckpt}")

    def to_dict(self) -> dict:
        """Plain JSON-able copy: the data fields first and flat (as manifests have always held them),
        then every other field in order, splits as a list; vision_trainable_blocks only when not 0."""
        out = {**self.data.to_dict(), **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}
        del out["data"]
        if not self.vision_trainable_blocks:
            # A cache without vision state records exactly the config it did before the option existed:
            # its shards' config_json, and so their bytes, stay what they were.
            del out["vision_trainable_blocks"]
        out["splits"] = list(self.splits)
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "dict") -> ExtractConfig:
        """Inverse of `to_dict`; raises ValueError naming `source` for a key that is not a field."""
        names = {f.name for f in dataclasses.fields(cls)} - {"data"}
        unknown = sorted(set(data) - names - set(DATA_FIELDS))
        if unknown:
            raise ValueError(f"{source}: unknown extraction config keys {unknown}")
        settings = {name: value for name, value in data.items() if name in names}
        return cls(data=DataConfig(**{name: data[name] for name in DATA_FIELDS if name in data}), **settings)
