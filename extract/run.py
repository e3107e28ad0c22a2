"""Stage one: every image of a dataset -> patch tokens and a global embedding (CLIP, or a ResNet's layer4
grid and avgpool) and detector region tokens (none with --detector none), written as HDF5 shards
through `cache/`.

Shard i always holds keys[i * shard_size : (i + 1) * shard_size] (keys sorted and deduplicated across
splits) cut into the same fixed batches, so its values depend neither on the world size nor on which run
was interrupted: rank r of W extracts shards r, r + W, ..., a re-run skips completed shards, and a shard
that was being written when the process died is simply done again. A DataLoader decodes and preprocesses
images in worker processes, the main process runs the models, and a writer thread writes HDF5, so
decoding, compute and IO overlap.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import PIL
import torch
import torch.distributed as dist
import torchvision
import transformers
from torch.utils.data import DataLoader

from mner.cache.classification import ClassDataConfig, classification_images, is_classification_folder
from mner.cache.datasets import DataSource
from mner.cache.fingerprint import compute_fingerprint, h5py_version
from mner.cache.lifecycle import (
    ShardSink,
    check_existing,
    check_folder,
    clear_cache,
    lock_folder,
    manifest_problem,
    plan_shards,
)
from mner.cache.manifest import read_manifest, write_manifest
from mner.cache.shards import image_stat, shard_path
from mner.cache.spec import NO_REGIONS, SCHEMA_VERSION, TokenSpec
from mner.extract import images
from mner.extract.batches import Images, collate, encode_batch
from mner.extract.clip import ClipEncoder
from mner.extract.config import NO_DETECTOR, ExtractConfig
from mner.extract.detector import RegionDetector, build_detector
from mner.extract.images import load_image
from mner.extract.models import load_vision, model_info
from mner.extract.resnet import ResNetEncoder
from mner.runtime import ProgressLog, Runtime, start_runtime

log = logging.getLogger(__name__)

# Model-info fields that say where a file lies rather than what it holds; the sha256s identify the
# weights, so moving a model folder or checkpoint does not invalidate a cache.
_LOCATION_FIELDS = ("path", "ckpt")


def extract_features(cfg: ExtractConfig) -> Path:
    """Extract every image of the configured splits into the cache folder `cfg.out`; returns it.

    Under torchrun (WORLD_SIZE > 1) each rank extracts its share of the shards and rank 0 writes the
    manifest once all are done. Raises ValueError when `cfg.out` is a folder that is not empty and not
    a cache, is locked by another extraction, holds a cache made with another configuration (unless
    cfg.overwrite), or when the data or the models cannot be found. Rank 0 holds the folder's lock
    (cache.lifecycle.FolderLock) until the manifest is written.
    """
    start = time.perf_counter()
    cfg.check_inputs()
    out = Path(cfg.out).expanduser()
    check_folder(out)  # before anything is read, loaded or written: never a folder that is not ours
    keys, paths = collect_images(cfg)
    # Ranks wait at the final barrier for the slowest one; an hour-long extraction must not time out.
    runtime = start_runtime(cfg.device, cfg.amp, hint="--device cpu", timeout=timedelta(hours=24))
    rank, device = runtime.rank, runtime.device
    lock = None
    try:
        # An existing folder is locked at once, so a second run refuses before loading any model; a
        # new one once it is made, below.
        lock = _on_rank0(runtime, lambda: lock_folder(out) if out.is_dir() else None)
        # The fingerprint records the compute dtype, so an amp that would not autocast is refused.
        if cfg.amp != "off" and runtime.amp_dtype is None:
            raise ValueError(
                f"amp={cfg.amp} needs a CUDA device, but extraction runs on {device}; use amp='off'"
            )
        # The detector first: a bad checkpoint is reported without waiting for CLIP to load.
        detector = None
        if cfg.detector != NO_DETECTOR:
            detector = build_detector(cfg.detector, cfg.detector_ckpt, cfg).to(device)
        clip = load_vision(cfg, device)  # CLIP or a ResNet: both give patch tokens and a global embedding
        models = model_info(clip, detector)
        for role, info in models.items():
            if info["untrained"]:
                log.warning(
                    "%s %s has untrained random weights: its tokens are for tests and demos only",
                    role,
                    info["name"] if role == "vision" else getattr(cfg, role),
                )
        spec = token_spec(clip, detector, cfg)
        parts = fingerprint_parts(cfg, models, spec, keys)
        fingerprint = compute_fingerprint(parts)
        # Every rank takes part (a collective); rank 0 keeps the lock it may already hold.
        lock = _on_rank0(runtime, lambda: lock or _make_and_lock(out))
        runtime.barrier()
        damaged = manifest_problem(out) if not cfg.overwrite else ""
        known_errors = check_existing(out, fingerprint, parts, cfg.overwrite)
        if rank == 0 and cfg.overwrite:
            clear_cache(out)
        runtime.barrier()

        config = {**cfg.to_dict(), "fingerprint_parts": parts}
        shard_keys = [keys[i : i + cfg.shard_size] for i in range(0, len(keys), cfg.shard_size)]
        mine = {index: shard_keys[index] for index in range(rank, len(shard_keys), runtime.world_size)}
        # Taken before any image is read: a file that changes later differs from its record next time.
        stats = {key: image_stat(paths[key]) for shard in mine.values() for key in shard}
        plan = plan_shards(out, mine, fingerprint, spec, stats)
        _log_plan(plan, len(mine))
        errors = _extract_shards(
            cfg, clip, detector, spec, out, plan.todo, shard_keys, paths, fingerprint, config, runtime, stats
        )
        errors = {**known_errors, **_gather_errors(errors, runtime.world_size)}
        if rank == 0:
            files = [shard_path(out, index) for index in range(len(shard_keys))]
            _write_manifest(out, fingerprint, config, models, spec, files, errors, paths)
            if damaged:
                log.warning(
                    "manifest.json in %s was %s: rebuilt it from the shards (%d reused, %d extracted)",
                    out,
                    damaged,
                    len(mine) - len(plan.todo),
                    len(plan.todo),
                )
            log.debug(summarize(out, time.perf_counter() - start))  # the CLI prints it on stdout
        runtime.barrier()
    finally:
        if lock is not None:
            lock.release()
        runtime.close()
    return out


def _make_and_lock(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    return lock_folder(out)


def _on_rank0(runtime: Runtime, action):
    """Run `action` on rank 0 only; a ValueError it raises is raised on every rank (the others would
    otherwise wait at the next barrier). Returns its result on rank 0, None elsewhere."""
    result, error = None, None
    if runtime.rank == 0:
        try:
            result = action()
        except ValueError as err:
            error = str(err)
    if runtime.world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ValueError(error)
    return result


def _log_plan(plan, mine: int) -> None:
    """Say which shards are reused, which are extracted again and why, and what was not retried."""
    for reason in plan.redo.values():
        log.warning("%s; extracting it again", reason)
    if len(plan.todo) < mine:
        log.info(
            "re-running the same command skips completed shards: %d of %d done", mine - len(plan.todo), mine
        )
    if plan.not_retried:
        log.info(
            "%d image(s) recorded missing or corrupt in the reused shards are unchanged on disk and were "
            "not retried; fix or add the files and re-run to extract them",
            plan.not_retried,
        )
    if plan.unknown_stats:
        log.warning(
            "%d reused shard(s) were written before image sizes and mtimes were recorded, so changed images "
            "in them are not detected; pass --overwrite to extract them again",
            plan.unknown_stats,
        )


def collect_images(cfg: ExtractConfig) -> tuple[list[str], dict[str, Path | None]]:
    """(sorted image keys, key -> image path) of the configured data, every path resolved up front so
    that an unsafe key is an error before any model work.

    An NER folder (or named dataset) gives the keys of `cfg.splits`; a classification folder
    (cache.classification: MVSA `train.txt` with a `guid,tag` header, or `train.csv`) gives every
    guid of every split, its image `data/<guid>.jpg` or the csv's `image` cell (None: no image, which
    is recorded missing).
    """
    data = cfg.data
    if data.data_dir is not None and is_classification_folder(data.data_dir):
        if data.image_dir is not None:
            raise ValueError(
                f"{data.data_dir} is a classification folder, whose images are data/<guid>.jpg or its csv's "
                "image column; --image-dir does not apply to it"
            )
        images = classification_images(ClassDataConfig(data.data_dir))
        keys, paths = images.keys(), images.paths
        # a csv's image column may point anywhere in the folder: warn only when no image is there at all
        if not any(path is not None and path.is_file() for path in paths.values()):
            log.warning("no image of %s exists: every image will be recorded as missing", data.data_dir)
        return keys, paths
    source = data.resolve()
    keys = collect_keys(source, cfg.splits)
    if not source.image_dir.is_dir():
        log.warning("no image folder %s: every image will be recorded as missing", source.image_dir)
    return keys, {key: source.image_path(key) for key in keys}


def collect_keys(source: DataSource, splits: tuple[str, ...]) -> list[str]:
    """Sorted unique image keys of the given splits that exist in `source` (tags are not needed here)."""
    present = [name for name in splits if source.split_path(name).is_file()]
    if not present:
        wanted = ", ".join(str(source.split_path(name)) for name in splits)
        raise ValueError(f"no split file found in {source.data_dir}: looked for {wanted}")
    keys = {post.key for name in present for post in source.read(name, require_tags=False).posts}
    return sorted(keys)


def token_spec(
    clip: ClipEncoder | ResNetEncoder, detector: RegionDetector | None, cfg: ExtractConfig
) -> TokenSpec:
    """Shapes and sources of the tokens this configuration writes; K = Dr = 0 without a detector."""
    crops = cfg.region_features == "clip-crop"
    if detector is None:
        return TokenSpec(
            num_patches=clip.num_patches,
            patch_dim=clip.patch_dim,
            global_dim=clip.global_dim,
            max_regions=0,
            region_dim=0,
            patch_source=clip.patch_source,
            global_source=clip.global_source,
            region_source=NO_REGIONS,
        )
    return TokenSpec(
        num_patches=clip.num_patches,
        patch_dim=clip.patch_dim,
        global_dim=clip.global_dim,
        max_regions=cfg.topk,
        region_dim=clip.global_dim if crops else detector.region_dim,
        patch_source=clip.patch_source,
        global_source=clip.global_source,
        region_source="clip_crop" if crops else "frcnn_box_head",
    )


def fingerprint_parts(cfg: ExtractConfig, models: dict, spec: TokenSpec, keys: list[str]) -> dict:
    """Everything that decides the values in the cache; its canonical hash is the cache fingerprint."""
    return {
        "schema_version": SCHEMA_VERSION,
        "models": {
            role: {name: value for name, value in info.items() if name not in _LOCATION_FIELDS}
            for role, info in models.items()
        },
        "spec": spec.to_dict(),
        "topk": cfg.topk,
        "score_thr": cfg.score_thr,
        "nms_iou": cfg.nms_iou,
        "region_features": cfg.region_features,
        # Pictures more elongated than this are recorded corrupt instead of extracted.
        "max_aspect_ratio": images.MAX_ASPECT_RATIO,
        "dtype": {"compute": "float32" if cfg.amp == "off" else cfg.amp, "stored": "float16"},
        # Detector batches are padded to their largest image, so values depend on batch composition.
        "batch_size": cfg.batch_size,
        "shard_size": cfg.shard_size,
        "keys_sha256": hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest(),
        "num_images": len(keys),
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "transformers": transformers.__version__,
            "h5py": h5py_version(),
            "pillow": PIL.__version__,
        },
    }


def summarize(cache_dir: str | Path, seconds: float | None = None) -> str:
    """One line about a finished cache: status counts, size on disk and (optionally) the time taken."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    counts = Counter(image["status"] for image in manifest["images"])
    size = sum(path.stat().st_size for path in cache_dir.iterdir() if path.is_file())
    text = (
        f"{len(manifest['images'])} images (ok {counts['ok']}, missing {counts['missing']}, "
        f"corrupt {counts['corrupt']}) in {cache_dir}: {size / 2**20:.1f} MiB on disk"
    )
    return text if seconds is None else f"{text}, {seconds:.1f} s"


# ---------------------------------------------------------------------------------------- extraction


def _extract_shards(
    cfg: ExtractConfig,
    clip: ClipEncoder | ResNetEncoder,
    detector: RegionDetector | None,
    spec: TokenSpec,
    out: Path,
    todo: list[int],
    shard_keys: list[list[str]],
    paths: dict[str, Path],
    fingerprint: str,
    config: dict,
    runtime: Runtime,
    stats: dict[str, list | None] | None = None,
) -> dict[str, str]:
    """Extract shards `todo`; returns {key: error} for the images that were not ok. `stats` are the
    image files' [size, mtime_ns] as found before reading them, recorded in each shard."""
    device = runtime.device
    items, batches, where = [], [], []
    for index in todo:
        keys = shard_keys[index]
        for start in range(0, len(keys), cfg.batch_size):
            rows = range(start, min(start + cfg.batch_size, len(keys)))
            batches.append([len(items) + row - start for row in rows])
            where.append((index, rows))
            items.extend((keys[row], paths[keys[row]]) for row in rows)
    if not items:
        return {}
    dataset = Images(
        items,
        clip.image_preprocess,
        None if detector is None else detector.transform,
        cfg.region_features == "clip-crop",
    )
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=cfg.num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.num_workers else None,
    )
    sink = ShardSink(
        out,
        spec,
        {index: shard_keys[index] for index in todo},
        {"fingerprint": fingerprint, "config_json": config},
        stats,
    )
    errors = {}
    try:
        # A bar on a terminal; in a log file a line (done/total, images/s, ETA) every PROGRESS_INTERVAL_S.
        with (
            ProgressLog(len(items), "extract", unit="img", enabled=runtime.is_main) as progress,
            runtime.autocast(),
        ):
            for batch, (index, rows) in zip(loader, where):
                records = encode_batch(batch, clip, detector, spec, cfg, device)
                errors.update({record.key: record.error for record in records if record.status != "ok"})
                sink.put(index, list(zip(rows, records)))
                progress.update(len(records))
        sink.close()
    except BaseException:
        sink.abort()
        raise
    return errors


# --------------------------------------------------------------------------------------- distributed


def _gather_errors(errors: dict[str, str], world: int) -> dict[str, str]:
    if world <= 1:
        return errors
    gathered: list = [None] * world
    dist.all_gather_object(gathered, errors)
    return {key: message for part in gathered for key, message in part.items()}


def _write_manifest(
    out: Path,
    fingerprint: str,
    config: dict,
    models: dict,
    spec: TokenSpec,
    files: list[Path],
    errors: dict[str, str],
    paths: dict[str, Path],
) -> Path:
    """write_manifest, then recover messages for failed images of shards an earlier, killed run finished."""
    manifest = write_manifest(out, fingerprint, config, models, spec, files, errors)
    lacking = [
        image["key"]
        for image in read_manifest(out)["images"]
        if image["status"] != "ok" and not image["error"]
    ]
    if not lacking:
        return manifest
    # Failures are cheap to reproduce (missing files, or decoders that stop early), and deterministic.
    errors = {**errors, **{key: load_image(paths[key]).error for key in lacking}}
    return write_manifest(out, fingerprint, config, models, spec, files, errors)
