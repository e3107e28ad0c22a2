"""What a cache holds, independent of how it is stored: the token shapes (`TokenSpec`), one image's
tokens (`Record`), the status names and each dataset's dtype.

The HDF5 layout that stores them is `cache/shards.py`'s; see the "Cache" section of docs/design.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from mner.cache.fingerprint import json_default

SCHEMA_VERSION = 1
STATUS_NAMES = ("ok", "missing", "corrupt")
STATUS_CODES = {name: code for code, name in enumerate(STATUS_NAMES)}
# TokenSpec.region_source of a cache extracted without a detector: region datasets of K = 0 rows.
NO_REGIONS = "none"
# The three token tensors, stored one image per chunk; everything else is small per-image metadata.
TOKEN_DATASETS = ("patch_tokens", "global_embed", "region_feats")
# Per-region arrays; rows >= num_regions are zero padding.
REGION_DATASETS = ("region_feats", "region_labels", "region_scores", "region_boxes")
# The array fields of a Record, in shard order.
RECORD_ARRAYS = (
    "patch_tokens",
    "global_embed",
    "region_feats",
    "region_labels",
    "region_scores",
    "region_boxes",
)


@dataclass(frozen=True)
class TokenSpec:
    """Shapes of the cached tokens and where they came from; one spec per cache."""

    num_patches: int  # P: patch tokens per image (CLS first when the encoder has one)
    patch_dim: int  # Dp: width of a patch token
    global_dim: int  # Dg: width of the global image embedding
    max_regions: int  # K: detector regions kept per image; shorter lists are zero-padded; 0: no detector
    region_dim: int  # Dr: width of a region feature; 0 when K is 0
    patch_source: str  # e.g. "vision_model.last_hidden_state (CLS first)" or "resnet50.layer4 (7x7 grid)"
    global_source: str  # e.g. "image_embeds (visual_projection)", "pooler_output" or "resnet50.avgpool"
    region_source: str  # "frcnn_box_head" | "clip_crop" | "none" (extracted with --detector none: K = Dr = 0)

    def __post_init__(self):
        for name in ("num_patches", "patch_dim", "global_dim", "max_regions", "region_dim"):
            value = getattr(self, name)
            least = 0 if name in ("max_regions", "region_dim") and self.region_source == NO_REGIONS else 1
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"TokenSpec.{name} must be a positive integer, got {value!r}")
        for name in ("patch_source", "global_source", "region_source"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"TokenSpec.{name} must be a non-empty string, got {value!r}")
        if self.region_source == NO_REGIONS and (self.max_regions, self.region_dim) != (0, 0):
            raise ValueError(
                f"TokenSpec.region_source {NO_REGIONS!r} needs max_regions = region_dim = 0, got "
                f"{self.max_regions} and {self.region_dim}"
            )

    @property
    def has_regions(self) -> bool:
        """False for a cache extracted with --detector none (its region datasets hold K = 0 rows)."""
        return self.max_regions > 0

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (what the manifest and the `spec_json` attribute hold)."""
        return {field.name: json_default(getattr(self, field.name)) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> TokenSpec:
        """Inverse of `to_dict`; unknown or missing fields raise ValueError."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data))
        if unknown or missing:
            raise ValueError(f"token spec has unknown fields {unknown} and missing fields {missing}")
        return cls(**data)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image shape of every shard dataset (the shard shape is (N, *shape))."""
        K = self.max_regions
        return {
            "keys": (),
            "status": (),
            "image_size": (2,),
            "patch_tokens": (self.num_patches, self.patch_dim),
            "global_embed": (self.global_dim,),
            "region_feats": (K, self.region_dim),
            "region_labels": (K,),
            "region_scores": (K,),
            "region_boxes": (K, 4),
            "num_regions": (),
        }


# dtype of every dataset except `keys`, whose fixed-length bytes width depends on the shard.
DTYPES = {
    "status": np.dtype(np.uint8),
    "image_size": np.dtype(np.int32),
    "patch_tokens": np.dtype(np.float16),
    "global_embed": np.dtype(np.float16),
    "region_feats": np.dtype(np.float16),
    "region_labels": np.dtype(np.int32),
    "region_scores": np.dtype(np.float32),
    "region_boxes": np.dtype(np.float32),
    "num_regions": np.dtype(np.int32),
}


@dataclass
class Record:
    """One image's cached tokens, at the padded shapes of a TokenSpec."""

    key: str  # image key (IMGID or relative image path)
    status: str  # one of STATUS_NAMES
    width: int  # original image width in pixels; 0 when status != "ok"
    height: int  # original image height in pixels; 0 when status != "ok"
    num_regions: int  # detected regions kept, in [0, K]
    patch_tokens: np.ndarray  # (P, Dp) float16
    global_embed: np.ndarray  # (Dg,) float16
    region_feats: np.ndarray  # (K, Dr) float16, rows >= num_regions are zero
    region_labels: np.ndarray  # (K,) int32 COCO category id, 0 on padding
    region_scores: np.ndarray  # (K,) float32
    region_boxes: np.ndarray  # (K, 4) float32 xyxy in [0, 1] of the original width/height
    error: str = ""  # why status != ok (kept in the manifest, not in the shard)


def empty_record(key: str, spec: TokenSpec, status: str, error: str = "") -> Record:
    """A record with zeroed tokens and no regions, for images that could not be read.

    Returns a Record with patch_tokens (P, Dp), global_embed (Dg,), region tensors (K, ...) all zero.
    """
    if status not in STATUS_NAMES:
        raise ValueError(f"image {key!r}: unknown status {status!r}; expected one of {STATUS_NAMES}")
    shapes = spec.shapes()
    return Record(
        key=key,
        status=status,
        width=0,
        height=0,
        num_regions=0,
        **{name: np.zeros(shapes[name], DTYPES[name]) for name in RECORD_ARRAYS},
        error=error,
    )
