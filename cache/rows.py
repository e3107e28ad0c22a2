"""The one statement of what a valid shard row is (`row_problems`), applied by `ShardWriter.write`
to each record and by `verify_cache` to the stored rows, each in its own wording.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mner.cache.spec import (
    DTYPES,
    RECORD_ARRAYS,
    REGION_DATASETS,
    STATUS_CODES,
    STATUS_NAMES,
    TOKEN_DATASETS,
    Record,
    TokenSpec,
)

# The largest finite float16; anything larger becomes inf when cast.
FP16_MAX = 65504.0


def checked_arrays(record: Record, spec: TokenSpec) -> dict[str, np.ndarray]:
    """Validate a record against the spec; returns its arrays cast to the shard dtypes."""
    key = record.key
    if record.status not in STATUS_NAMES:
        raise ValueError(f"image {key!r}: unknown status {record.status!r}; expected one of {STATUS_NAMES}")
    shapes = spec.shapes()
    given = {}
    for name in RECORD_ARRAYS:
        array = np.asarray(getattr(record, name))
        if array.shape != shapes[name]:
            raise ValueError(f"image {key!r}: {name} has shape {array.shape}, the spec needs {shapes[name]}")
        given[name] = array
    # The values as given, before the cast: a float32 token above FP16_MAX must not pass as inf.
    block = {name: array[None] for name, array in given.items()}  # (1, ...) each
    block["status"] = np.array([STATUS_CODES[record.status]])  # (1,)
    block["image_size"] = np.array([[record.width, record.height]])  # (1, 2)
    block["num_regions"] = np.array([record.num_regions])  # (1,)
    problems = row_problems(block, spec)
    if problems:
        raise ValueError(f"image {key!r}: {problems[0].rule(0)}")
    return {name: array.astype(DTYPES[name], copy=False) for name, array in given.items()}


@dataclass(frozen=True)
class RowProblem:
    """The rows of a block that break one rule of the shard layout, and the two ways to say so."""

    check: str  # the rule's short name, e.g. "boxes" or "nan patch_tokens"
    rows: np.ndarray  # (M,) indices into the block of the rows that break it
    rule: Callable[[int], str]  # for block row i: the rule, as ShardWriter tells its caller
    found: Callable[[int], str]  # for block row i: what is wrong, as verify_cache reports a stored row


def row_problems(block: dict[str, np.ndarray], spec: TokenSpec) -> list[RowProblem]:
    """Check B rows against what every shard row must satisfy; returns the broken rules in order.

    Args:
        block: "status" (B,) status codes, "image_size" (B, 2) width and height, "num_regions" (B,),
            and each of RECORD_ARRAYS at (B, *shape) for the spec's shapes (any real dtype).
    ShardWriter raises the first problem of the record it is given (B = 1); verify_cache lists every
    problem of each block of stored rows. The shapes are the caller's to check.
    """
    K = spec.max_regions
    codes, count = block["status"], block["num_regions"]  # (B,), (B,)
    width, height = block["image_size"][:, 0], block["image_size"][:, 1]  # (B,), (B,)
    B = len(codes)
    # An explicit size: with K = 0 the region arrays are empty and numpy cannot infer a -1.
    flat = {name: block[name].reshape(B, int(np.prod(block[name].shape[1:]))) for name in RECORD_ARRAYS}
    padding = np.arange(K)[None, :] >= np.clip(count, 0, K)[:, None]  # (B, K) True on padding rows
    boxes = block["region_boxes"]  # (B, K, 4) xyxy
    not_ok = codes != STATUS_CODES["ok"]  # (B,)

    def same(message):
        return message, message

    def status_name(i) -> str:
        return STATUS_NAMES[codes[i]] if codes[i] < len(STATUS_NAMES) else str(codes[i])

    def not_empty(i) -> str:
        return f"status {status_name(i)} must have zero size, regions and tokens (use empty_record)"

    # (check, bad rows (B,), rule message, found message) in the order ShardWriter reports them.
    rules = [
        (
            "status",
            codes >= len(STATUS_NAMES),
            *same(lambda i: f"status code {codes[i]} is not one of 0..{len(STATUS_NAMES) - 1}"),
        ),
        (
            "num_regions",
            (count < 0) | (count > K),
            *same(lambda i: f"num_regions {count[i]} outside [0, {K}]"),
        ),
    ]
    finite = {name: np.isfinite(values) for name, values in flat.items()}  # (B, size) each
    for name in RECORD_ARRAYS:
        rules.append(
            (f"nan {name}", ~finite[name].all(axis=1), *same(lambda i, d=name: f"{d} contains NaN or inf"))
        )
    for name in TOKEN_DATASETS:
        peak = np.abs(np.where(finite[name], flat[name], 0)).max(axis=1, initial=0.0)  # (B,)
        rules.append(
            (
                f"overflow {name}",
                peak > FP16_MAX,
                *same(
                    lambda i, d=name, peak=peak: (
                        f"{d} has |value| {peak[i]:g} > {FP16_MAX:g}, which overflows float16; "
                        "normalise the features before caching"
                    )
                ),
            )
        )
    for name in REGION_DATASETS:
        set_rows = block[name].reshape(B, K, int(np.prod(block[name].shape[2:]))).any(axis=2)  # (B, K)
        rules.append(
            (
                f"padding {name}",
                (set_rows & padding).any(axis=1),
                lambda i, d=name: f"{d} rows >= num_regions ({count[i]}) must be zero padding",
                lambda i, d=name: f"{d} rows >= num_regions ({count[i]}) are not zero",
            )
        )
    outside = ((boxes < 0) | (boxes > 1)).any(axis=2) & ~padding  # (B, K)
    inverted = ((boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])) & ~padding  # (B, K)
    rules += [
        (
            "boxes",
            outside.any(axis=1),
            lambda i: "region_boxes must lie in [0, 1] (normalised by image width/height)",
            lambda i: "region_boxes outside [0, 1]",
        ),
        (
            "boxes",
            inverted.any(axis=1),
            lambda i: "region_boxes must be xyxy with x2 >= x1 and y2 >= y1",
            lambda i: "region_boxes with x2 < x1 or y2 < y1",
        ),
        (
            "ok size",
            ~not_ok & ((width < 1) | (height < 1)),
            *same(lambda i: f"status ok needs width and height >= 1, got {width[i]}x{height[i]}"),
        ),
        (
            "not ok tokens",
            not_ok & np.any([flat[name].any(axis=1) for name in TOKEN_DATASETS], axis=0),
            not_empty,
            lambda i: "status is not ok but its tokens are not zero",
        ),
        (
            "not ok size",
            not_ok & ((width != 0) | (height != 0) | (count != 0)),
            not_empty,
            lambda i: "status is not ok but its size or num_regions is not zero",
        ),
    ]
    return [
        RowProblem(check, np.flatnonzero(bad), rule, found) for check, bad, rule, found in rules if bad.any()
    ]
