"""Tag new posts with a trained run: `predict(run_dir, input_file, image_dir, out_file)`; label them
with a classifier run: `predict_classifier(run_dir, input_file, out_file)` (`mner predict` picks one by
the run's recorded task).

A multimodal run needs the posts' images as tokens from the very extractor it was trained on: the
images are extracted into a temporary cache with the CLIP model, detector, checkpoint and thresholds
recorded in the run, and every part of that cache's fingerprint but the image list must equal the
run's (same settings, same weight files, same library versions). A text-only run never touches images.

Outputs:
    out_file             the input format with the predicted tag as the last column: the post's
                         IMGID:/IMAGE: line, then `token<TAB>pred` lines, a blank line after each post
                         (readable again with cache.datasets.read_split)
    out_file + ".json"   JSON lines, one per post: {"key", "words", "spans": [{"text", "type", "start",
                         "end"}], "image", "image_error", "words_past_limit", "long_posts"}, word offsets
                         with `end` exclusive; "image" is the post's image status as extracted ("ok",
                         "missing", "corrupt"; null for a text-only run, which reads no image) and
                         "image_error" why it is not ok ("" when it is); "words_past_limit" counts the
                         post's words past the encoder's max_length sub-words and "long_posts" says how
                         they were tagged ("truncate": predicted O; "window": by overlapping windows)

The log names the posts whose image is missing or corrupt (the first `NAMED_IMAGES`, then how many
more), and counts the words past the encoder's limit. Neither output may be an input of the command
(the input file, the posts' images, the run folder's files): that is refused before anything runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from mner.cache.conll import Split, read_split, write_split
from mner.cache.datasets import DataConfig, DataSource
from mner.cache.reader import CacheReader
from mner.runtime import SettingError, refuse_inputs_as_output, resolve_runtime
from mner.train.engine.decode import (
    LONG_POSTS,
    decode_split,
    log_long_posts,
    long_post_summary,
    truncated_per_post,
)
from mner.train.engine.metrics import entities
from mner.train.engine.run_files import (
    extractor_differences,
    inference_amp,
    load_run,
    load_run_of,
    run_config,
)
from mner.train.engine.runs import load_run_model
from mner.train.engine.tasks import SENTENCE_CLASSIFICATION, TOKEN_TAGGING

log = logging.getLogger(__name__)

# Name of the split the posts are extracted as, inside the temporary data folder.
_PREDICT_SPLIT = "predict"
# Posts with a missing or corrupt image named in the log; the rest are counted.
NAMED_IMAGES = 10


def predict_posts(*, run_dir, input_file, out_file, image_dir, cache_dir, amp, long_posts, extract) -> Path:
    """`mner predict`: label new posts with a run of either task (`predict` or `predict_classifier`, by
    the run's recorded task); returns the file written.

    A tagging run takes its images from `image_dir` (re-extracted by `extract`), a classifier run from
    `cache_dir`; each refuses the other's options.
    """
    if load_run(run_dir).task is SENTENCE_CLASSIFICATION:
        if image_dir is not None or amp is not None or long_posts != "truncate":
            raise SettingError(
                "{image_dir}, {amp} and {long_posts} apply to tagging runs; a classifier run reads images "
                "from {cache_dir}"
            )
        return predict_classifier(run_dir, input_file, out_file, cache_dir=cache_dir)
    if cache_dir is not None:
        raise SettingError(
            "{cache_dir} applies to classifier runs; a tagging run re-extracts with {image_dir}"
        )
    return predict(run_dir, input_file, image_dir, out_file, amp=amp, long_posts=long_posts, extract=extract)


def predict(
    run_dir,
    input_file,
    image_dir,
    out_file,
    amp: str | None = None,
    long_posts: str = "truncate",
    extract: Callable[..., Path] | None = None,
) -> Path:
    """Tag the posts of `input_file` and write CoNLL + JSON-lines spans.

    Args:
        run_dir: a finished run folder (config.json + model.safetensors).
        input_file: posts in the run's dataset format (IMGID-CoNLL or IMAGE-path CoNLL); tags optional.
        image_dir: the posts' images (`<image_dir>/<IMGID>.jpg`, or the IMAGE: paths relative to it);
            needed by multimodal runs only. For the image-path format it defaults to the input's folder.
        out_file: CoNLL output; the JSON lines go to `out_file + ".json"`.
        amp: autocast mode on a GPU; None: the precision the run trained in (runs.inference_amp).
        long_posts: "truncate" or "window": how words past the encoder's limit are tagged
            (train/engine/decode.py).
        extract: stage one, for a multimodal run: `mner.extract.reextract.extract_from_record` (the
            CLI passes it; stage two never imports stage one). Not needed by a text-only run.
    Returns:
        out_file as a Path.
    Raises:
        ValueError when out_file or its .json is an input (the input file, a post's image, a file of
        the run folder), a multimodal run gets no image_dir or one that does not exist, a weight file
        recorded in the run is missing here, or the extractor here differs from the run's (weights,
        settings, versions).
    Runs on a GPU when there is one, else on the CPU, whatever the run was trained on.
    """
    if long_posts not in LONG_POSTS:
        raise ValueError(f"long_posts {long_posts!r}: expected one of {', '.join(LONG_POSTS)}")
    run_dir, out_file = Path(run_dir), Path(out_file)
    record = _tagging_record(run_dir)
    cfg = run_config(record)
    fmt = record["data_source"]["fmt"]
    split = read_split(input_file, fmt=fmt, require_tags=False, columns=cfg.data.columns)
    # Gold tags, if the input has any, are not predict's business: a type the run never saw is no error.
    split = dataclasses.replace(
        split, posts=[dataclasses.replace(p, tags=("O",) * len(p.words)) for p in split.posts]
    )
    if not cfg.model.text_only:
        if extract is None:
            raise ValueError(
                f"run {run_dir} uses images: predict needs stage one to extract them "
                "(pass extract=mner.extract.reextract.extract_from_record)"
            )
        # Checked before the model loads: without the images every post would be tagged image-masked.
        image_dir = _image_dir(run_dir, split, image_dir)
    _refuse_inputs_as_output(out_file, split, None if cfg.model.text_only else image_dir, run_dir)
    runtime = resolve_runtime("auto", inference_amp(record, amp))
    model, tokenizer = load_run_model(run_dir, record, runtime)
    labels = record["label_names"]
    cut = truncated_per_post(split, tokenizer, labels, cfg.model.max_length)
    log_long_posts(str(split.path), long_post_summary(cut, cfg.model.max_length, long_posts))
    statuses = {post.key: (None, "") for post in split.posts}
    with tempfile.TemporaryDirectory(prefix="mner-predict-") as tmp:
        reader = None
        if not cfg.model.text_only:
            reader = _extract(record, run_dir, split, image_dir, Path(tmp), extract)
            statuses = _image_statuses(reader, split)
        predictions = decode_split(model, split, reader, tokenizer, labels, cfg, runtime, long_posts)
        if reader is not None:
            reader.close()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    _write_tagged(out_file, split, predictions)
    with open(Path(f"{out_file}.json"), "w", encoding="utf-8") as f:
        for post, tags, past_limit in zip(split.posts, predictions, cut):
            spans = [
                {"text": " ".join(post.words[start:end]), "type": kind, "start": start, "end": end}
                for kind, start, end in sorted(entities(tags), key=lambda span: span[1])
            ]
            status, error = statuses[post.key]
            line = {
                "key": post.key,
                "words": list(post.words),
                "spans": spans,
                "image": status,
                "image_error": error,
                "words_past_limit": past_limit,
                "long_posts": long_posts,
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return out_file


def _tagging_record(run_dir: Path) -> dict:
    """The record of the tagging run in `run_dir` (a classifier run is predicted by train.classify)."""
    why = "it labels posts with predict_classifier (`mner predict` picks it by the run's task)"
    return load_run_of(run_dir, TOKEN_TAGGING, why).record


def _refuse_inputs_as_output(out_file: Path, split: Split, image_dir: Path | None, run_dir: Path) -> None:
    """Neither output (the CoNLL file, its .json) may overwrite the input file, an image of a post or
    a file of the run folder."""
    files = [("the --input file", split.path)]
    folders = [("the run folder", run_dir)]
    if image_dir is not None:
        files.append(("--image-dir", image_dir))
        folders.append(("--image-dir", image_dir))
        source = DataSource(name="predict", data_dir=split.path.parent, image_dir=image_dir, fmt=split.fmt)
        for post in split.posts:
            try:
                files.append((f"the image of post {post.key!r}", source.image_path(post.key)))
            except ValueError:
                pass  # a key that escapes the image folder: extraction records it with the reason
    for out in (out_file, Path(f"{out_file}.json")):
        refuse_inputs_as_output(out, "--out", files=files, folders=folders)


def _image_statuses(reader: CacheReader, split: Split) -> dict[str, tuple[str, str]]:
    """key -> (status, why it is not ok) of each post's image; logs the posts whose image is not ok."""
    statuses = {}
    for post in split.posts:
        status = reader.status(post.key)
        statuses[post.key] = (status, "" if status == "ok" else reader.get(post.key).error)
    bad = [(key, status, error) for key, (status, error) in statuses.items() if status != "ok"]
    if bad:
        named = "; ".join(f"{key} ({status}: {error})" for key, status, error in bad[:NAMED_IMAGES])
        more = f"; and {len(bad) - NAMED_IMAGES} more" if len(bad) > NAMED_IMAGES else ""
        log.warning(
            "%d of %d posts have no usable image (tagged from their text alone): %s%s",
            len(bad),
            len(split.posts),
            named,
            more,
        )
    return statuses


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


def _extract(
    record: dict, run_dir: Path, split: Split, image_dir: Path, tmp: Path, extract: Callable[..., Path]
) -> CacheReader:
    """Extract the posts' images with the run's recorded extractor into tmp/cache.

    The new cache's fingerprint cannot equal the run's, because the fingerprint also covers which
    images a cache holds; what must be equal is every other fingerprinted part (models and their
    weight hashes, token spec, thresholds, batch size, library versions).
    """
    recorded = record["cache"]["config"]
    if "fingerprint_parts" not in recorded:
        raise ValueError(
            f"run {run_dir} was trained on a cache that records no extraction settings "
            f"({record['cache']['dir']}); predict can only re-extract images for runs on `mner extract-features` caches"
        )
    # The extractor reads a data folder: the posts (tags as O) become its one split.
    data_dir = tmp / "data"
    data_dir.mkdir()
    _write_tagged(
        data_dir / f"{_PREDICT_SPLIT}.txt", split, [["O"] * len(post.words) for post in split.posts]
    )
    cache_dir = extract(
        recorded,
        f"run {run_dir}",
        data=DataConfig(data_dir=str(data_dir), image_dir=str(image_dir)),
        out=str(tmp / "cache"),
        splits=(_PREDICT_SPLIT,),
        overwrite=False,
        device="auto",  # not fingerprinted: the training machine's device need not exist here
    )
    reader = CacheReader(cache_dir)
    counts = Counter(reader.status(key) for key in reader.keys)
    log.info(
        "images of the %d posts: %d ok, %d missing, %d corrupt (missing and corrupt ones are masked)",
        len(reader),
        counts["ok"],
        counts["missing"],
        counts["corrupt"],
    )
    differences = extractor_differences(reader, record)
    if differences:
        raise ValueError(
            f"the images re-extracted for run {run_dir} do not match the extractor it was trained with; "
            f"differs: {'; '.join(differences)}"
        )
    return reader


def predict_classifier(run_dir, input_file, out_file, cache_dir=None, device: str = "auto") -> Path:
    """Label the posts of `input_file` (a split file of a classification folder, read_split_file) with a
    classifier run; writes `out_file`, the seed's submission format (guid,tag in the input's order), and
    for a csv input also `<out_file stem>.seed.csv`, the input with its tag column filled in (the seed's
    output form, write_seed_form).

    Their images come from `cache_dir` (else the run's cache), which must hold every guid and have been
    extracted with the run's extractor; text mode reads no cache. Raises ValueError otherwise, or when
    `out_file` would overwrite the input or a file of the run.
    """
    from mner.cache.classification import read_split_file, seed_form_file, write_predictions, write_seed_form
    from mner.cache.manifest import extract_command
    from mner.train.engine.classify import (
        check_guids_cached,
        load_classifier_run,
        open_run_cache,
        predict_split,
    )

    run_dir = Path(run_dir)
    seed_form = Path(input_file).suffix.lower() == ".csv"
    for out in (out_file, seed_form_file(out_file)) if seed_form else (out_file,):
        refuse_inputs_as_output(
            out, "--out", files=[("the input", input_file)], folders=[("the run", run_dir)]
        )
    split = read_split_file(input_file)
    run, c, model, tokenizer, runtime = load_classifier_run(run_dir, device)
    reader = open_run_cache(run, cache_dir, same_keys=False)
    try:
        if reader is not None:
            command = extract_command(reader.config, Path(input_file).parent)
            check_guids_cached(
                split,
                reader,
                f"extract them with the run's extractor: `{command}`, and pass NEW_CACHE with --cache",
            )
        predicted = predict_split(model, split, reader, tokenizer, c, runtime, run.record["label_names"])
    finally:
        if reader is not None:
            reader.close()
        runtime.close()
    if seed_form:
        write_seed_form(seed_form_file(out_file), split.path, predicted)
    return write_predictions(out_file, split.examples, predicted)
