"""The image models a configuration names: the vision backbone (`clip.py`: a CLIP vision encoder, or
`resnet.py`: a torchvision ResNet's layer4 grid and avgpool, as BertResNet reads it) and the region
detector (`detector.py`: a torchvision Faster R-CNN). All load only from local files; the presets
`tiny-clip`, `tiny-resnet` and `tiny-frcnn` are seeded random models written to disk first and then
loaded through the same code path (`weights.py` holds what they share).
"""

from __future__ import annotations

import torch

from mner.extract.clip import ClipEncoder, load_clip
from mner.extract.config import (
    CLIP_VISION,
    ExtractConfig,
)
from mner.extract.detector import NO_DETECTOR_INFO, RegionDetector
from mner.extract.resnet import ResNetEncoder, load_resnet


def load_vision(cfg: ExtractConfig, device: str | torch.device = "cpu") -> ClipEncoder | ResNetEncoder:
    """The vision backbone `cfg.vision` names: the CLIP folder cfg.clip, or a ResNet from cfg.vision_ckpt."""
    if cfg.vision == CLIP_VISION:
        return load_clip(cfg.clip, device)
    return load_resnet(cfg.vision, cfg.vision_ckpt, device)


def model_info(vision: ClipEncoder | ResNetEncoder, detector: RegionDetector | None) -> dict:
    """The manifest's "models" entry (and part of the fingerprint): {"clip": {...}, "detector": {...}},
    with "vision" in place of "clip" for a ResNet (so a CLIP cache's fingerprint is what it always was),
    and NO_DETECTOR_INFO as the detector of a --detector none cache."""
    role = "clip" if isinstance(vision, ClipEncoder) else "vision"
    return {role: vision.info, "detector": NO_DETECTOR_INFO if detector is None else detector.info}
