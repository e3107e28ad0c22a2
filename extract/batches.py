"""Stage one's batches: one image decoded and preprocessed for both models (`Images`, in DataLoader
workers), a batch of them stacked (`collate`), and the models run on a batch to give one `Record`
per image (`encode_batch`). `benchmarks/bench_train.py` times this same encoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from mner.cache.spec import Record, TokenSpec, empty_record
from mner.extract.clip import ClipEncoder
from mner.extract.config import ExtractConfig
from mner.extract.detector import RegionDetector, preprocess_for_detector
from mner.extract.images import load_image
from mner.extract.resnet import ResNetEncoder


class Images(Dataset):
    """Decodes one image and prepares both model inputs; runs in DataLoader workers."""

    def __init__(self, items: list[tuple[str, Path]], preprocess, detector_transform, keep_original: bool):
        self.items = items  # (key, path) in extraction order
        self.preprocess = preprocess  # the vision encoder's image_preprocess: [PIL image] -> (1, 3, S, S)
        # the detector's GeneralizedRCNNTransform (eval mode); None with --detector none
        self.detector_transform = detector_transform
        self.keep_original = keep_original  # clip-crop mode crops regions from the original pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        key, path = self.items[index]
        loaded = load_image(path)
        item = {"key": key, "status": loaded.status, "width": loaded.width, "height": loaded.height}
        item.update(error=loaded.error, pixel_values=None, detector_input=None, original=None)
        if loaded.status != "ok":
            return item
        try:
            item["pixel_values"] = self.preprocess([loaded.image])[0]  # (3, S, S)
            pixels = pil_to_tensor(loaded.image)  # (3, H, W) uint8
            if self.detector_transform is not None:
                item["detector_input"] = preprocess_for_detector(
                    self.detector_transform, pixels.float() / 255.0
                )
        except Exception as err:  # noqa: BLE001 - resizing code raises anything (RuntimeError, ValueError, ...)
            # This image alone becomes "corrupt", exactly as an undecodable file would: the batch goes on.
            why = f"cannot preprocess {path} ({loaded.width}x{loaded.height}): {type(err).__name__}: {err}"
            item.update(
                status="corrupt", width=0, height=0, error=why, pixel_values=None, detector_input=None
            )
            return item
        if self.keep_original:
            item["original"] = pixels
        return item


def collate(items: list[dict]) -> dict:
    """`Images` items -> one batch: the items' metadata, and the ok images' model inputs stacked."""
    ok = [item for item in items if item["status"] == "ok"]
    return {
        "items": [
            {name: item[name] for name in ("key", "status", "width", "height", "error")} for item in items
        ],
        "pixel_values": torch.stack([item["pixel_values"] for item in ok]) if ok else None,  # (B_ok, 3, S, S)
        "detector_inputs": [item["detector_input"] for item in ok],  # (3, h, w) each
        "originals": [item["original"] for item in ok],  # (3, H, W) uint8 each, or None
    }


def encode_batch(
    batch: dict,
    clip: ClipEncoder | ResNetEncoder,
    detector: RegionDetector | None,
    spec: TokenSpec,
    cfg: ExtractConfig,
    device: torch.device,
) -> list[Record]:
    """Run both models on the ok images of a batch; missing/corrupt images get zeroed records."""
    metas = batch["items"]
    ok = [meta for meta in metas if meta["status"] == "ok"]
    if not ok:
        return [empty_record(meta["key"], spec, meta["status"], meta["error"]) for meta in metas]
    pixel_values = batch["pixel_values"].to(device, non_blocking=True)  # (B_ok, 3, S, S)
    patches, globals_ = clip.encode(pixel_values)  # (B_ok, P, Dp), (B_ok, Dg)
    crops = cfg.region_features == "clip-crop"
    if detector is None:  # --detector none: every record gets K = 0 region rows
        regions, region_feats = [None] * len(ok), [None] * len(ok)
    else:
        regions = detector.detect(
            [image.to(device, non_blocking=True) for image in batch["detector_inputs"]],
            [(meta["height"], meta["width"]) for meta in ok],
            with_features=not crops,
        )
        if crops:
            pixel_boxes = [r.pixel_boxes for r in regions]
            region_feats = _crop_embeddings(clip, batch["originals"], pixel_boxes, device)
        else:
            region_feats = [r.feats for r in regions]
    patches = patches.float().cpu().numpy()
    globals_ = globals_.float().cpu().numpy()
    found = iter(range(len(ok)))
    records = []
    for meta in metas:
        if meta["status"] != "ok":
            records.append(empty_record(meta["key"], spec, meta["status"], meta["error"]))
            continue
        i = next(found)
        records.append(_padded_record(meta, patches[i], globals_[i], regions[i], region_feats[i], spec))
    return records


def _padded_record(
    meta: dict,
    patch: np.ndarray,
    global_embed: np.ndarray,
    regions,
    feats: torch.Tensor | None,
    spec: TokenSpec,
) -> Record:
    """Pad one image's outputs to the spec's K regions (regions None: no detector, K = 0)."""
    K, n = spec.max_regions, 0 if regions is None else len(regions.scores)
    region_feats = np.zeros((K, spec.region_dim), np.float16)  # (K, Dr)
    labels = np.zeros(K, np.int32)
    scores = np.zeros(K, np.float32)
    boxes = np.zeros((K, 4), np.float32)
    if regions is not None:
        region_feats[:n] = feats.float().cpu().numpy()
        labels[:n] = regions.labels.cpu().numpy()
        scores[:n] = regions.scores.float().cpu().numpy()
        boxes[:n] = regions.boxes.float().cpu().numpy()
    return Record(
        key=meta["key"],
        status="ok",
        width=meta["width"],
        height=meta["height"],
        num_regions=n,
        patch_tokens=patch.astype(np.float16),
        global_embed=global_embed.astype(np.float16),
        region_feats=region_feats,
        region_labels=labels,
        region_scores=scores,
        region_boxes=boxes,
    )


def _crop_embeddings(
    clip: ClipEncoder, originals: list[torch.Tensor], pixel_boxes: list[torch.Tensor], device: torch.device
) -> list[torch.Tensor]:
    """CLIP global embedding of each box crop of the original image; (R_i, Dg) per image."""
    crops, counts = [], []
    for image, boxes in zip(originals, pixel_boxes):
        height, width = image.shape[-2:]
        for x0, y0, x1, y1 in boxes.tolist():
            # Whole pixels covering the box, at least one pixel wide and inside the image.
            left, top = min(int(x0), width - 1), min(int(y0), height - 1)
            right, bottom = (
                max(min(int(np.ceil(x1)), width), left + 1),
                max(min(int(np.ceil(y1)), height), top + 1),
            )
            crops.append(image[:, top:bottom, left:right])  # (3, h, w) uint8
        counts.append(len(boxes))
    if not crops:
        return [torch.zeros(0, clip.global_dim) for _ in originals]
    _, embeds = clip.encode(clip.preprocess(crops).to(device))  # (sum R, Dg)
    return list(embeds.split(counts))
