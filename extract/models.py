"""The image models: a vision backbone (patch tokens + a global embedding), either a CLIP vision encoder
or a torchvision ResNet (layer4 grid + avgpool, as BertResNet reads it), and a torchvision Faster R-CNN
(region tokens). All load only from local files; the presets `tiny-clip`, `tiny-resnet` and `tiny-frcnn`
are seeded random models written to disk first and then loaded through the same code path.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import transforms
from torchvision.models import detection, resnet
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from transformers import (
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from mner.cache.checksums import file_sha256
from mner.configs.presets import materialise, preset_dir
from mner.extract.config import (
    CLIP_VISION,
    DETECTORS,
    NO_DETECTOR,
    RESNETS,
    TINY_CLIP,
    TINY_FRCNN,
    TINY_RESNET,
    ExtractConfig,
)

PRESET_MARKER = "mner_preset.json"  # written beside a preset's weights: {"preset": NAME, "untrained": true}
# Part of every preset's file name: bump it when a preset's recipe changes, so a folder written by an
# older recipe is never mistaken for the current one (presets are written once and then reused).
PRESET_VERSION = 2
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

# 91 COCO category names indexed by label id ("__background__" at 0, "N/A" for unused ids); reading the
# weights enum's meta does not download anything.
COCO_CATEGORIES = list(detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])

_TORCHVISION_DETECTORS: dict[str, Callable[..., FasterRCNN]] = {
    "fasterrcnn_resnet50_fpn": detection.fasterrcnn_resnet50_fpn,
    "fasterrcnn_resnet50_fpn_v2": detection.fasterrcnn_resnet50_fpn_v2,
    "fasterrcnn_mobilenet_v3_large_fpn": detection.fasterrcnn_mobilenet_v3_large_fpn,
    "fasterrcnn_mobilenet_v3_large_320_fpn": detection.fasterrcnn_mobilenet_v3_large_320_fpn,
}
assert set(_TORCHVISION_DETECTORS) | {TINY_FRCNN, NO_DETECTOR} == set(DETECTORS)
# The manifest's models.detector of a cache extracted with --detector none.
NO_DETECTOR_INFO = {"name": NO_DETECTOR, "untrained": False}


# ----------------------------------------------------------------------------------------------- CLIP


@dataclass
class ClipEncoder:
    """A CLIP vision tower with the image processor saved beside it (so normalisation always matches)."""

    vision: CLIPVisionModel  # embeddings -> transformer -> post_layernorm(CLS)
    projection: nn.Linear | None  # visual_projection (hidden -> projection_dim) when the checkpoint has one
    processor: CLIPImageProcessor  # loaded from the same folder as `vision`
    info: dict  # identity, weight sha256s, processor settings, untrained flag (manifest "models.clip")
    num_patches: int  # P = 1 + (image_size / patch_size) ** 2, CLS first
    patch_dim: int  # Dp = hidden_size
    global_dim: int  # Dg = projection_dim, or hidden_size without a projection
    patch_source: str  # what the stored patch tokens are (TokenSpec.patch_source)
    global_source: str  # what the stored global embedding is (TokenSpec.global_source)

    def preprocess(self, images: list) -> Tensor:
        """PIL images or (3, H, W) uint8 tensors -> pixel_values (B, 3, S, S) float32."""
        return preprocess_for_clip(self.processor, images)

    @property
    def image_preprocess(self) -> Callable[[list], Tensor]:
        """`preprocess` without the model, for DataLoader workers: images -> (B, 3, S, S)."""
        return functools.partial(preprocess_for_clip, self.processor)

    @torch.inference_mode()
    def encode(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """pixel_values (B, 3, S, S) -> patch tokens (B, P, Dp) and global embeddings (B, Dg)."""
        out = self.vision(pixel_values=pixel_values)
        pooled = out.pooler_output  # (B, Dp) post-layernormed CLS
        global_embed = self.projection(pooled) if self.projection is not None else pooled  # (B, Dg)
        return out.last_hidden_state, global_embed

    def to(self, device: torch.device) -> ClipEncoder:
        self.vision.to(device)
        if self.projection is not None:
            self.projection.to(device)
        return self


def preprocess_for_clip(processor: CLIPImageProcessor, images: list) -> Tensor:
    """PIL images or (3, H, W) uint8 tensors -> pixel_values (B, 3, S, S), as the encoder's processor makes them."""
    with one_thread():
        return processor(images=images, return_tensors="pt")["pixel_values"]


def load_clip(name_or_path: str, device: str | torch.device = "cpu") -> ClipEncoder:
    """Load "tiny-clip" or a local Hugging Face CLIP / CLIP-vision folder, in eval mode on `device`.

    A full CLIPModel folder contributes its vision tower and visual_projection; a CLIP-vision folder is
    read as CLIPVisionModelWithProjection when its weights hold a visual_projection, else CLIPVisionModel.
    """
    folder = materialise_tiny_clip() if name_or_path == TINY_CLIP else Path(name_or_path).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"CLIP model folder not found or has no config.json: {folder} "
            f"(give a local Hugging Face CLIP folder or '{TINY_CLIP}')"
        )
    if not (folder / "preprocessor_config.json").is_file():
        raise ValueError(
            f"CLIP folder {folder} has no preprocessor_config.json; the image processor must come from "
            "the same folder as the encoder so the normalisation matches"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    load = {"local_files_only": True, "dtype": torch.float32}
    try:
        vision, projection, class_name = _load_clip_tower(folder, config_file, model_type, load)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    except OSError as err:  # transformers' word for missing/unreadable weight or processor files
        raise ValueError(f"CLIP folder {folder} cannot be loaded: {err}") from err
    vision_cfg = vision.config
    crop = processor.crop_size or {}
    if processor.do_center_crop and (crop.get("height"), crop.get("width")) != (vision_cfg.image_size,) * 2:
        raise ValueError(
            f"CLIP folder {folder}: processor crop_size {crop} does not match the encoder's image_size "
            f"{vision_cfg.image_size}"
        )
    return _finish_clip(name_or_path, folder, vision, projection, class_name, processor, device)


def _load_clip_tower(folder, config_file, model_type, load):
    """(vision tower, visual projection or None, class name) from a CLIP or CLIP-vision folder."""
    if model_type == "clip":
        full = CLIPModel.from_pretrained(folder, **load)
        vision, projection, class_name = full.vision_model, full.visual_projection, "CLIPModel"
    elif model_type == "clip_vision_model":
        if "visual_projection.weight" in _weight_names(folder):
            with_proj = CLIPVisionModelWithProjection.from_pretrained(folder, **load)
            vision, projection = with_proj.vision_model, with_proj.visual_projection
            class_name = "CLIPVisionModelWithProjection"
        else:
            vision, projection = CLIPVisionModel.from_pretrained(folder, **load), None
            class_name = "CLIPVisionModel"
    else:
        raise ValueError(
            f"{config_file} has model_type {model_type!r}; expected 'clip' or 'clip_vision_model'"
        )
    return vision, projection, class_name


def _finish_clip(name_or_path, folder, vision, projection, class_name, processor, device) -> ClipEncoder:
    """Wrap a loaded vision tower + processor as a frozen ClipEncoder with its manifest info."""
    vision_cfg = vision.config
    vision.eval()
    if projection is not None:
        projection.eval()
    marker = _read_marker(folder)
    patch_source = "vision_model.last_hidden_state (CLS first)"
    global_source = "image_embeds (visual_projection)" if projection is not None else "pooler_output"
    info = {
        "name": TINY_CLIP if name_or_path == TINY_CLIP else folder.resolve().name,
        "path": str(folder.resolve()),
        "class": class_name,
        "sha256": {p.name: file_sha256(p) for p in _weight_files(folder)},
        "untrained": bool(marker.get("untrained", False)),
        "processor": json.loads(processor.to_json_string()),
        "image_size": vision_cfg.image_size,
        "patch_size": vision_cfg.patch_size,
        "patch_source": patch_source,
        "global_source": global_source,
    }
    hidden = vision_cfg.hidden_size
    encoder = ClipEncoder(
        vision=vision,
        projection=projection,
        processor=processor,
        info=info,
        num_patches=1 + (vision_cfg.image_size // vision_cfg.patch_size) ** 2,
        patch_dim=hidden,
        global_dim=projection.out_features if projection is not None else hidden,
        patch_source=patch_source,
        global_source=global_source,
    )
    return encoder.to(torch.device(device))


def materialise_tiny_clip(root: Path | None = None) -> Path:
    """Write the seeded random tiny CLIP vision model + processor (64 px, 16 px patches -> 17 tokens)."""

    def write(folder: Path) -> None:
        config = CLIPVisionConfig(
            image_size=64,
            patch_size=16,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=32,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = CLIPVisionModelWithProjection(config)
        model.save_pretrained(folder)
        CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(
            folder
        )
        (folder / PRESET_MARKER).write_text(json.dumps({"preset": TINY_CLIP, "untrained": True}))

    return materialise((root or preset_dir()) / f"{TINY_CLIP}.v{PRESET_VERSION}", write, is_dir=True)


def _weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _weight_names(folder: Path) -> set[str]:
    """Parameter names stored in a HF folder (safetensors headers, a sharded index, or a .bin)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    names: set[str] = set()
    for path in _weight_files(folder):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                names.update(handle.keys())
        elif path.suffix == ".bin":
            names.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return names


def _read_marker(folder: Path) -> dict:
    marker = folder / PRESET_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else {}


# --------------------------------------------------------------------------------------------- ResNet

# torchvision's ImageNet evaluation transform for its ResNets (ResNet50_Weights.IMAGENET1K_V1.transforms()):
# resize the short side to 256, center crop 224, ImageNet mean/std. Recorded in the manifest and fingerprint.
IMAGENET_PREPROCESS = {
    "resize": 256,
    "crop": 224,
    "interpolation": "bilinear",
    "antialias": True,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
# tiny-resnet sees 64 px crops (a 2x2 layer4 grid at stride 32), resized in the same 256:224 ratio.
TINY_RESNET_PREPROCESS = {**IMAGENET_PREPROCESS, "resize": 73, "crop": 64}
_TORCHVISION_RESNETS: dict[str, Callable[..., resnet.ResNet]] = {
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
}
assert set(_TORCHVISION_RESNETS) == set(RESNETS)


@dataclass
class ResNetEncoder:
    """A torchvision ResNet cut before its classifier: the layer4 grid as patch tokens, avgpool as global.

    Follows BertResNet (seed 004), which reads the ResNet's avgpool output; the grid keeps where things are.
    """

    model: resnet.ResNet  # conv1 ... layer4, avgpool (fc is never run)
    transform: Callable  # PIL image -> (3, S, S) float32, `preprocessing` below
    info: dict  # architecture, checkpoint sha256, preprocessing, untrained flag (manifest "models.vision")
    num_patches: int  # P = (S / 32) ** 2 grid cells, row-major, no CLS
    patch_dim: int  # Dp = layer4 channels (2048 for the Bottleneck ResNets)
    global_dim: int  # Dg = Dp: avgpool of the same grid
    patch_source: str  # what the stored patch tokens are (TokenSpec.patch_source)
    global_source: str  # what the stored global embedding is (TokenSpec.global_source)

    @property
    def image_preprocess(self) -> Callable[[list], Tensor]:
        """images -> (B, 3, S, S), picklable for DataLoader workers."""
        return functools.partial(preprocess_for_resnet, self.transform)

    def preprocess(self, images: list) -> Tensor:
        """PIL images -> pixel values (B, 3, S, S) float32, ImageNet-normalised."""
        return preprocess_for_resnet(self.transform, images)

    @torch.inference_mode()
    def encode(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """pixel_values (B, 3, S, S) -> layer4 grid tokens (B, P, Dp) and avgpool embeddings (B, Dp)."""
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(pixel_values))))  # (B, 64, S/4, S/4)
        grid = m.layer4(m.layer3(m.layer2(m.layer1(x))))  # (B, Dp, S/32, S/32)
        global_embed = torch.flatten(m.avgpool(grid), 1)  # (B, Dp): the grid's mean, as torchvision's forward
        return grid.flatten(2).transpose(1, 2), global_embed  # (B, P, Dp) row-major cells, (B, Dp)

    def to(self, device: torch.device) -> ResNetEncoder:
        self.model.to(device)
        return self


def resnet_transform(settings: dict) -> transforms.Compose:
    """The preprocessing `settings` (IMAGENET_PREPROCESS's keys) as a torchvision transform."""
    assert settings["interpolation"] == "bilinear"
    return transforms.Compose(
        [
            transforms.Resize(
                settings["resize"],
                interpolation=transforms.InterpolationMode.BILINEAR,
                antialias=settings["antialias"],
            ),
            transforms.CenterCrop(settings["crop"]),
            transforms.PILToTensor(),  # (3, S, S) uint8
            transforms.ConvertImageDtype(torch.float32),  # in [0, 1]
            transforms.Normalize(settings["mean"], settings["std"]),
        ]
    )


def preprocess_for_resnet(transform: Callable, images: list) -> Tensor:
    """PIL images -> (B, 3, S, S) float32, single-threaded (the same bits in workers and the main process)."""
    with one_thread():
        return torch.stack([transform(image) for image in images])


def load_resnet(name: str, ckpt: str | None, device: str | torch.device = "cpu") -> ResNetEncoder:
    """Build ResNet `name` (random init, nothing downloaded), load the state dict `ckpt`, eval on `device`.

    "tiny-resnet" writes its seeded random checkpoint to the preset folder when no `ckpt` is given.
    Raises ValueError, in one line naming the file, for a missing, unreadable or non-fitting checkpoint.
    """
    if name != TINY_RESNET and name not in _TORCHVISION_RESNETS:
        raise ValueError(f"unknown ResNet {name!r}; known: {', '.join([*RESNETS, TINY_RESNET])}")
    if ckpt is None and name != TINY_RESNET:
        raise ValueError(
            f"--vision-ckpt is required for {name}: give a local torchvision state-dict file "
            "(weights are never downloaded)"
        )
    untrained = ckpt is None
    ckpt_path = materialise_tiny_resnet() if ckpt is None else Path(ckpt).expanduser()
    if not ckpt_path.is_file():
        raise ValueError(f"vision checkpoint not found: {ckpt_path}")
    model = _tiny_resnet() if name == TINY_RESNET else _TORCHVISION_RESNETS[name](weights=None)
    _load_state(model, ckpt_path, name, "vision")
    model.eval()
    settings = TINY_RESNET_PREPROCESS if name == TINY_RESNET else IMAGENET_PREPROCESS
    side = settings["crop"] // 32  # the stem and layer2-4 halve the size 5 times
    patch_source = f"{name}.layer4 ({side}x{side} grid, row-major)"
    global_source = f"{name}.avgpool"
    info = {
        "name": name,
        "arch": name,
        "ckpt": str(ckpt_path.resolve()),
        "sha256": file_sha256(ckpt_path),
        "untrained": untrained,
        "preprocessing": settings,
        "patch_source": patch_source,
        "global_source": global_source,
    }
    width = model.fc.in_features
    encoder = ResNetEncoder(
        model=model,
        transform=resnet_transform(settings),
        info=info,
        num_patches=side * side,
        patch_dim=width,
        global_dim=width,
        patch_source=patch_source,
        global_source=global_source,
    )
    return encoder.to(torch.device(device))


def _read_state(path: Path, role: str):
    """torch.load(path, weights_only=True), or a one-line ValueError naming the `role` checkpoint file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load on a non-checkpoint raises Unpickling/Key/EOF/Runtime errors alike
        # torch's own message runs over many lines of advice about weights_only; its first line says what failed.
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{role} checkpoint {path} is not a torchvision state_dict file readable with "
            f"torch.load(weights_only=True): {type(err).__name__}: {first}"
        ) from err


def _load_state(model: nn.Module, path: Path, name: str, role: str) -> None:
    """Load a state-dict file into `model` strictly; one-line ValueErrors naming the file."""
    state = _read_state(path, role)
    if not isinstance(state, dict):
        raise ValueError(
            f"{role} checkpoint {path} holds a {type(state).__name__}, not a state_dict for {name}"
        )
    try:
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, AttributeError) as err:
        # "Error(s) in loading state_dict ...:" then a line per size mismatch -> one line
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        sizes = [line for line in lines if line.startswith("size mismatch for")]
        detail = f"{len(sizes)} size mismatches, the first {sizes[0]}" if sizes else (lines or [""])[-1]
        raise ValueError(f"{role} checkpoint {path} does not fit {name}: {detail}") from err
    parts = [
        f"{len(keys)} {kind} keys (e.g. {keys[0]})"
        for kind, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys))
        if keys
    ]
    if parts:
        raise ValueError(f"{role} checkpoint {path} does not fit {name}: {', '.join(parts)}")


def materialise_tiny_resnet(root: Path | None = None) -> Path:
    """Write the seeded random tiny ResNet state dict (loaded afterwards like a real checkpoint)."""

    def write(path: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = _tiny_resnet()
        buffer = io.BytesIO()  # through a buffer: the archive name must not depend on the temporary file
        torch.save(model.state_dict(), buffer)
        path.write_bytes(buffer.getvalue())

    return materialise((root or preset_dir()) / f"{TINY_RESNET}.v{PRESET_VERSION}.pt", write, is_dir=False)


def _tiny_resnet() -> resnet.ResNet:
    """torchvision's ResNet with one BasicBlock per stage and 8/16/32/64 channels (about 0.2M parameters):
    the same module names and forward as resnet50, a 64-d layer4 grid."""
    model = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    model.inplanes = 8
    model.conv1 = nn.Conv2d(3, 8, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(8)
    model.layer1 = model._make_layer(resnet.BasicBlock, 8, 1)
    model.layer2 = model._make_layer(resnet.BasicBlock, 16, 1, stride=2)
    model.layer3 = model._make_layer(resnet.BasicBlock, 32, 1, stride=2)
    model.layer4 = model._make_layer(resnet.BasicBlock, 64, 1, stride=2)
    model.fc = nn.Linear(64, 10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            # Random running statistics, so eval-mode BatchNorm is not an identity and the test sees real mixing.
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model


def load_vision(cfg: ExtractConfig, device: str | torch.device = "cpu") -> ClipEncoder | ResNetEncoder:
    """The vision backbone `cfg.vision` names: the CLIP folder cfg.clip, or a ResNet from cfg.vision_ckpt."""
    if cfg.vision == CLIP_VISION:
        return load_clip(cfg.clip, device)
    return load_resnet(cfg.vision, cfg.vision_ckpt, device)


# ------------------------------------------------------------------------------------------- Detector


@dataclass
class Regions:
    """The kept detections of one image, best score first (R <= topk)."""

    boxes: Tensor  # (R, 4) float32 xyxy in [0, 1] by the original width / height
    pixel_boxes: Tensor  # (R, 4) float32 xyxy in original-image pixels (for CLIP crops)
    labels: Tensor  # (R,) int64 COCO category ids
    scores: Tensor  # (R,) float32
    feats: Tensor | None  # (R, Dr) box-head features pooled on exactly these boxes; None when not asked


class RegionDetector:
    """A torchvision Faster R-CNN split into its stages so region tokens can be re-pooled on kept boxes."""

    def __init__(self, model: FasterRCNN, topk: int, info: dict):
        self.model = model.eval()
        self.topk = topk  # K: regions kept per image
        self.info = info  # identity, checkpoint sha256, thresholds, categories (manifest "models.detector")
        # The box head's width is what the class predictor reads (1024 for the torchvision models).
        self.region_dim = model.roi_heads.box_predictor.cls_score.in_features

    @property
    def transform(self) -> nn.Module:
        """The detector's own normalise + resize (GeneralizedRCNNTransform), run in DataLoader workers."""
        return self.model.transform

    def preprocess(self, image: Tensor) -> Tensor:
        """(3, H, W) float in [0, 1] -> (3, h, w) normalised and resized the way the detector was trained."""
        return preprocess_for_detector(self.model.transform, image)

    def to(self, device: torch.device) -> RegionDetector:
        self.model.to(device)
        return self

    @torch.inference_mode()
    def detect(
        self, images: list[Tensor], original_sizes: list[tuple[int, int]], with_features: bool = True
    ) -> list[Regions]:
        """Detect on preprocessed images (from `preprocess`) and keep the top-k boxes per image.

        images: (3, h_i, w_i) each; original_sizes: (H_i, W_i) before resizing. The region feature is
        box_head(box_roi_pool(features, kept boxes)): pooled again on the final, regressed box rather
        than on the proposal it came from, so it describes exactly the stored box.
        """
        model = self.model
        image_sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        batch = model.transform.batch_images(
            images, size_divisible=model.transform.size_divisible
        )  # (B, 3, h, w)
        image_list = ImageList(batch, image_sizes)
        features = model.backbone(image_list.tensors)
        if isinstance(features, Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = model.rpn(image_list, features)
        detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
        kept = []
        for det in detections:
            # roi_heads already thresholds, runs per-class NMS and sorts; the stable sort makes top-k explicit.
            order = det["scores"].argsort(descending=True, stable=True)[: self.topk]
            kept.append({name: value[order] for name, value in det.items()})
        feats: list[Tensor | None] = [None] * len(kept)
        if with_features:
            boxes = [det["boxes"] for det in kept]  # (R_i, 4) in the resized frame
            pooled = model.roi_heads.box_roi_pool(features, boxes, image_list.image_sizes)  # (sum R, C, 7, 7)
            feats = list(model.roi_heads.box_head(pooled).split([len(b) for b in boxes]))  # (R_i, Dr) each
        original = model.transform.postprocess(
            [{"boxes": det["boxes"]} for det in kept], image_list.image_sizes, original_sizes
        )
        regions = []
        for det, orig, feat, (height, width) in zip(kept, original, feats, original_sizes):
            pixel_boxes = orig["boxes"].float()  # (R, 4) original pixels
            scale = pixel_boxes.new_tensor([width, height, width, height])
            regions.append(
                Regions(
                    boxes=(pixel_boxes / scale).clamp(0.0, 1.0),
                    pixel_boxes=pixel_boxes,
                    labels=det["labels"],
                    scores=det["scores"].float(),
                    feats=feat,
                )
            )
        return regions


def preprocess_for_detector(transform: nn.Module, image: Tensor) -> Tensor:
    """(3, H, W) float in [0, 1] -> (3, h, w): the GeneralizedRCNNTransform's per-image normalise + resize.

    Batching (padding to a common size) happens later in `RegionDetector.detect`.
    """
    assert not transform.training, "the detector transform must be in eval mode (fixed test size)"
    with one_thread():
        resized, _ = transform.resize(transform.normalize(image), None)
    return resized


@contextlib.contextmanager
def one_thread():
    """Run torch ops single-threaded: CPU interpolation rounds differently with the thread count, and
    preprocessing must give the same bits in a DataLoader worker (1 thread) and in the main process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_detector(name: str, ckpt: str | None, cfg: ExtractConfig) -> RegionDetector:
    """Build detector `name` (randomly initialised, nothing downloaded), then load `ckpt` into it.

    cfg.score_thr / cfg.nms_iou / cfg.topk set roi_heads' score threshold, NMS IoU and detections per image.
    "tiny-frcnn" writes its seeded random checkpoint to the preset folder when no `ckpt` is given.
    """
    if name not in DETECTORS or name == NO_DETECTOR:
        known = ", ".join(d for d in DETECTORS if d != NO_DETECTOR)
        raise ValueError(f"unknown detector {name!r}; known: {known}")
    if ckpt is None and name != TINY_FRCNN:
        raise ValueError(
            f"--detector-ckpt is required for {name}: give a local state-dict file (weights are never downloaded)"
        )
    untrained = ckpt is None
    ckpt_path = materialise_tiny_frcnn() if ckpt is None else Path(ckpt).expanduser()
    if not ckpt_path.is_file():
        raise ValueError(f"detector checkpoint not found: {ckpt_path}")
    heads = {
        "box_score_thresh": cfg.score_thr,
        "box_nms_thresh": cfg.nms_iou,
        "box_detections_per_img": cfg.topk,
    }
    if name == TINY_FRCNN:
        model = _tiny_frcnn(**heads)
    else:
        model = _TORCHVISION_DETECTORS[name](weights=None, weights_backbone=None, num_classes=91, **heads)
    state = _read_state(ckpt_path, "detector")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        raise ValueError(f"detector checkpoint {ckpt_path} does not fit {name}: {err}") from err
    transform = model.transform
    info = {
        "name": name,
        "ckpt": str(ckpt_path.resolve()),
        "sha256": file_sha256(ckpt_path),
        "untrained": untrained,
        "categories": COCO_CATEGORIES,
        "score_thresh": cfg.score_thr,
        "nms_thresh": cfg.nms_iou,
        "detections_per_img": cfg.topk,
        "min_size": list(transform.min_size),
        "max_size": transform.max_size,
        "image_mean": list(transform.image_mean),
        "image_std": list(transform.image_std),
    }
    return RegionDetector(model, cfg.topk, info)


def materialise_tiny_frcnn(root: Path | None = None) -> Path:
    """Write the seeded random tiny Faster R-CNN state dict (loaded afterwards like a real checkpoint)."""

    def write(path: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = _tiny_frcnn()
        # Through a buffer: torch.save names the archive after the file, and the temporary name would
        # make the bytes (and so the sha256 in the fingerprint) differ between runs.
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        path.write_bytes(buffer.getvalue())

    return materialise((root or preset_dir()) / f"{TINY_FRCNN}.v{PRESET_VERSION}.pt", write, is_dir=False)


def _tiny_frcnn(**heads) -> FasterRCNN:
    """A few-thousand-parameter Faster R-CNN: 3 strided convs (stride 8, 16 channels), 64-d box head."""
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
    )
    backbone.out_channels = 16
    predictor = FastRCNNPredictor(64, 91)
    # nn.Linear's default init gives near-uniform class scores (about 1/91 each, a few 1e-4 apart), so
    # top-k would hinge on rounding noise; wide logits spread the scores like a real detector's.
    nn.init.normal_(predictor.cls_score.weight, std=10.0)
    return FasterRCNN(
        backbone,
        num_classes=None,
        min_size=128,
        max_size=128,
        rpn_anchor_generator=AnchorGenerator(sizes=((16, 32, 64),), aspect_ratios=((0.5, 1.0, 2.0),)),
        rpn_pre_nms_top_n_test=200,
        rpn_post_nms_top_n_test=100,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(16 * 7 * 7, 64),
        box_predictor=predictor,
        **heads,
    )


def model_info(vision: ClipEncoder | ResNetEncoder, detector: RegionDetector | None) -> dict:
    """The manifest's "models" entry (and part of the fingerprint): {"clip": {...}, "detector": {...}},
    with "vision" in place of "clip" for a ResNet (so a CLIP cache's fingerprint is what it always was),
    and NO_DETECTOR_INFO as the detector of a --detector none cache."""
    role = "clip" if isinstance(vision, ClipEncoder) else "vision"
    return {role: vision.info, "detector": NO_DETECTOR_INFO if detector is None else detector.info}
