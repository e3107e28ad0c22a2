"""Summaries of a cache for people: what is in it (inspect_cache) and one image's record (show_record)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from mner.cache.manifest import read_manifest
from mner.cache.reader import CacheReader
from mner.cache.shards import open_shard_checked
from mner.cache.spec import STATUS_NAMES, TokenSpec
from mner.runtime import refuse_inputs_as_output

# Box colours, picked by label id so one class keeps one colour across images.
_PALETTE = ("#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6")
_TOP_LABELS = 10


def _category_names(manifest_models: dict) -> list[str]:
    return list(manifest_models.get("detector", {}).get("categories") or [])


def _label_name(names: list[str], label: int) -> str:
    return names[label] if 0 <= label < len(names) else f"id {label}"


def inspect_cache(cache_dir) -> dict:
    """Summary of a cache folder (reads the manifest and the small per-image arrays of each shard).

    Returns a JSON-ready dict: cache_dir, fingerprint, images, status {name: count},
    shards {count, rows, rows_per_shard}, tokens {dataset: {shape (per image), dtype}}, spec,
    models {clip: {path, untrained} (or vision: {name, untrained} for a ResNet), detector: {name, untrained}},
    region_histogram {regions: images}
    (ok images), top_labels [{label, name, count}] (10 most detected), disk {bytes, per_image}.
    """
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    spec = TokenSpec.from_dict(manifest["spec"])
    images = manifest["images"]
    names = _category_names(manifest["models"])

    status = Counter(image["status"] for image in images)
    histogram = Counter(image["num_regions"] for image in images if image["status"] == "ok")
    labels: Counter = Counter()
    tokens = {}
    for shard in manifest["shards"]:
        with open_shard_checked(cache_dir / shard["file"]) as f:
            counts = f["num_regions"][:]  # (N,)
            found = f["region_labels"][:]  # (N, K)
            valid = np.arange(spec.max_regions)[None, :] < counts[:, None]  # (N, K)
            labels.update(found[valid].tolist())
            if not tokens:
                tokens = {
                    name: {"shape": list(f[name].shape[1:]), "dtype": str(f[name].dtype)}
                    for name in spec.shapes()
                    if name != "keys"
                }
    disk = sum(path.stat().st_size for path in cache_dir.iterdir() if path.is_file())
    models = manifest["models"]
    clip, vision, detector = models.get("clip", {}), models.get("vision", {}), models.get("detector", {})
    return {
        "cache_dir": str(cache_dir),
        "fingerprint": manifest["fingerprint"],
        "images": len(images),
        "status": {name: status.get(name, 0) for name in STATUS_NAMES},
        "shards": {
            "count": len(manifest["shards"]),
            "rows": sum(shard["rows"] for shard in manifest["shards"]),
            "rows_per_shard": [shard["rows"] for shard in manifest["shards"]],
        },
        "tokens": tokens,
        "spec": spec.to_dict(),
        "models": {
            # A ResNet cache (--vision resnet50 ...) records its backbone as "vision", a CLIP one as "clip".
            **(
                {"vision": {"name": vision.get("name"), "untrained": vision.get("untrained")}}
                if vision
                else {"clip": {"path": clip.get("path"), "untrained": clip.get("untrained")}}
            ),
            "detector": {"name": detector.get("name"), "untrained": detector.get("untrained")},
        },
        "region_histogram": {count: histogram.get(count, 0) for count in range(spec.max_regions + 1)},
        "top_labels": [
            {"label": label, "name": _label_name(names, label), "count": count}
            for label, count in labels.most_common(_TOP_LABELS)
        ],
        "disk": {"bytes": disk, "per_image": disk / len(images) if images else 0.0},
    }


def format_inspection(info: dict) -> str:
    """A readable multi-line text report of inspect_cache's dict."""
    models = info["models"]
    lines = [
        f"cache        {info['cache_dir']}",
        f"fingerprint  {info['fingerprint']}",
        f"images       {info['images']}  (" + ", ".join(f"{k} {v}" for k, v in info["status"].items()) + ")",
        f"shards       {info['shards']['count']} with {info['shards']['rows']} rows "
        f"({', '.join(str(rows) for rows in info['shards']['rows_per_shard'])})",
        f"disk         {info['disk']['bytes']:,} bytes, {info['disk']['per_image']:,.0f} per image",
        f"vision       {models['vision']['name']}"
        + ("  (UNTRAINED)" if models["vision"]["untrained"] else "")
        if "vision" in models
        else f"clip         {models['clip']['path']}"
        + ("  (UNTRAINED)" if models["clip"]["untrained"] else ""),
        f"detector     {models['detector']['name']}"
        + ("  (UNTRAINED)" if models["detector"]["untrained"] else ""),
        "tokens (per image):",
    ]
    lines += [f"  {name:<14} {tuple(t['shape'])!s:<14} {t['dtype']}" for name, t in info["tokens"].items()]
    spec = info["spec"]
    lines += [
        f"  patches from {spec['patch_source']}; global from {spec['global_source']}; regions from {spec['region_source']}",
        "regions per ok image:",
    ]
    peak = max(info["region_histogram"].values(), default=0) or 1
    lines += [
        f"  {count:>3} {images:>7}  {'#' * round(40 * images / peak)}"
        for count, images in info["region_histogram"].items()
    ]
    lines.append("top detected labels:")
    lines += [f"  {t['name']:<20} (id {t['label']:>3}) {t['count']:>7}" for t in info["top_labels"]] or [
        "  (none)"
    ]
    return "\n".join(lines)


def show_record(cache_dir, key: str, png=None, image_path=None, scale: float = 1.0) -> dict:
    """One image's record: {key, status, error, size [w, h], num_regions, regions, and the shapes of
    patch_tokens (P, Dp), global_embed (Dg,), region_feats (K, Dr)}; regions are
    [{label, name, score, box [x1, y1, x2, y2] in [0, 1]}].

    With png, draws the boxes with "name score" on the original image (image_path, else the image the
    cache was extracted from, when readable; resized to the recorded size if it differs) or on a grey
    canvas of the recorded size, enlarged `scale` times (tweet thumbnails are small), and saves it there.
    """
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    with CacheReader(cache_dir) as reader:
        record = reader.get(key)
        regions = record_regions(record, reader.models)
        if image_path is None:
            image_path = source_image(reader.config, key)
    info = {
        "key": record.key,
        "status": record.status,
        "error": record.error,
        "size": [record.width, record.height],
        "num_regions": record.num_regions,
        "regions": regions,
        "patch_tokens": list(record.patch_tokens.shape),
        "global_embed": list(record.global_embed.shape),
        "region_feats": list(record.region_feats.shape),
    }
    if png is not None:
        # The image drawn on and the cache's own files are inputs: never drawn over.
        from mner.cache.datasets import recorded_data

        source = recorded_data(reader.config)
        refuse_inputs_as_output(
            png,
            "--png",
            files=[("the image drawn on", image_path)] if image_path is not None else [],
            folders=[
                ("the cache", cache_dir),
                *(
                    [("the image folder", source.image_dir), ("the data folder", source.data_dir)]
                    if source
                    else []
                ),
            ],
        )
        if record.status != "ok":
            raise ValueError(
                f"image {key!r} has status {record.status} ({record.error}); there is nothing to draw"
            )
        size = (round(record.width * scale), round(record.height * scale))
        canvas, info["background"] = draw_regions(*size, regions, image_path)
        save_png(canvas, Path(png))
        info["png"] = str(png)
    return info


def source_image(config: dict, key: str) -> Path | None:
    """The image file `key` was extracted from, found through the data folder in the extraction
    config; None when that folder is gone or the key is refused (the drawing falls back to grey)."""
    from mner.cache.datasets import recorded_data

    source = recorded_data(config)
    try:
        return None if source is None else source.image_path(key)
    except ValueError:
        return None


def record_regions(record, models: dict) -> list[dict]:
    """A record's detected regions, [{label, name, score, box [x1, y1, x2, y2] in [0, 1]}], named
    through the manifest's `models` (its detector's categories)."""
    names = _category_names(models)
    return [
        {
            "label": int(record.region_labels[i]),
            "name": _label_name(names, int(record.region_labels[i])),
            "score": float(record.region_scores[i]),
            "box": [float(v) for v in record.region_boxes[i]],
        }
        for i in range(record.num_regions)
    ]


def draw_regions(width: int, height: int, regions: list[dict], image_path) -> tuple[Image.Image, str]:
    """The boxes with "name score" drawn over the image (or a grey canvas) at width x height, and what
    was drawn on. The one drawing of regions: `cache show --png` and `mner cases` both use it."""
    canvas, background = None, "grey canvas"
    if image_path is not None:
        try:
            with Image.open(image_path) as opened:
                canvas = ImageOps.exif_transpose(opened).convert("RGB")
            background = str(image_path)
            if canvas.size != (width, height):
                background += f" (resized from {canvas.size[0]}x{canvas.size[1]})"
                canvas = canvas.resize((width, height))
        except (OSError, ValueError, Image.DecompressionBombError):
            canvas = None
            background = f"grey canvas ({image_path} is not readable)"
    if canvas is None:
        canvas = Image.new("RGB", (width, height), (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(min(width, height) / 200))
    for region in regions:
        x1, y1, x2, y2 = region["box"]
        box = (x1 * width, y1 * height, x2 * width, y2 * height)
        colour = _PALETTE[region["label"] % len(_PALETTE)]
        draw.rectangle(box, outline=colour, width=line)
        text = f"{region['name']} {region['score']:.2f}"
        left, top, right, bottom = draw.textbbox((box[0], box[1]), text)
        shift = min(bottom - top + 2, box[1])  # above the box, unless it touches the top edge
        draw.rectangle((left, top - shift, right, bottom - shift), fill=colour)
        draw.text((box[0], box[1] - shift), text, fill="black")
    return canvas, background


def save_png(canvas: Image.Image, png: Path) -> Path:
    png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(png, format="PNG")
    return png
