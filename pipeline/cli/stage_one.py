"""The stage-one commands: the demo data, `extract-features` and the `cache` group."""

from __future__ import annotations

import inspect
import json
import time

import click

from mner.cache.inspect import show_record
from mner.cli.options import CONTEXT, data_config, data_options, default, user_errors
from mner.demo.build import DemoConfig
from mner.extract.config import AMP_MODES as EXTRACT_AMP_MODES
from mner.extract.config import DEFAULT_SCORE_THR, DETECTORS, REGION_FEATURES, VISIONS, ExtractConfig


@click.command("demo-data", context_settings=CONTEXT)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the demo data set.")
@click.option("--seed", type=int, default=default(DemoConfig, "seed"), show_default=True)
@click.option(
    "--classification",
    is_flag=True,
    help="The MVSA-style sentiment demo instead (train-classifier): the label is in every image, in some texts.",
)
@click.option("--posts", type=int, default=300, show_default=True, help="Posts of the --classification demo.")
@user_errors
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
        from mner.demo.build import build_demo

        path = build_demo(DemoConfig(out_dir=out, seed=seed))
    click.echo(f"demo data at {path}")


@click.command("extract-features", context_settings=CONTEXT)
@data_options
@click.option(
    "--clip",
    help="Local Hugging Face CLIP or CLIP-vision folder, or an untrained preset: tiny-clip, or demo-clip "
    "(the bundled MiniLM's 6 layers of 384, so IFAformer's towers pair with it) "
    "[default: tiny-clip with --data-dir; required with --dataset].",
)
@click.option(
    "--detector",
    help=f"{' | '.join(DETECTORS)} (tiny-frcnn: untrained preset; none: no region tokens) "
    "[default: tiny-frcnn with --data-dir; required with --dataset].",
)
@click.option(
    "--detector-ckpt",
    type=click.Path(dir_okay=False),
    help="torchvision state_dict file for --detector (required except for tiny-frcnn and none).",
)
@click.option(
    "--vision",
    type=click.Choice(VISIONS),
    default=default(ExtractConfig, "vision"),
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
    "--vision-trainable-blocks",
    type=int,
    default=default(ExtractConfig, "vision_trainable_blocks"),
    show_default=True,
    help="Also store the state before the vision model's last K blocks, and their weights, so stage two "
    "can train them: CLIP 1 to its layer count (all: the embedding output), a ResNet 1 (layer4).",
)
@click.option(
    "--region-features",
    type=click.Choice(REGION_FEATURES),
    default=default(ExtractConfig, "region_features"),
    show_default=True,
    help="Region token: the detector's box-head feature, or CLIP on the box crop.",
)
@click.option(
    "--topk",
    type=int,
    default=default(ExtractConfig, "topk"),
    show_default=True,
    help="Regions kept per image.",
)
@click.option(
    "--score-thr",
    type=float,
    default=None,
    help=f"Detector score threshold [default: {DEFAULT_SCORE_THR}; 0.0 for tiny-frcnn].",
)
@click.option(
    "--nms-iou",
    type=float,
    default=default(ExtractConfig, "nms_iou"),
    show_default=True,
    help="NMS IoU threshold.",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Cache folder to write.")
@click.option(
    "--batch-size",
    type=int,
    default=default(ExtractConfig, "batch_size"),
    show_default=True,
    help="Images per model forward (fingerprinted).",
)
@click.option(
    "--num-workers",
    type=int,
    default=default(ExtractConfig, "num_workers"),
    show_default=True,
    help="Image decoding workers.",
)
@click.option(
    "--device",
    default=default(ExtractConfig, "device"),
    show_default=True,
    help="auto | cpu | mps | cuda | cuda:N",
)
@click.option(
    "--amp",
    type=click.Choice(EXTRACT_AMP_MODES),
    default=default(ExtractConfig, "amp"),
    show_default=True,
    help="Autocast the extractors on CUDA (tokens are stored as float16 either way).",
)
@click.option(
    "--shard-size",
    type=int,
    default=default(ExtractConfig, "shard_size"),
    show_default=True,
    help="Images per HDF5 shard.",
)
@click.option("--overwrite", is_flag=True, help="Replace a cache made with a different configuration.")
@user_errors
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
    cfg = ExtractConfig(data=data_config(data_dir, dataset, data_root, image_dir, columns), **opts)
    cfg.check_inputs()  # before torch and the models load: a typo costs a fraction of a second
    from mner.extract.run import extract_features, summarize

    started = time.perf_counter()
    out = extract_features(cfg)
    click.echo(summarize(out, seconds=time.perf_counter() - started))


@click.group(context_settings=CONTEXT)
def cache():
    """Inspect, show and verify a feature cache.

    \b
    Example:
      mner cache inspect demo_out/cache
    """


@cache.command("inspect", context_settings=CONTEXT)
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@user_errors
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
@click.option(
    "--scale",
    type=float,
    default=inspect.signature(show_record).parameters["scale"].default,
    show_default=True,
    help="Enlarge the PNG this many times.",
)
@user_errors
def cache_show(cache_dir, key, png, image_path, scale):
    """Print one cached record; with --png draw its boxes with label names and scores.

    \b
    Example:
      mner cache show demo_out/cache --id demo_00003 --png demo_00003.png --scale 4
    """
    info = show_record(cache_dir, key, png=png, image_path=image_path, scale=scale)
    click.echo(json.dumps(info, indent=2))


@cache.command("verify", context_settings=CONTEXT)
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False))
@data_options
@click.option(
    "--images",
    is_flag=True,
    help="Also check each image file's size and mtime against the manifest (the data options, "
    "else the recorded data folder).",
)
@user_errors
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
        data = data_config(data_dir, dataset, data_root, image_dir, columns).resolve()
    report = verify_cache(cache_dir, data, images=images)
    for problem in report.problems:
        click.echo(f"PROBLEM: {problem}")
    if not report.ok:
        raise click.ClickException(f"{cache_dir}: {report.count} problem(s) found")
    click.echo(f"{cache_dir}: OK ({json.dumps(report.checked)})")
