"""The region detector: a torchvision Faster R-CNN whose box head gives each kept region's feature;
`tiny-frcnn` is a seeded random one. Nothing is downloaded: weights come from a local checkpoint.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import detection
from torchvision.models.detection.faster_rcnn import FasterRCNN, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from mner.cache.checksums import file_sha256
from mner.configs.presets import materialise, preset_dir
from mner.extract.config import (
    DETECTORS,
    NO_DETECTOR,
    TINY_FRCNN,
    ExtractConfig,
)
from mner.extract.weights import (
    PRESET_VERSION,
    one_thread,
    read_state,
)

# 91 COCO category names indexed by label id ("__background__" at 0, "N/A" for unused ids); reading the
# weights enum's meta does not download anything.
COCO_CATEGORIES = list(detection.FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])

TORCHVISION_DETECTORS: dict[str, Callable[..., FasterRCNN]] = {
    "fasterrcnn_resnet50_fpn": detection.fasterrcnn_resnet50_fpn,
    "fasterrcnn_resnet50_fpn_v2": detection.fasterrcnn_resnet50_fpn_v2,
    "fasterrcnn_mobilenet_v3_large_fpn": detection.fasterrcnn_mobilenet_v3_large_fpn,
    "fasterrcnn_mobilenet_v3_large_320_fpn": detection.fasterrcnn_mobilenet_v3_large_320_fpn,
}
assert set(TORCHVISION_DETECTORS) | {TINY_FRCNN, NO_DETECTOR} == set(DETECTORS)
# The manifest's models.detector of a cache extracted with --detector none.
NO_DETECTOR_INFO = {"name": NO_DETECTOR, "untrained": False}


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
        model = TORCHVISION_DETECTORS[name](weights=None, weights_backbone=None, num_classes=91, **heads)
    state = read_state(ckpt_path, "detector")
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
