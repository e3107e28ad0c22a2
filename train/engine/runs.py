"""Rebuilding a run's model, and the checks of a training run's inputs (data tags, cache keys,
images): the part of a run folder that needs torch. The folder's files, record and claims are
train/engine/run_files.py's (torch-free).

`train.loop` and `train.classify` write a run through these functions and run_files; `evaluate` and
`predict` read it through them.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch

from mner.cache.conll import Split
from mner.cache.manifest import extract_command
from mner.cache.reader import CacheReader
from mner.cache.spec import TokenSpec
from mner.runtime import FolderClaim, Runtime
from mner.train.engine.checkpoint import find_checkpoint, load_weights
from mner.train.engine.config import RUNTIME_SETTINGS, ModelConfig
from mner.train.engine.config_files import model_setting
from mner.train.engine.run_files import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    RESUME_KEYS,
    WEIGHTS_FILE,
    read_metrics,
    read_record,
    resume_differences,
    task_of,
)
from mner.train.zoo.model import MNERModel
from mner.train.zoo.registry import TASKS
from mner.train.zoo.text import load_tokenizer, resolve_text_encoder, text_layer_count
from mner.train.zoo.visual import check_regions

log = logging.getLogger(__name__)

# COCO categories of torchvision detectors (with the background and the 11 unused ids); used only when a
# cache manifest does not list its detector's categories.
DEFAULT_DETECTOR_CLASSES = 91


def encoder_dir_of(record: dict) -> Path:
    """The text encoder folder the run used; the name is resolved again when that folder is gone
    (a preset materialised on another machine)."""
    recorded = Path(record["encoder_dir"])
    return recorded if recorded.is_dir() else resolve_text_encoder(record["model"]["text_encoder"])


# ------------------------------------------------------------------------------------------- model


def rebuild_tagger(record: dict) -> tuple[MNERModel, object]:
    """(a fresh tagging model from its run record, its tokenizer): the tagging task's `rebuild`."""
    encoder_dir = encoder_dir_of(record)
    return build_model(record, encoder_dir), load_tokenizer(encoder_dir)


def build_model(record: dict, encoder_dir: Path, vision_weights: dict | None = None) -> MNERModel:
    """A fresh MNERModel from a run record (config.json): labels, token widths and detector classes
    as recorded from the train split and the cache manifest; with model.vision_trainable_blocks > 0
    the blocks' structure from the recorded cache's "vision_blocks", their weights `vision_weights`
    (the cache's, to start training) or freshly initialised (for a run's model.safetensors)."""
    model_cfg = ModelConfig.from_dict(record["model"], CONFIG_FILE)
    cache = record["cache"]
    if cache is None:
        return MNERModel(model_cfg, record["label_names"], None, encoder_dir)
    categories = cache["models"].get("detector", {}).get("categories")
    num_classes = len(categories) if categories else DEFAULT_DETECTOR_CLASSES
    spec = TokenSpec.from_dict(cache["spec"])
    check_regions(model_cfg, spec, cache["dir"])  # before the text encoder loads; names the cache
    return MNERModel(
        model_cfg,
        record["label_names"],
        spec,
        encoder_dir,
        num_detector_classes=num_classes,
        vision_blocks=cache.get("vision_blocks"),
        vision_weights=vision_weights,
    )


def vision_blocks_of(
    model_cfg: ModelConfig, reader: CacheReader | None, data_dir, load: bool = True
) -> tuple[dict, dict] | None:
    """`trainable_vision_blocks` of the tagging model's model.vision_trainable_blocks (`load` False:
    the checks alone, None)."""
    k = model_cfg.vision_trainable_blocks
    if reader is not None and model_cfg.reads_vision_state and model_cfg.fusion == "two_tower":
        _check_tower_state(reader, data_dir, model_cfg.text_encoder)
        return reader.vision_blocks() if load else None
    # A model file's default is named as such: the user may never have typed the setting.
    name = model_cfg.name
    said = bool(k) and model_setting(name, "model", "vision_trainable_blocks") == k
    origin = f" (model {name}'s default, configs/models/{name}.toml)" if said else ""
    return trainable_vision_blocks(k, reader, data_dir, "model.vision_trainable_blocks", origin, load)


def trainable_vision_blocks(
    k: int, reader: CacheReader | None, data_dir, setting: str, origin: str = "", load: bool = True
) -> tuple[dict, dict] | None:
    """(config, weights) of the last k vision blocks a model trains, from the cache (None for k = 0 or
    no cache; k = -1: all it stores). The one rule of both tasks: a cache that stores the state before
    fewer than k blocks, or a ResNet's asked for more than its layer4, is refused naming `setting` (the
    config key that asked for k) and the `mner extract-features` command that makes one for `data_dir`:
    the blocks never silently stay frozen. `load` False: the checks alone (an ablation's, before its
    first arm), None."""
    if not k or reader is None:
        return None
    stored = reader.trainable_blocks
    asked = f"{k}"
    if k == -1:
        asked = "-1 (all the cache stores)"
        k = max(stored, 1)  # all the cache stores; a cache that stores none is refused below
    if k > stored:
        if reader.config.get("vision", "clip") != "clip" and k > 1:
            raise ValueError(
                f"{setting} = {k}{origin}, but the cache {reader.cache_dir} is a ResNet's, whose "
                f"stage two trains layer4 alone (its stages differ in width and stride); set {setting} = 1"
                + ("" if stored else f" on a cache made by `{_extract_blocks(reader, 1, data_dir)}`")
            )
        held = (
            f"stores the state before the last {stored} only (--vision-trainable-blocks {stored})"
            if stored
            else "stores no vision state (extracted without --vision-trainable-blocks)"
        )
        # The way out is a value the cache takes: "<= 0" would include -1, refused here again.
        raise ValueError(
            f"{setting} = {asked}{origin} trains the last {k} vision blocks on the state the cache "
            f"stores before them, but the cache {reader.cache_dir} {held}; extract one with "
            f"`{_extract_blocks(reader, k, data_dir)}` and train on it, or set {setting} "
            + (f"<= {stored}" if stored else "= 0")
        )
    return reader.vision_blocks() if load else None


def _check_tower_state(reader: CacheReader, data_dir, text_encoder: str) -> None:
    """Refuse, with the command that makes one, a cache that does not store a CLIP's embedding output,
    which IFAformer's vision tower (model.fusion "two_tower") runs from."""
    if reader.config.get("vision", "clip") != "clip":
        raise ValueError(
            f"model.fusion = 'two_tower' (IFAformer) runs a CLIP vision tower, but the cache {reader.cache_dir} "
            "holds a ResNet's features; extract the data with --vision clip"
        )
    stored = reader.trainable_blocks
    layers = reader.vision_blocks_config()["layers"] if stored else None  # the CLIP's depth
    if stored and stored == layers:
        return
    # The tower pairs with the text encoder layer for layer, so a CLIP for it has the encoder's depth.
    depth = layers or text_layer_count(text_encoder)
    held = (
        f"stores the input of its last {stored} of {layers} layers only"
        if stored
        else "stores no vision state (extracted without --vision-trainable-blocks)"
    )
    raise ValueError(
        f"model.fusion = 'two_tower' (IFAformer) runs the whole vision tower beside the text encoder's layers, "
        f"from the embedding output the cache stores, but the cache {reader.cache_dir} {held}; extract one "
        f"with `{_extract_blocks(reader, depth, data_dir)}` and train on it, or use the single stream "
        "(--model ifaformer-single)"
    )


def record_vision_blocks(record: dict, vision: tuple[dict, dict] | None) -> None:
    """Add the blocks' config (`trainable_vision_blocks`' first item) to the record's "cache": what
    rebuilds them for evaluate and predict; their trained weights are the run's."""
    if vision is not None:
        record["cache"]["vision_blocks"] = vision[0]


def _extract_blocks(reader: CacheReader, k: int, data_dir) -> str:
    """The extract-features command of the reader's cache, storing the state before the last k blocks."""
    return extract_command({**reader.config, "vision_trainable_blocks": k}, data_dir)


def load_run_model(run_dir, record: dict, runtime: Runtime) -> tuple[torch.nn.Module, object]:
    """The best model of a run of either task on `runtime.device` in eval mode, and its tokenizer
    (None for a classifier of the image alone); the record's task rebuilds the model."""
    weights = Path(run_dir) / WEIGHTS_FILE
    check_weights_file(run_dir, weights)
    model, tokenizer = TASKS.get(task_of(record)).rebuild(record)
    load_weights(model, weights, runtime.device, best_weights_fix(run_dir))
    return model.to(runtime.device).eval(), tokenizer


def check_weights_file(run_dir, weights: Path) -> None:
    """Refuse a run without its best weights, saying whether they were deleted or never written."""
    if weights.is_file():
        return
    run_dir = Path(run_dir)
    finished = len(read_metrics(run_dir))
    if finished or find_checkpoint(run_dir / CHECKPOINT_DIR) is not None:
        raise ValueError(
            f"the weights file {weights} is missing, though the run has finished {finished} epoch(s); "
            f"restore it, or copy {run_dir / CHECKPOINT_DIR / WEIGHTS_FILE} (the last epoch's weights, "
            "not the best) in its place"
        )
    raise ValueError(
        f"{run_dir}: no {WEIGHTS_FILE}; the run has not finished an epoch (continue it with --resume)"
    )


def best_weights_fix(run_dir) -> str:
    """What to do about damaged best weights (for `load_weights`' message)."""
    last = Path(run_dir) / CHECKPOINT_DIR / WEIGHTS_FILE
    return (
        f"restore it, copy {last} (the last epoch's weights, not the best) in its place, "
        "or train the run again into a new --out"
    )


def prepare_folder(
    claim: FolderClaim,
    resume: bool,
    record: dict,
    runtime: Runtime,
    keys: tuple[str, ...] = RESUME_KEYS,
    runtime_settings: frozenset = RUNTIME_SETTINGS,
) -> Path | None:
    """Create the run folder; returns the checkpoint training continues from, or None for a fresh start.

    A resume must find the record's `keys` (the task's: tagging's RESUME_KEYS) and cache fingerprint
    unchanged, but for the dotted `runtime_settings` (how a run is carried out, not what it trains)."""
    run_dir = claim.path
    if runtime.is_main:
        claim.create()  # locked before anything in it is read: one writer per run folder
    checkpoint = find_checkpoint(run_dir / CHECKPOINT_DIR) if resume and claim.state == "ours" else None
    if checkpoint is not None:
        old = read_record(run_dir)
        differs = resume_differences(old, record, keys, runtime_settings)
        if differs:
            raise ValueError(
                f"cannot resume {run_dir}: settings differ from the run's: {'; '.join(differs)}; use another "
                f"--out, or change only {', '.join(sorted(runtime_settings))}, which a resume may change"
            )
    elif runtime.is_main:
        # A fresh start (or a resume that never finished an epoch) must not append to stale epochs.
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    runtime.barrier()
    return checkpoint


# ------------------------------------------------------------------------------------------ inputs


def open_cache(cache_dir, text_only: bool, in_memory: bool = False) -> CacheReader | None:
    """The run's cache reader; None (and nothing opened) for a text-only model."""
    if text_only:
        return None
    if cache_dir is None:
        raise ValueError("a multimodal run needs a feature cache (cache_dir); pass --cache, or --text-only")
    return CacheReader(cache_dir, in_memory=in_memory)


def check_tags(splits: dict[str, Split], labels: list[str]) -> None:
    """Refuse a valid/test tag the model cannot predict: the label set is read from train alone.

    Args:
        splits: split name -> Split; "train" (where `labels` came from) is not checked.
        labels: the run's label names (`label_names` of train).
    """
    known, train_file = set(labels), splits["train"].path.name
    for name, split in splits.items():
        if name == "train":
            continue
        for post in split.posts:
            for index, tag in enumerate(post.tags):
                if tag not in known:
                    raise ValueError(
                        f"{split.path}:{post.tag_line(index)}: tag {tag!r} does not occur in {train_file}; "
                        "the label set comes from the training file"
                    )


def check_cache_keys(splits: list[Split], reader: CacheReader) -> None:
    """Refuse a cache extracted from other data.

    Extraction writes a record for every key of its data, missing and unreadable images included,
    so a key absent from the cache means the wrong cache, whose posts would all train image-masked.
    """
    absent = [(split, post) for split in splits for post in split.posts if post.key not in reader]
    if absent:
        split, post = absent[0]
        total = sum(len(split.posts) for split in splits)
        raise ValueError(
            f"{split.path}:{post.line}: image key {post.key!r} is not in the cache at {reader.cache_dir} "
            f"({len(absent)} of {total} posts' keys are absent); the cache was extracted from other data "
            "— re-run `mner extract-features` on this data folder"
        )


def report_images(keys: dict[str, list[str]], reader: CacheReader, fallback: str, image_only: bool = False):
    """Posts per split without a usable image in the cache (what config.json records as "no_image").

    A post without one is trained and scored with no visual tokens (`fallback` says what that means for
    the model, for the log). When no train post has a usable image, the image side learns nothing: a
    model that also reads text is in effect text-only, which is said loudly; one that reads only the
    image (`image_only`) would learn a constant, so it is refused.
    Args:
        keys: each split's cache keys, in order. reader: the run's cache.
    Returns:
        {split: posts without a usable image}.
    Raises:
        ValueError (image_only) naming the cache and the statuses of its train images.
    """
    report = {name: sum(reader.status(key) != "ok" for key in split) for name, split in keys.items()}
    train = keys.get("train", [])
    if not train or report["train"] < len(train):
        log.info("posts without a usable image (%s): %s", fallback, report)
        return report
    statuses = ", ".join(f"{status} {n}" for status, n in sorted(Counter(map(reader.status, train)).items()))
    where = f"none of the {len(train)} train posts has a usable image in the cache {reader.cache_dir} ({statuses})"
    fix = f"check the images (`mner cache verify {reader.cache_dir} --images`) and extract them again"
    if image_only:
        raise ValueError(
            f"{where}: a model of the image alone would learn a constant; {fix}, or train on the text"
        )
    log.warning("%s: the image side learns nothing and this run is text-only in effect; %s", where, fix)
    return report
