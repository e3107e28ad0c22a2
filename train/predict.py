"""Tag new posts with a trained run: `predict(run_dir, input_file, image_dir, out_file)`.

A multimodal run needs the posts' images as tokens from the very extractor it was trained on: the
images are extracted into a temporary cache with the CLIP model, detector, checkpoint and thresholds
recorded in the run, and every part of that cache's fingerprint but the image list must equal the
run's (same settings, same weight files, same library versions). A text-only run never touches images.

Outputs:
    out_file             the input format with the predicted tag as the last column: the post's
                         IMGID:/IMAGE: line, then `token<TAB>pred` lines, a blank line after each post
                         (readable again with cache.datasets.read_split)
    out_file + ".json"   JSON lines, one per post: {"key", "words", "spans": [{"text", "type", "start",
                         "end"}]}, word offsets with `end` exclusive
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path

from mner.cache.datasets import DataConfig, Split, read_split, write_split
from mner.cache.reader import CacheReader
from mner.runtime import resolve_runtime
from mner.train.decode import decode_split
from mner.train.metrics import entities
from mner.train.runs import cache_differences, inference_amp, load_run_model, read_record, run_config

log = logging.getLogger(__name__)

# Name of the split the posts are extracted as, inside the temporary data folder.
_PREDICT_SPLIT = "predict"
# Fingerprint parts that describe which images a cache holds, not how their tokens were made.
_DATA_PARTS = ("keys_sha256", "num_images")


def predict(run_dir, input_file, image_dir, out_file, amp: str | None = None) -> Path:
    """Tag the posts of `input_file` and write CoNLL + JSON-lines spans.

    Args:
        run_dir: a finished run folder (config.json + model.safetensors).
        input_file: posts in the run's dataset format (IMGID-CoNLL or IMAGE-path CoNLL); tags optional.
        image_dir: the posts' images (`<image_dir>/<IMGID>.jpg`, or the IMAGE: paths relative to it);
            needed by multimodal runs only. For the image-path format it defaults to the input's folder.
        out_file: CoNLL output; the JSON lines go to `out_file + ".json"`.
        amp: autocast mode on a GPU; None: the precision the run trained in (runs.inference_amp).
    Returns:
        out_file as a Path.
    Raises:
        ValueError when a multimodal run gets no image_dir or one that does not exist, a weight file
        recorded in the run is missing here, or the extractor here differs from the run's (weights,
        settings, versions).
    Runs on a GPU when there is one, else on the CPU, whatever the run was trained on.
    """
    run_dir, out_file = Path(run_dir), Path(out_file)
    record = read_record(run_dir)
    cfg = run_config(record)
    fmt = record["data_source"]["fmt"]
    split = read_split(input_file, fmt=fmt, require_tags=False)
    if not cfg.model.text_only:
        # Checked before the model loads: without the images every post would be tagged image-masked.
        image_dir = _image_dir(run_dir, split, image_dir)
    runtime = resolve_runtime("auto", inference_amp(record, amp))
    model, tokenizer = load_run_model(run_dir, record, runtime)
    with tempfile.TemporaryDirectory(prefix="mner-predict-") as tmp:
        reader = None
        if not cfg.model.text_only:
            reader = _extract(record, run_dir, split, image_dir, Path(tmp))
        predictions = decode_split(model, split, reader, tokenizer, record["label_names"], cfg, runtime)
        if reader is not None:
            reader.close()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    _write_tagged(out_file, split, predictions)
    with open(Path(f"{out_file}.json"), "w", encoding="utf-8") as f:
        for post, tags in zip(split.posts, predictions):
            spans = [
                {"text": " ".join(post.words[start:end]), "type": kind, "start": start, "end": end}
                for kind, start, end in sorted(entities(tags), key=lambda span: span[1])
            ]
            f.write(
                json.dumps({"key": post.key, "words": list(post.words), "spans": spans}, ensure_ascii=False)
                + "\n"
            )
    return out_file


def _write_tagged(path: Path, split: Split, predictions: list[list[str]]) -> None:
    """The split's posts in its own format, each with its predicted tags."""
    tagged = [dataclasses.replace(post, tags=tuple(tags)) for post, tags in zip(split.posts, predictions)]
    write_split(path, tagged, split.fmt)


def _image_dir(run_dir: Path, split: Split, image_dir) -> Path:
    """The folder of the posts' images: as given, or the input's folder for the image-path format."""
    if image_dir is None:
        if split.fmt != "image-path":
            raise ValueError(
                f"run {run_dir} uses images: pass --image-dir, the folder with the posts' <IMGID>.jpg files"
            )
        image_dir = split.path.parent
    if not Path(image_dir).is_dir():
        raise ValueError(f"--image-dir {image_dir} does not exist")
    return Path(image_dir)


def _extract(record: dict, run_dir: Path, split: Split, image_dir: Path, tmp: Path) -> CacheReader:
    """Extract the posts' images with the run's recorded extractor into tmp/cache.

    The new cache's fingerprint cannot equal the run's, because the fingerprint also covers which
    images a cache holds; what must be equal is every other fingerprinted part (models and their
    weight hashes, token spec, thresholds, batch size, library versions).
    """
    # Imported here: a text-only prediction never loads the vision stack.
    from mner.extract.config import TINY_CLIP, ExtractConfig
    from mner.extract.run import extract_features

    recorded = record["cache"]["config"]
    if "fingerprint_parts" not in recorded:
        raise ValueError(
            f"run {run_dir} was trained on a cache that records no extraction settings "
            f"({record['cache']['dir']}); predict can only re-extract images for runs on `mner extract-features` caches"
        )
    for name in ("clip", "detector_ckpt"):
        value = recorded.get(name)
        if value and value != TINY_CLIP and not Path(value).expanduser().exists():
            raise ValueError(
                f"run {run_dir} was trained on tokens from {name} {value}, which does not exist here; "
                "predict re-extracts the images and needs the same local weights"
            )
    # The extractor reads a data folder: the posts (tags as O) become its one split.
    data_dir = tmp / "data"
    data_dir.mkdir()
    _write_tagged(
        data_dir / f"{_PREDICT_SPLIT}.txt", split, [["O"] * len(post.words) for post in split.posts]
    )
    fields = {f.name for f in dataclasses.fields(ExtractConfig)}
    settings = {name: value for name, value in recorded.items() if name in fields}
    settings.update(
        data=DataConfig(data_dir=str(data_dir), image_dir=str(image_dir)),
        out=str(tmp / "cache"),
        splits=(_PREDICT_SPLIT,),
        overwrite=False,
        device="auto",  # not fingerprinted: the training machine's device need not exist here
    )
    reader = CacheReader(extract_features(ExtractConfig(**settings)))
    counts = Counter(reader.status(key) for key in reader.keys)
    log.info(
        "images of the %d posts: %d ok, %d missing, %d corrupt (missing and corrupt ones are masked)",
        len(reader),
        counts["ok"],
        counts["missing"],
        counts["corrupt"],
    )
    found = {"config": reader.config, "models": reader.models, "spec": reader.spec.to_dict()}
    differences = cache_differences(found, record["cache"], ignore=_DATA_PARTS)
    if differences:
        raise ValueError(
            f"the images re-extracted for run {run_dir} do not match the extractor it was trained with; "
            f"differs: {'; '.join(differences)}"
        )
    return reader
