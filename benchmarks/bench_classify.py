"""Sentence classification (issue 12 section 5): training from the cache against ResNet in the loop.

Per-step training time of the `mner train-classifier` model (SentenceClassifier: text encoder +
ClassifierHead, mode both, head mlp, the image feature the ResNet's global avgpool vector) two ways:

    cached   the classifier's own loader (train.classify: the posts' global vectors read through
             cache.CacheReader, the texts tokenised in the collate) + train.loop.train_step
    e2e      the seed notebook's way: every step decodes the JPEGs (extract.images.load_image), applies
             the ResNet transform (extract.resnet.resnet_transform, in the loader's collate), runs the
             frozen ResNet forward (ResNetEncoder.encode, eval, inference_mode) and then the same
             train_step on the same posts, the avgpool vectors standing where the cached ones stood

A step is the loader fetch + (e2e) the ResNet forward + train_step (forward, backward, clipping,
AdamW and schedule step, as train_classifier builds them). The two take turns step by step in one
process, so a slow spell of a shared machine hits them alike, both start from the same weights and
see the same posts in the same order; the cached mode is the baseline of the ratio. Before timing,
the first e2e batch is checked against the cache (avgpool vectors equal up to float16 rounding).

Also timed, once: `extract_features` of the demo folder (vision resnet50 or tiny-resnet, detector
none), the cache the cached mode reads. From the step times and the extraction time the script
prints the estimated time of an epoch both ways, for the demo's train split and for an MVSA-Single-
size epoch (`--epoch-posts`, 4,500 by default), and the break-even epoch count: the number of epochs
after which extracting once and training from the cache has cost less than training end to end,
extraction / (e2e epoch - cached epoch).

Sizes: `--full` is torchvision's ResNet-50 at 224 px (random init, its state dict written to the
temporary folder and passed as the vision checkpoint; nothing is downloaded); without it the
tiny-resnet preset at 64 px. The data is a generated MVSA-style demo folder (demo.classification,
`--image-size` px JPEGs, 500 by default, which the transform resizes and crops). The text encoder is
MiniLM by default (`--encoder`).

    python benchmarks/bench_classify.py --full                 # ResNet-50, 224 px (~30 s on 2 CPU cores)
    python benchmarks/bench_classify.py                        # tiny-resnet, seconds
    python benchmarks/bench_classify.py --full --steps 20 --device cuda
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from bench_train import forever, step_in_turns  # this folder: both run as scripts from it
from torch.utils.data import DataLoader
from torchvision.models import resnet

from mner.cache.classification import ClassDataConfig, ClassSplit, Example, read_classification
from mner.cache.datasets import DataConfig
from mner.cache.reader import CacheReader
from mner.demo.classification import make_mvsa_demo
from mner.extract.config import ExtractConfig
from mner.extract.images import load_image
from mner.extract.models import model_info
from mner.extract.resnet import ResNetEncoder, load_resnet, preprocess_for_resnet
from mner.extract.run import extract_features
from mner.runtime import resolve_runtime, seed_everything
from mner.train.engine.classifier_data import collate_posts, post_loader
from mner.train.engine.classify import ClassifierConfig, param_groups
from mner.train.engine.loop import SCHEDULES, train_step
from mner.train.zoo.classifier_model import ClassifierHead, SentenceClassifier
from mner.train.zoo.text import load_encoder, load_tokenizer, resolve_text_encoder

MVSA_SINGLE_POSTS = 4500  # MVSA-Single after the usual cleaning: about 4,500 image-text posts
MODES = ("cached", "e2e")


# ------------------------------------------------------------------------------------------ set-up


def make_vision_ckpt(work: Path, full: bool) -> tuple[str, str | None]:
    """(vision name, checkpoint file): a random-init torchvision ResNet-50 state dict, or tiny-resnet's preset."""
    if not full:
        return "tiny-resnet", None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = resnet.resnet50(weights=None)
    ckpt = work / "resnet50-random.pt"
    torch.save(model.state_dict(), ckpt)
    return "resnet50", str(ckpt)


def extract_cache(data_dir: Path, out: Path, vision: str, ckpt: str | None, args) -> dict:
    """Extract the demo folder's images once; returns the wall time, the model-loading part and the count."""
    device = args.device
    start = time.perf_counter()
    model_info(load_resnet(vision, ckpt, device), None)  # what extract_features pays before any image
    setup = time.perf_counter() - start
    cfg = ExtractConfig(
        data=DataConfig(data_dir=str(data_dir)),
        out=str(out),
        vision=vision,
        vision_ckpt=ckpt,
        detector="none",
        batch_size=args.extract_batch_size,
        num_workers=args.num_workers,
        device=device,
    )
    start = time.perf_counter()
    extract_features(cfg)
    wall = time.perf_counter() - start
    with CacheReader(str(out)) as reader:
        images = len(reader)
    return {"wall_s": wall, "setup_s": setup, "images": images}


# ------------------------------------------------------------------------------------------ end to end


class ImageCollate:
    """DataLoader collate_fn of the e2e mode: the classifier's own text collate, plus every post's JPEG
    decoded and transformed into pixels (B, 3, S, S) for the ResNet (a post without a usable image gets
    zeros and has_image False, as a cache records it)."""

    def __init__(self, text_collate, transform, side: int, label_ids: dict):
        self.text_collate, self.transform, self.side, self.label_ids = (
            text_collate,
            transform,
            side,
            label_ids,
        )

    def __call__(self, examples: list[Example]) -> dict:
        batch = self.text_collate(
            [{"text": e.text, "label": self.label_ids.get(e.label, -100)} for e in examples]
        )
        loaded = [load_image(e.image) for e in examples]
        blank = torch.zeros(3, self.side, self.side)
        pixels = [preprocess_for_resnet(self.transform, [x.image])[0] if x.image else blank for x in loaded]
        batch["pixels"] = torch.stack(pixels)  # (B, 3, S, S)
        batch["has_image"] = torch.tensor([x.status == "ok" for x in loaded])  # (B,)
        batch["guids"] = [e.guid for e in examples]
        return batch


# ------------------------------------------------------------------------------------------ runs


class ModeRun:
    """One mode's classifier, optimiser and batch stream; `step()` times one training step."""

    def __init__(self, mode: str, split: ClassSplit, labels: list, reader, vision, args, runtime):
        """
        Args:
            mode: "cached" or "e2e".
            split: the train split (both modes see its posts in the same shuffled order).
            labels: label names (index = id).
            reader: the CacheReader (cached mode reads it; e2e checks its first batch against it).
            vision: the frozen ResNetEncoder (e2e only; None for cached).
        """
        self.mode, self.runtime, self.vision = mode, runtime, vision
        self.reference = reader if mode == "e2e" and runtime.amp_dtype is None else None
        c = ClassifierConfig(
            mode="both",
            head="mlp",
            text_encoder=args.encoder,
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device,
            vision_trainable_blocks=0,  # both ways a frozen ResNet: the cached avgpool vector is read as it is
        )
        self.cfg = c
        label_ids = {label: i for i, label in enumerate(labels)}
        encoder_dir = resolve_text_encoder(c.text_encoder)
        tokenizer = load_tokenizer(encoder_dir)
        torch.manual_seed(args.seed)  # both modes start from the same weights
        encoder = load_encoder(encoder_dir)
        head = ClassifierHead(
            c.head,
            c.mode,
            encoder.config.hidden_size,
            reader.spec.global_dim,
            len(labels),
            c.hidden_size,
            c.dropout,
            c.attention_heads,
        )
        self.model = SentenceClassifier(
            encoder, head, c.text_pool, image_norm=c.image_norm, image_dim=reader.spec.global_dim
        ).to(runtime.device)  # identity statistics: the step's cost, not its values, is timed
        self.model.train()
        if mode == "cached":
            loader = post_loader(split, reader, labels, tokenizer, c, True, c.seed)
        else:
            side = vision.info["preprocessing"]["crop"]
            loader = DataLoader(
                split.examples,  # the same sampler and generator as post_loader: the same posts per step
                batch_size=c.batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(c.seed),
                num_workers=args.num_workers,
                collate_fn=ImageCollate(
                    collate_posts(tokenizer, c.max_length), vision.transform, side, label_ids
                ),
            )
        self.batches = forever(loader)
        total = args.warmup + args.steps
        self.optimizer = torch.optim.AdamW(param_groups(self.model, c), weight_decay=c.weight_decay)
        self.scheduler = SCHEDULES[c.schedule](self.optimizer, round(c.warmup_ratio * total), total)
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=False)
        self.times = {"step": [], "data": [], "vision": [], "train": []}
        self.checked = None

    def step(self) -> None:
        runtime = self.runtime
        start = time.perf_counter()
        batch = next(self.batches)  # cached: cache read + tokenise; e2e: + decode + transform
        fetched = time.perf_counter()
        if self.vision is not None:
            pixels = batch.pop("pixels").to(runtime.device)
            guids = batch.pop("guids")
            with runtime.autocast():
                _, global_embed = self.vision.encode(pixels)  # (B, Dg), frozen, under inference_mode
            # clone(): an inference-mode tensor cannot be saved for the head's backward
            batch["image"] = global_embed.float().clone()
            self._sync()
            if self.reference is not None:
                self.checked = self._check_against_cache(guids, batch)
                self.reference = None
        seen = time.perf_counter()
        train_step(
            self.model,
            batch,
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.cfg.max_grad_norm,
            runtime,
        )  # reads the loss with .item(): waits for the step
        self._sync()
        done = time.perf_counter()
        for name, seconds in (
            ("step", done - start),
            ("data", fetched - start),
            ("vision", seen - fetched),
            ("train", done - seen),
        ):
            self.times[name].append(seconds)

    def _check_against_cache(self, guids: list[str], batch: dict) -> float:
        """The e2e avgpool vectors equal the cached ones up to float16 rounding; returns the largest
        relative difference."""
        worst = 0.0
        for row, guid in enumerate(guids):
            record = self.reference.get(guid)
            assert bool(batch["has_image"][row]) == (record.status == "ok"), f"{guid}: image status differs"
            cached = torch.from_numpy(np.asarray(record.global_embed, dtype=np.float32))
            computed = batch["image"][row].float().cpu()
            assert torch.isfinite(cached).all(), f"{guid}: the cached global vector is not finite"
            assert torch.allclose(computed, cached, rtol=1e-2, atol=1e-2), f"{guid}: e2e global != cache"
            scale = cached.abs().max().clamp_min(1e-6)
            worst = max(worst, float((computed - cached).abs().max() / scale))
        return worst

    def summary(self, warmup: int) -> dict:
        timed = {name: values[warmup:] for name, values in self.times.items()}
        return {
            "mode": self.mode,
            "median_s": statistics.median(timed["step"]),
            "mean_s": statistics.fmean(timed["step"]),
            **{f"{name}_s": statistics.fmean(timed[name]) for name in ("data", "vision", "train")},
        }

    def _sync(self) -> None:
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize(self.runtime.device)


def measure(data_dir: Path, cache_dir: Path, vision_name: str, ckpt: str | None, args) -> dict:
    """Time `warmup + steps` steps of both modes, taking turns (the first to go rotates)."""
    runtime = resolve_runtime(args.device, "off")
    seed_everything(args.seed)  # as train_classifier does
    data = read_classification(ClassDataConfig(str(data_dir)))
    split, labels = data.splits["train"], list(data.labels)
    reader = CacheReader(str(cache_dir))
    vision: ResNetEncoder = load_resnet(vision_name, ckpt, runtime.device)
    runs = [
        ModeRun(mode, split, labels, reader, vision if mode == "e2e" else None, args, runtime)
        for mode in MODES
    ]
    step_in_turns(runs, args.warmup + args.steps)
    reader.close()
    return {
        "runs": [run.summary(args.warmup) for run in runs],
        "checked": runs[1].checked,
        "train_posts": len(split.examples),
        "spec": reader.spec,
        "side": vision.info["preprocessing"]["crop"],
    }


# ------------------------------------------------------------------------------------------ report


def report(result: dict, extraction: dict, args) -> None:
    cached, e2e = result["runs"]
    print(
        f"\nper-step seconds, batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up "
        "(data: loader fetch; vision: ResNet forward; train: train_step)"
    )
    header = f"{'mode':8} {'median':>8} {'mean':>8} {'data':>8} {'vision':>8} {'train':>8} {'ms/step':>9}"
    print(header)
    print("-" * len(header))
    for r in (cached, e2e):
        print(
            f"{r['mode']:8} {r['median_s']:8.3f} {r['mean_s']:8.3f} {r['data_s']:8.3f} {r['vision_s']:8.3f} "
            f"{r['train_s']:8.3f} {r['median_s'] * 1000:9.1f}"
        )
    ratio = e2e["median_s"] / cached["median_s"]
    print(f"\nend to end / cached = {ratio:.2f}x (medians; means {e2e['mean_s'] / cached['mean_s']:.2f}x)")
    if result["checked"] is not None:
        print(
            f"first e2e batch vs cache: global vectors agree (largest relative difference {result['checked']:.1e})"
        )

    per_image = (extraction["wall_s"] - extraction["setup_s"]) / extraction["images"]
    print(
        f"\nextraction: {extraction['images']} images in {extraction['wall_s']:.1f} s (model loading and "
        f"checkpoint hashing {extraction['setup_s']:.1f} s), {per_image * 1000:.0f} ms/image after that"
    )
    print(
        f"\nper epoch (steps = ceil(posts / {args.batch_size}) x median step; extraction of as many images):"
    )
    header = (
        f"{'posts':>6} {'steps':>6} {'cached':>10} {'e2e':>10} {'extraction':>11} "
        f"{'e2e - cached':>13} {'break-even':>11}"
    )
    print(header)
    print("-" * len(header))
    for posts in (result["train_posts"], args.epoch_posts):
        steps = math.ceil(posts / args.batch_size)
        epoch_cached, epoch_e2e = steps * cached["median_s"], steps * e2e["median_s"]
        extract = extraction["setup_s"] + per_image * posts
        saved = epoch_e2e - epoch_cached
        even = f"{extract / saved:9.2f} ep" if saved > 0 else "      never"
        print(
            f"{posts:6d} {steps:6d} {_duration(epoch_cached):>10} {_duration(epoch_e2e):>10} "
            f"{_duration(extract):>11} {_duration(saved):>13} {even:>11}"
        )
    print(
        "break-even: extraction / (e2e epoch - cached epoch), the epochs after which extracting once and "
        "training from the cache has cost less in all"
    )


def _duration(seconds: float) -> str:
    if abs(seconds) < 120:
        return f"{seconds:.1f} s"
    if abs(seconds) < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--full",
        action="store_true",
        help="torchvision ResNet-50 at 224 px, random init (default: the tiny-resnet preset at 64 px)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument(
        "--encoder", default="minilm", help="text encoder: minilm, tiny-bert or a folder (default minilm)"
    )
    parser.add_argument("--posts", type=int, default=60, help="demo posts, 70%% of them train (default 60)")
    parser.add_argument("--image-size", type=int, default=500, help="demo JPEG side in px (default 500)")
    parser.add_argument("--batch-size", type=int, default=8, help="posts per step (default 8)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode (default 6)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps per mode (default 1)")
    parser.add_argument(
        "--epoch-posts",
        type=int,
        default=MVSA_SINGLE_POSTS,
        help=f"posts of the estimated epoch (default {MVSA_SINGLE_POSTS}, about MVSA-Single)",
    )
    parser.add_argument(
        "--extract-batch-size", type=int, default=8, help="images per extraction forward (default 8)"
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="loader workers of the extraction and of the e2e mode (default 0: in the main process)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (default 1; 0: torch's default)"
    )
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    for name in ("posts", "image_size", "batch_size", "steps", "epoch_posts", "extract_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.num_workers < 0 or args.threads < 0:
        parser.error("--warmup, --num-workers and --threads must be >= 0")
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(
        f"bench_classify: torch {torch.__version__}, device {args.device}, torch threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} CPUs visible; vision "
        f"{'resnet50 (random init)' if args.full else 'tiny-resnet'}, text encoder {args.encoder}, "
        "mode both, head mlp",
        flush=True,
    )
    if args.device == "cpu":
        print("note: on a CPU shared with other jobs step times are noisy; compare ratios, not seconds")
    with tempfile.TemporaryDirectory(prefix="bench_classify_") as tmp:
        work = Path(tmp)
        data_dir = make_mvsa_demo(work / "data", seed=args.seed, n=args.posts, image_size=args.image_size)
        vision, ckpt = make_vision_ckpt(work, args.full)
        extraction = extract_cache(data_dir, work / "cache", vision, ckpt, args)
        print(
            f"extracted the cache of {extraction['images']} images in {extraction['wall_s']:.1f} s",
            flush=True,
        )
        result = measure(data_dir, work / "cache", vision, ckpt, args)
    spec = result["spec"]
    print(
        f"\ndata: MVSA-style demo, {args.posts} posts ({result['train_posts']} train, the epoch), "
        f"{args.image_size} px JPEGs; {vision} sees {result['side']} px, global vector {spec.global_dim}-d "
        f"({spec.global_source})"
    )
    report(result, extraction, args)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
