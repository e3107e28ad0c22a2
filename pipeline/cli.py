"""The `mner` command line: maps each command to one stage entry function, nothing else.

Imports of the stages happen inside the commands so that `mner --help` is instant and a text-only
command never imports the vision stack. So the option defaults and choice lists are written out here
rather than read from the stage configs at import time; tests/pipeline/test_cli.py walks every option
and checks each against its dataclass field or entry-function default and each list against its
registry (ExtractConfig, DataConfig, RunConfig, AblationConfig, DemoConfig, DETECTORS, ABLATIONS, ...).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import re
import sys
import time
from pathlib import Path

import click

from mner import configs

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def _user_errors(fn):
    """Turn a ValueError from a stage (bad input, refused cache) into a clean click error: no traceback,
    and the settings it names spelled as this command's flags (`--data-dir`, not `data_dir`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as err:
            raise click.ClickException(_flag_names(str(err), click.get_current_context().command)) from err
        except OSError as err:
            raise click.ClickException(_os_error(err)) from err

    return wrapper


def _os_error(err: OSError) -> str:
    """One line for a file the command could not write or read (full disk, no permission, immutable)."""
    # A failed rename names both files; the second is the one being replaced (an immutable target).
    name = err.filename2 or err.filename
    where = f" {name}" if name else ""
    if err.errno == errno.ENOSPC:
        return (
            f"no space left on the device of{where}: free some space and run the same command again "
            "(what was finished is kept; a training run continues with --resume)"
        )
    return f"cannot write or read{where}: {err.strerror or err}; check its permissions and attributes (chattr -i)"


def _flag_names(message: str, command: click.Command) -> str:
    """`message` with the config field names of `command`'s options written as their flags.

    A name is replaced where it is a subject of the sentence: at the start ("topk must be ...",
    "cache_dir is required ...") or after give / either / or / with ("give data_dir, or dataset with
    data_root"), and followed by a verb or punctuation. Elsewhere the same words are prose ("detector
    checkpoint not found"), dotted keys (train.batch_size) or lists of config keys, and stay as they are.
    """
    for param in command.params:
        if not isinstance(param, click.Option) or not param.name or not param.opts[0].startswith("--"):
            continue
        before = r"(?:^|(?<=give )|(?<=either )|(?<=or )|(?<=with ))"
        after = r"(?= must| is required| goes| \(| or| with|,|;|\)|$)"
        message = re.sub(before + re.escape(param.name) + after, param.opts[0], message)
    return message


def _data_options(fn):
    """--data-dir DIR | --dataset NAME --data-root DIR, shared by every command that reads a data folder."""
    fn = click.option(
        "--columns",
        metavar="WORD,TAG",
        help="Columns (from 0) of the token and its tag in files with more than two per line, e.g. 0,3 "
        "for CoNLL-2003 [default: exactly token<TAB>tag].",
    )(fn)
    fn = click.option(
        "--image-dir",
        type=click.Path(file_okay=False),
        help="Image folder (default: DATA_DIR/images or DATA_DIR/<name>_images).",
    )(fn)
    fn = click.option(
        "--data-root", type=click.Path(file_okay=False), help="Folder holding the named --dataset."
    )(fn)
    fn = click.option(
        "--dataset", help=f"A dataset named in configs/datasets ({', '.join(configs.dataset_names())})."
    )(fn)
    fn = click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        help="Folder with train.txt, valid.txt, test.txt and an image folder.",
    )(fn)
    return fn


def _data_config(data_dir, dataset, data_root, image_dir, columns=None):
    from mner.cache.datasets import DataConfig

    return DataConfig(
        data_dir=data_dir, dataset=dataset, data_root=data_root, image_dir=image_dir, columns=columns
    )


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="mner-cache")
def main():
    """Two-stage multimodal NER: extract image tokens once into a cache, then train from the cache.

    \b
    Example (the embedded demo, untrained tiny vision models):
      mner demo-data --out demo_out/data
      mner extract-features --data-dir demo_out/data --clip tiny-clip --detector tiny-frcnn --out demo_out/cache
      mner train-from-cache --cache demo_out/cache --data-dir demo_out/data --out demo_out/runs/full
      mner evaluate demo_out/runs/full --split test
    """
    # The stages report progress (skipped shards, epochs, reused data, summaries) through logging.
    logging.basicConfig(level=logging.INFO, format="%(message)s")


@main.command("extract-features", context_settings=CONTEXT)
@_data_options
@click.option(
    "--clip",
    help="Local Hugging Face CLIP or CLIP-vision folder, or the untrained preset tiny-clip "
    "[default: tiny-clip with --data-dir; required with --dataset].",
)
@click.option(
    "--detector",
    help="fasterrcnn_resnet50_fpn | fasterrcnn_resnet50_fpn_v2 | fasterrcnn_mobilenet_v3_large_fpn | "
    "fasterrcnn_mobilenet_v3_large_320_fpn | tiny-frcnn | none (tiny-frcnn: untrained preset; none: no "
    "region tokens) [default: tiny-frcnn with --data-dir; required with --dataset].",
)
@click.option(
    "--detector-ckpt",
    type=click.Path(dir_okay=False),
    help="torchvision state_dict file for --detector (required except for tiny-frcnn and none).",
)
@click.option(
    "--vision",
    type=click.Choice(["clip", "resnet50", "resnet101", "resnet152", "tiny-resnet"]),
    default="clip",
    show_default=True,
    help="Patch tokens + global embedding: CLIP (--clip), or a torchvision ResNet's layer4 grid (49 x 2048 "
    "at 224 px) and avgpool vector; tiny-resnet is an untrained preset.",
)
@click.option(
    "--vision-ckpt",
    type=click.Path(dir_okay=False),
    help="torchvision state_dict file for a ResNet --vision (required for resnet50/101/152).",
)
@click.option(
    "--region-features",
    type=click.Choice(["frcnn", "clip-crop"]),
    default="frcnn",
    show_default=True,
    help="Region token: the detector's box-head feature, or CLIP on the box crop.",
)
@click.option("--topk", type=int, default=20, show_default=True, help="Regions kept per image.")
@click.option(
    "--score-thr",
    type=float,
    default=None,
    help="Detector score threshold [default: 0.2; 0.0 for tiny-frcnn].",
)
@click.option("--nms-iou", type=float, default=0.5, show_default=True, help="NMS IoU threshold.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache folder to write.")
@click.option(
    "--batch-size", type=int, default=16, show_default=True, help="Images per model forward (fingerprinted)."
)
@click.option("--num-workers", type=int, default=2, show_default=True, help="Image decoding workers.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | mps | cuda | cuda:N")
@click.option(
    "--amp",
    type=click.Choice(["off", "fp16", "bf16"]),
    default="off",
    show_default=True,
    help="Autocast the extractors on CUDA (tokens are stored as float16 either way).",
)
@click.option("--shard-size", type=int, default=512, show_default=True, help="Images per HDF5 shard.")
@click.option("--overwrite", is_flag=True, help="Replace a cache made with a different configuration.")
@_user_errors
def extract_features_cmd(data_dir, dataset, data_root, image_dir, columns, **opts):
    """Stage one: run CLIP (or a ResNet) and Faster R-CNN once over every image; write HDF5 shards + manifest.

    Re-running the same command skips completed shards; under `torchrun` each rank extracts its own
    shards and rank 0 writes the manifest.

    \b
    Example:
      mner extract-features --dataset twitter2015 --data-root /data --clip /models/clip-vit-base-patch32 \\
          --detector fasterrcnn_resnet50_fpn --detector-ckpt /models/frcnn_r50.pth --out cache/tw15
      mner extract-features --dataset twitter2015 --data-root /data --vision resnet50 \\
          --vision-ckpt /models/resnet50.pth --detector none --out cache/tw15-r50
    """
    from mner.extract.config import ExtractConfig

    cfg = ExtractConfig(data=_data_config(data_dir, dataset, data_root, image_dir, columns), **opts)
    cfg.check_inputs()  # before torch and the models load: a typo costs a fraction of a second
    from mner.extract.run import extract_features, summarize

    started = time.perf_counter()
    out = extract_features(cfg)
    click.echo(summarize(out, seconds=time.perf_counter() - started))


@main.group(context_settings=CONTEXT)
def cache():
    """Inspect, show and verify a feature cache.

    \b
    Example:
      mner cache inspect demo_out/cache
    """


@cache.command("inspect", context_settings=CONTEXT)
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_user_errors
def cache_inspect(cache_dir, as_json):
    """Images per status, shards, token shapes, fingerprint, models, region histogram, top labels, size.

    A text-state cache folder (model.text_frozen_layers > 0): posts, sub-words, width, frozen layers,
    encoder, split file, size.

    \b
    Example:
      mner cache inspect demo_out/cache --json
      mner cache inspect ~/.cache/mner/text-states/0123456789abcdef
    """
    from mner.cache.text_states import format_text_states, inspect_text_states, is_text_state_folder

    if is_text_state_folder(cache_dir):
        info = inspect_text_states(cache_dir)
        click.echo(json.dumps(info, indent=2) if as_json else format_text_states(info))
        return
    from mner.cache.inspect import format_inspection, inspect_cache

    info = inspect_cache(cache_dir)
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info))


@cache.command("show", context_settings=CONTEXT)
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--id", "key", required=True, help="Image key (the IMGID, or the image path).")
@click.option(
    "--png", type=click.Path(dir_okay=False), help="Draw the stored boxes on the image into this PNG."
)
@click.option(
    "--image",
    "image_path",
    type=click.Path(dir_okay=False),
    help="Image file to draw on [default: the image the cache was extracted from].",
)
@click.option("--scale", type=float, default=1.0, show_default=True, help="Enlarge the PNG this many times.")
@_user_errors
def cache_show(cache_dir, key, png, image_path, scale):
    """Print one cached record; with --png draw its boxes with label names and scores.

    \b
    Example:
      mner cache show demo_out/cache --id demo_00003 --png demo_00003.png --scale 4
    """
    from mner.cache.inspect import show_record

    info = show_record(cache_dir, key, png=png, image_path=image_path, scale=scale)
    click.echo(json.dumps(info, indent=2))


@cache.command("verify", context_settings=CONTEXT)
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
@_data_options
@click.option(
    "--images",
    is_flag=True,
    help="Also check each image file's size and mtime against the manifest (the data options, "
    "else the recorded data folder).",
)
@_user_errors
def cache_verify(cache_dir, data_dir, dataset, data_root, image_dir, columns, images):
    """Check shard checksums, counts, NaN/inf, boxes in [0, 1], and (with a data folder) the image ids.

    Exits non-zero with a report on any problem. --images also reports every image file that changed,
    appeared or went away since extraction.

    \b
    Example:
      mner cache verify demo_out/cache --data-dir demo_out/data --images
    """
    from mner.cache.verify import data_for_verify, verify_cache

    data = None
    if data_dir and not (dataset or data_root or image_dir or columns):
        data = data_for_verify(data_dir)  # an NER or a classification folder
    elif data_dir or dataset:
        data = _data_config(data_dir, dataset, data_root, image_dir, columns).resolve()
    report = verify_cache(cache_dir, data, images=images)
    for problem in report.problems:
        click.echo(f"PROBLEM: {problem}")
    if not report.ok:
        raise click.ClickException(f"{cache_dir}: {report.count} problem(s) found")
    click.echo(f"{cache_dir}: OK ({json.dumps(report.checked)})")


def _long_posts_option(fn):
    """--long-posts, for the commands that tag posts with a trained run (evaluate, predict)."""
    return click.option(
        "--long-posts",
        type=click.Choice(["truncate", "window"]),
        default="truncate",
        show_default=True,
        help="Posts longer than the encoder's max_length sub-words: predict the words past it O "
        "(truncate, as training scores), or tag every word by overlapping windows (window).",
    )(fn)


def _run_config(
    cache_dir, data, model, text_encoder, config_file, overrides, text_only, epochs, seed, out, resume
):
    from mner.train.config import RunConfig, load_run_config

    overrides = list(overrides)
    if text_encoder:
        overrides.append(f"model.text_encoder={json.dumps(text_encoder)}")
    if text_only:
        overrides.append("model.text_only=true")
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if seed is not None:
        overrides.append(f"train.seed={seed}")
    model_cfg, train_cfg = load_run_config(config_file=config_file, overrides=overrides, model=model)
    return RunConfig(
        model=model_cfg, train=train_cfg, cache_dir=cache_dir, data=data, out_dir=out, resume=resume
    )


@main.command("train-from-cache", context_settings=CONTEXT)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False),
    help="Feature cache from extract-features (not needed with --text-only).",
)
@_data_options
@click.option(
    "--model",
    help="A model of `mner models` (configs/models/NAME.toml, applied over the base before --config) "
    "[default: from config, afdvqf].",
)
@click.option(
    "--text-encoder", help="minilm | tiny-bert | a local Hugging Face folder [default: from config, minilm]."
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="TOML config diff over configs/train/base.toml.",
)
@click.option("--set", "overrides", multiple=True, help="Override: section.key=value (repeatable).")
@click.option("--text-only", is_flag=True, help="Train without the image; never opens the cache.")
@click.option("--epochs", type=int, help="Number of epochs [default: from config].")
@click.option("--seed", type=int, help="Random seed [default: from config].")
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    help="torch intra-op threads; 0: the CPUs this process may use (affinity, cgroup quota). Two "
    "trainings side by side on a small machine: give each its share [default: from config, 0].",
)
@click.option(
    "--text-cache",
    type=click.Path(file_okay=False),
    help="Root folder of the text-state caches that model.text_frozen_layers > 0 computes once and "
    "reads [default: $MNER_TEXT_CACHE, else ~/.cache/mner/text-states].",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Continue a killed run from its last checkpoint.")
@_user_errors
def train_from_cache_cmd(
    cache_dir,
    data_dir,
    dataset,
    data_root,
    image_dir,
    columns,
    model,
    text_encoder,
    config_file,
    overrides,
    text_only,
    epochs,
    seed,
    threads,
    text_cache,
    out,
    resume,
):
    """Stage two: train text encoder + query-guided fusion + CRF from cached tokens.

    The best epoch is chosen on dev F1; valid/test predictions and P/R/F1 go into the run folder.

    \b
    Example:
      mner train-from-cache --cache cache/tw15 --dataset twitter2015 --data-root /data \\
          --set model.qfnet_layers=1 --seed 1 --out runs/tw15_qf1
      mner train-from-cache --cache cache/tw15 --dataset twitter2015 --data-root /data \\
          --model afner --out runs/tw15_afner
    """
    data = _data_config(data_dir, dataset, data_root, image_dir, columns)
    overrides = (*overrides, *([f"train.threads={threads}"] if threads is not None else []))
    cfg = _run_config(
        cache_dir, data, model, text_encoder, config_file, overrides, text_only, epochs, seed, out, resume
    )
    cfg.text_cache = text_cache
    data.resolve()  # the data folder exists: checked before torch loads
    from mner.train.loop import train_from_cache

    run_dir = train_from_cache(cfg)
    click.echo(f"run written to {run_dir}")


def _amp_option(fn):
    """--amp for the commands that run a trained model (evaluate, predict)."""
    return click.option(
        "--amp",
        type=click.Choice(["auto", "off", "fp16", "bf16"]),
        default=None,
        help="Autocast on a GPU [default: the precision the run was trained in].",
    )(fn)


@main.command("train-classifier", context_settings=CONTEXT)
@click.option(
    "--data-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Classification folder: MVSA train.txt (guid,tag) + data/<guid>.txt|.jpg, or train.csv / val.csv / test.csv.",
)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False),
    help="Feature cache from `extract-features --data-dir` on the same folder (not read with --mode text).",
)
@click.option(
    "--mode",
    type=click.Choice(["text", "image", "both"]),
    help="What the head sees [default: from config, both].",
)
@click.option(
    "--head",
    type=click.Choice(["mlp", "cnn", "attention", "xattn"]),
    help="Classifier head [default: from config, mlp].",
)
@click.option(
    "--text-pool", type=click.Choice(["cls", "mean"]), help="Text feature [default: from config, cls]."
)
@click.option(
    "--image-feature",
    type=click.Choice(["global", "patches"]),
    help="Image feature: the cached global vector or the mean patch token [default: from config, global].",
)
@click.option(
    "--text-encoder", help="minilm | tiny-bert | a local Hugging Face folder [default: from config, minilm]."
)
@click.option(
    "--class-weights",
    type=click.Choice(["none", "balanced"]),
    help="Cross-entropy class weights [default: from config, none].",
)
@click.option("--epochs", type=int, help="Number of epochs [default: from config, 5].")
@click.option("--seed", type=int, help="Random seed [default: from config, 42].")
@click.option(
    "--valid-fraction",
    type=float,
    default=0.1,
    show_default=True,
    help="Share of train drawn as valid when the folder has no valid split.",
)
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of that draw.")
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="TOML file with a [classifier] table."
)
@click.option("--set", "overrides", multiple=True, help="Override: classifier.key=value (repeatable).")
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    help="torch intra-op threads; 0: the CPUs this process may use (affinity, cgroup quota). Two "
    "trainings side by side on a small machine: give each its share [default: from config, 0].",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Continue a killed run from its last checkpoint.")
@_user_errors
def train_classifier_cmd(
    data_dir,
    cache_dir,
    mode,
    head,
    text_pool,
    image_feature,
    text_encoder,
    class_weights,
    epochs,
    seed,
    valid_fraction,
    split_seed,
    config_file,
    overrides,
    threads,
    out,
    resume,
):
    """Sentence classification (the BertResNet seed): text, image or both, from one feature cache.

    Accuracy, macro-F1, per-class P/R/F1 and the confusion matrix of valid and test go into the run
    folder; the best epoch is chosen on valid; test_without_label.txt gets pred_test_without_label.txt
    (guid,tag in its order).

    \b
    Example:
      mner extract-features --data-dir mvsa --vision resnet50 --vision-ckpt resnet50.pth \\
          --detector none --out cache/mvsa
      mner train-classifier --data-dir mvsa --mode text --out runs/mvsa_text
      mner train-classifier --data-dir mvsa --cache cache/mvsa --mode both --head cnn --out runs/mvsa_cnn
    """
    from mner.cache.classification import ClassDataConfig
    from mner.train.classify import ClassifierRunConfig, load_classifier_config, train_classifier

    classifier = load_classifier_config(
        config_file,
        overrides,
        mode=mode,
        head=head,
        text_pool=text_pool,
        image_feature=image_feature,
        text_encoder=text_encoder,
        class_weights=class_weights,
        epochs=epochs,
        seed=seed,
        threads=threads,
    )
    data = ClassDataConfig(data_dir, valid_fraction=valid_fraction, seed=split_seed)
    # --mode text never opens --cache (train_classifier records none)
    cfg = ClassifierRunConfig(
        data=data, out_dir=out, classifier=classifier, cache_dir=cache_dir, resume=resume
    )
    run_dir = train_classifier(cfg)
    click.echo(f"run written to {run_dir}")


@main.command("evaluate", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--split", default="test", show_default=True, help="train | valid | test")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), help="Cache [default: the run's].")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder [default: the run's].")
@_amp_option
@_long_posts_option
@click.option(
    "--text-cache",
    type=click.Path(file_okay=False),
    help="Root of the text-state caches a run with model.text_frozen_layers > 0 reads, when one holds "
    "this split [default: the run's, else $MNER_TEXT_CACHE, else ~/.cache/mner/text-states].",
)
@_user_errors
def evaluate_cmd(run_dir, split, cache_dir, data_dir, amp, long_posts, text_cache):
    """Score a run on a split (conlleval semantics); writes RUN_DIR/eval/<split>-<UTC time>/results.json
    and pred.conll, leaving the training-time results.json and pred_<split>.conll as they are.

    Refuses a cache whose fingerprint differs from the one the run was trained on.

    \b
    Example:
      mner evaluate runs/tw15_qf1 --split test
    """
    from mner.train.runs import recorded_task
    from mner.train.tasks import SENTENCE_CLASSIFICATION

    if recorded_task(run_dir) == SENTENCE_CLASSIFICATION.name:
        from mner.train.classify import evaluate_classifier

        if long_posts != "truncate" or amp is not None or text_cache is not None:
            raise click.UsageError(
                "--amp, --long-posts and --text-cache apply to tagging runs, not to a classifier run"
            )
        scores, folder = evaluate_classifier(run_dir, split=split, cache_dir=cache_dir, data_dir=data_dir)
        click.echo(
            f"{run_dir} on {split} (written to {folder}):\n{SENTENCE_CLASSIFICATION.format_scores(scores)}"
        )
        return
    from mner.train.evaluate import evaluate_run, format_scores

    scores = evaluate_run(
        run_dir,
        split=split,
        cache_dir=cache_dir,
        data_dir=data_dir,
        amp=amp,
        long_posts=long_posts,
        text_cache=text_cache,
    )
    click.echo(f"{run_dir} on {split}:\n{format_scores(scores)}")


@main.command("predict", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--input", "input_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--image-dir", type=click.Path(file_okay=False), help="Images of the new posts.")
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False),
    help="Classifier runs: the cache holding the input's images [default: the run's].",
)
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False))
@_amp_option
@_long_posts_option
@_user_errors
def predict_cmd(run_dir, input_file, image_dir, cache_dir, out_file, amp, long_posts):
    """Tag new posts (IMGID-CoNLL, tags optional); writes CoNLL and JSON spans.

    A multimodal run re-extracts the new images with the extractor recorded in the run (same local weights).
    A classifier run (train-classifier) labels the posts of a split file of a classification folder
    (guid,tag lines, tags may be null) and writes guid,tag in the input's order; their images come from
    --cache (else the run's cache).

    \b
    Example:
      mner predict runs/tw15_qf1 --input new.txt --image-dir new_images --out new.pred.conll
      mner predict runs/mvsa_both --input mvsa/test_without_label.txt --out submission.txt
    """
    from mner.train.runs import recorded_task
    from mner.train.tasks import SENTENCE_CLASSIFICATION

    if recorded_task(run_dir) == SENTENCE_CLASSIFICATION.name:
        from mner.train.classify import predict_classifier

        if image_dir is not None or amp is not None or long_posts != "truncate":
            raise click.UsageError(
                "--image-dir, --amp and --long-posts apply to tagging runs; a classifier run reads images "
                "from --cache"
            )
        out = predict_classifier(run_dir, input_file, out_file, cache_dir=cache_dir)
        click.echo(f"predictions written to {out}")
        return
    if cache_dir is not None:
        raise click.UsageError(
            "--cache applies to classifier runs; a tagging run re-extracts with --image-dir"
        )
    from mner.train.predict import predict

    out = predict(run_dir, input_file, image_dir, out_file, amp=amp, long_posts=long_posts)
    click.echo(f"predictions written to {out}")


@main.command("ablate", context_settings=CONTEXT)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False),
    help="Feature cache (reused, never re-extracted).",
)
@_data_options
@click.option(
    "--exp",
    "experiments",
    multiple=True,
    help="full | no_align | no_adapt | no_region | no_patch | text_only | qfnet1 | no_slot_type | no_resampler | no_preserve | all | "
    "model=NAME (a model of `mner models`, as it is) | a config-diff TOML (repeatable; `--list` shows "
    "what each changes).",
)
@click.option(
    "--grid",
    multiple=True,
    help="A sweep axis section.key=v1,v2,... (repeatable): every combination is an arm, crossed with "
    "the --exp experiments (default: full).",
)
@click.option(
    "--list", "list_only", is_flag=True, help="Print every named experiment with its diff, and exit."
)
@click.option(
    "--model",
    help="The model every --exp but model=NAME starts from (`mner models`) [default: from config, afdvqf].",
)
@click.option(
    "--seeds",
    type=int,
    default=3,
    show_default=True,
    help="Seeds 1..N per experiment; the only source of the seed (a --set, --grid or experiment "
    "that sets train.seed is refused).",
)
@click.option(
    "--text-encoder", help="minilm | tiny-bert | a local Hugging Face folder [default: from config, minilm]."
)
@click.option(
    "--epochs",
    type=int,
    help="Epochs per run [default: from config]; refused beside a --set, --grid or experiment that "
    "sets the epochs (without --epochs those are honoured).",
)
@click.option("--set", "overrides", multiple=True, help="Override for every run: section.key=value.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Ablation folder (required unless --list); a re-run into it continues it only with the "
    "same settings.",
)
@click.option(
    "--bootstrap",
    type=int,
    default=1000,
    show_default=True,
    help="Resamples of the paired bootstrap of each experiment against the first (0: no test).",
)
@_user_errors
def ablate_cmd(
    cache_dir,
    data_dir,
    dataset,
    data_root,
    image_dir,
    columns,
    experiments,
    grid,
    list_only,
    model,
    seeds,
    text_encoder,
    epochs,
    overrides,
    out,
    bootstrap,
):
    """Run named ablations x seeds on one cache; write ablation.csv and ablation.md (mean ± std, and
    each experiment against the first by a paired bootstrap over posts: dF1, 95% CI, p).

    \b
    Example:
      mner ablate --list
      mner ablate --cache cache/tw15 --dataset twitter2015 --data-root /data \\
          --exp full --exp no_region --exp text_only --seeds 3 --out ablations/tw15
      mner ablate ... --grid model.qfnet_layers=1,2,3 --grid train.lr_fusion=1e-4,3e-4 --out sweeps/qgf
      mner ablate --cache cache/tw15 --dataset twitter2015 --data-root /data \\
          --exp model=afdvqf --exp model=afner --exp model=bert-crf --out ablations/zoo
      mner ablate --cache cache/tw15 --dataset twitter2015 --data-root /data \\
          --model afner --exp full --exp no_slot_type --out ablations/afner
      mner ablate --cache cache/mvsa --data-dir mvsa --exp mode=text --exp mode=image \\
          --exp mode=both --exp mode=both,head=cnn --out ablations/mvsa   # a classification folder
    """
    if list_only:
        from mner.train.ablate import list_experiments

        click.echo(list_experiments())
        return
    if out is None:
        raise click.UsageError("Missing option '--out' (the ablation folder).")
    from mner.cache.classification import is_classification_folder

    if data_dir is not None and is_classification_folder(data_dir):
        if grid or model or dataset or image_dir or columns:
            raise click.UsageError(
                "a classification folder's ablation takes --exp KEY=VALUE diffs of the classifier "
                "(--exp mode=text --exp head=cnn); --grid, --model, --dataset, --image-dir and --columns "
                "apply to tagging runs"
            )
        from mner.cache.classification import ClassDataConfig
        from mner.train.class_ablate import ClassAblationConfig, run_class_ablation

        settings = [*overrides]
        settings += [f"classifier.text_encoder={text_encoder}"] if text_encoder is not None else []
        path = run_class_ablation(
            ClassAblationConfig(
                data=ClassDataConfig(data_dir),
                cache_dir=cache_dir,
                experiments=list(experiments),
                out_dir=out,
                seeds=seeds,
                overrides=settings,
                bootstrap=bootstrap,
                epochs=epochs,
            )
        )
        click.echo(Path(path).read_text())
        return
    data = _data_config(data_dir, dataset, data_root, image_dir, columns)
    data.resolve()  # the data folder exists: checked before torch loads
    from mner.train.ablate import AblationConfig, run_ablation

    cfg = AblationConfig(
        cache_dir=cache_dir,
        data=data,
        text_encoder=text_encoder,
        experiments=list(experiments),
        grid=list(grid),
        seeds=seeds,
        out_dir=out,
        overrides=list(overrides),
        epochs=epochs,
        bootstrap=bootstrap,
        model=model,
    )
    path = run_ablation(cfg)
    click.echo(Path(path).read_text() if Path(path).is_file() else f"ablation written to {path}")


@main.command("models", context_settings=CONTEXT)
@_user_errors
def models_cmd():
    """List the model zoo: each model's name, the seed it follows and what it adds.

    A model is a TOML diff over configs/train/base.toml (configs/models/NAME.toml); pass its name to
    train-from-cache --model or ablate --model / --exp model=NAME.

    \b
    Example:
      mner models
    """
    from mner.train.config import describe_model, model_names

    rows = [(name, *describe_model(name)) for name in model_names()]
    widths = [max(len(row[i]) for row in [("name", "seed", ""), *rows]) for i in range(2)]
    for name, seed, adds in [("name", "seed", "adds"), *rows]:
        click.echo(f"{name:<{widths[0]}}  {seed:<{widths[1]}}  {adds}")


@main.command("demo-data", context_settings=CONTEXT)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the demo data set.")
@click.option("--seed", type=int, default=13, show_default=True)
@click.option(
    "--classification",
    is_flag=True,
    help="The MVSA-style sentiment demo instead (train-classifier): the label is in every image, in some texts.",
)
@click.option("--posts", type=int, default=300, show_default=True, help="Posts of the --classification demo.")
@_user_errors
def demo_data_cmd(out, seed, classification, posts):
    """Build the embedded demo data set (IMGID-CoNLL + images), deterministically from a seed.

    An entity's type can be told only from its post's image.

    \b
    Example:
      mner demo-data --out demo_out/data
      mner demo-data --classification --out demo_out/mvsa
    """
    if classification:
        from mner.demo import make_mvsa_demo

        path = make_mvsa_demo(out, seed=seed, n=posts)
    else:
        from mner.demo.build import DemoConfig, build_demo

        path = build_demo(DemoConfig(out_dir=out, seed=seed))
    click.echo(f"demo data at {path}")


@main.command("results", context_settings=CONTEXT)
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--split", default="test", show_default=True, help="train | valid | test")
@click.option(
    "--bootstrap",
    type=int,
    default=1000,
    show_default=True,
    help="Resamples of the paired bootstrap against the first run (0: no test).",
)
@click.option("--bootstrap-seed", type=int, default=0, show_default=True, help="Seed of the resampling.")
@click.option(
    "--plot",
    type=click.Path(file_okay=False),
    help="Also write PNGs here: learning curves and per-type F1 of tagging runs (a run still training: "
    "its epochs so far), and for an ablation folder its arms with error bars (micro F1; accuracy and "
    "macro F1 of a classifier ablation). Needs matplotlib: pip install 'mner-cache[plot]'.",
)
@_user_errors
def results_cmd(run_dirs, split, bootstrap, bootstrap_seed, plot):
    """Print a table of micro P/R/F1 (percent) for one or more run folders.

    Reads each run's training-time results.json (not `mner evaluate`'s eval/ folders); a run without
    one gets a row whose status says why, e.g. "unfinished (epoch 2/10)". With two or more runs each
    is compared with the first by a paired bootstrap over the posts of pred_<split>.conll: dF1 in
    percentage points, its 95% CI and a two-sided p-value.

    \b
    Example:
      mner results runs/text_only runs/full --split test
      mner results runs/text_only runs/full --bootstrap 10000 --bootstrap-seed 1
      mner results runs/text_only runs/full ablations/tw15 --plot figures/
    """
    from mner.train.ablate import ABLATION_MD
    from mner.train.evaluate import results_table
    from mner.train.plots import write_plots

    if bootstrap < 0:
        raise click.BadParameter(f"must be >= 0 (0: no test), got {bootstrap}", param_hint="--bootstrap")

    runs = [path for path in run_dirs if not _is_ablation_folder(path)]
    if runs:
        click.echo(results_table(runs, split=split, bootstrap=bootstrap, bootstrap_seed=bootstrap_seed))
    for path in run_dirs:
        if path not in runs and (Path(path) / ABLATION_MD).is_file():
            click.echo(f"\n{path}:\n" + (Path(path) / ABLATION_MD).read_text(encoding="utf-8"))
    if plot is not None:
        for png in write_plots(list(run_dirs), plot, split=split):
            click.echo(f"wrote {png}")


def _is_ablation_folder(path) -> bool:
    """An ablation folder goes to the plots only; its own table is its ablation.md."""
    from mner.train.ablate import ABLATION_CSV

    return (Path(path) / ABLATION_CSV).is_file()


@main.command("cases", context_settings=CONTEXT)
@click.argument("run_a", type=click.Path(exists=True, file_okay=False))
@click.argument("run_b", type=click.Path(exists=True, file_okay=False))
@click.option("--split", default="test", show_default=True, help="train | valid | test")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for index.html, the PNGs and cases.json (new, empty, or an earlier cases folder).",
)
@click.option(
    "--limit",
    type=int,
    default=20,
    show_default=True,
    help="Posts shown, best ranked first (0: every post that differs).",
)
@click.option(
    "--ids", multiple=True, help="Show the post with this image key instead of the ranking (repeatable)."
)
@click.option(
    "--image-dir",
    type=click.Path(file_okay=False),
    help="Raw images to draw on (under the cached regions, or alone when neither run has a cache) "
    "[default: the image folder RUN_B was trained with].",
)
@_user_errors
def cases_cmd(run_a, run_b, split, out, limit, ids, image_dir):
    """Write an HTML page of the posts where RUN_B's predictions differ from RUN_A's.

    Posts are ranked by the gold spans B fixes minus those it breaks. Each shows the image with its
    cached regions (from either run's cache; a placeholder that says why when there is none), and
    the gold, A and B spans by type with wrong spans struck through. Prints the counts of spans
    fixed, broken and changed in type, and of posts that differ.

    \b
    Example:
      mner cases demo_out/runs/text_only demo_out/runs/afdvqf --out demo_out/cases
      mner cases runs/text runs/full --split valid --ids 1015799 --ids 1017446 --out cases/picked
    """
    from mner.train.cases import CASES_FILE, CasesConfig, summary_line, write_cases

    cfg = CasesConfig(
        run_a=run_a, run_b=run_b, out_dir=out, split=split, limit=limit, ids=list(ids), image_dir=image_dir
    )
    page = write_cases(cfg)
    summary = json.loads((Path(page).parent / CASES_FILE).read_text(encoding="utf-8"))["summary"]
    click.echo(summary_line(summary))
    click.echo(f"case study written to {page}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
