"""Stage-two training speed: what the feature cache costs and what it saves (issue "Stage two" section 6).

Per-step training time (loader fetch + `train.loop.train_step`, the training loop's own step: forward,
backward, clipping, optimiser and schedule step; optimiser and schedule from `train.loop.build_optimizer`)
of three modes:

    text     the text-only model (model.text_only), no image at all
    cached   the full multimodal model (default ModelConfig: qgf fusion, patches + regions) reading its
             tokens from a stage-one cache through cache.CacheReader and train.data.make_loader
    e2e      the same multimodal model trained "end to end": every step decodes and preprocesses the JPEGs
             (stage one's dataset, in the loader) and runs stage one's batch encoder (extract.run: the
             frozen CLIP vision + Faster R-CNN under inference_mode, region padding, float16 records, as
             a cache stores them), then the training collate and the same step

and, from the same run:

    (a) cache overhead       = cached step time / text-only step time     (target <= 1.25)
    (b) speed-up over e2e    = e2e step time / cached step time
    (c) peak memory          = peak RSS of each mode alone in a fresh process (and CUDA peak allocation)

Times are medians over the timed steps. At the main batch size the modes take turns step by step in one
worker process, so a slow spell of a shared machine hits them alike; each mode then runs a few steps
alone in a fresh process for its memory. Token shapes come in two sizes: the tiny presets (tiny-clip +
tiny-frcnn) and full-size random-init extractors (CLIP ViT-B/32 with projection, Faster R-CNN R50-FPN,
nothing downloaded). The full-size end-to-end mode takes minutes per step on a CPU (a random R50-FPN
keeps its top-20 boxes at score threshold 0, as bench_extract.py does), so it and its cached partner run
alone with their own short batch and step counts. The data is a generated demo folder (demo.build_demo,
500 px JPEGs); its train posts are repeated to make an epoch, so every mode sees the same posts.

    python benchmarks/bench_train.py                                  # CPU, minilm, tiny + full size
    python benchmarks/bench_train.py --encoder minilm tiny-bert --no-full
    python benchmarks/bench_train.py --device cuda --amp bf16 --full-steps 10 --full-warmup 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from bench_extract import make_full_models  # the sibling script: benchmarks/ is sys.path[0]
from torch.utils.data import DataLoader

from mner.cache.datasets import DataConfig, DataSource, Post, Split, label_names, resolve_data
from mner.cache.reader import CacheReader
from mner.cache.shards import Record, TokenSpec, read_manifest
from mner.demo.build import DemoConfig, build_demo
from mner.extract.config import ExtractConfig
from mner.extract.models import build_detector, load_clip
from mner.extract.run import _collate, _encode_batch, _Images, extract_features, token_spec
from mner.runtime import resolve_runtime, seed_everything
from mner.train.config import ModelConfig, TrainConfig
from mner.train.data import Collate, PostDataset, make_loader
from mner.train.loop import build_optimizer, train_step
from mner.train.model import MNERModel
from mner.train.text import load_tokenizer, resolve_text_encoder

TARGET_OVERHEAD = 1.25  # issue "Stage two" section 6: cached step <= 1.25 x text-only step
POSTS_PER_EPOCH = 64  # the demo's train posts are repeated up to this many per epoch
RESULT_PREFIX = "RESULT "  # a worker's last stdout line: RESULT {json}


# ------------------------------------------------------------------------------------------ set-up


def make_data(work: Path, images: int, device: str, full: bool) -> dict:
    """The demo data folder, a tiny-preset cache and (if `full`) a ViT-B/32 + R50-FPN cache of it."""
    data = build_demo(
        DemoConfig(out_dir=str(work / "data"), n_train=images, n_valid=1, n_test=1, image_size=500)
    )
    common = {
        "data": DataConfig(data_dir=str(data)),
        "splits": ("train",),
        "num_workers": 0,
        "device": device,
    }
    caches = {"tiny": ExtractConfig(out=str(work / "cache-tiny"), **common)}
    if full:
        clip_dir, ckpt = make_full_models(work)
        # A random R50-FPN scores every class near 1/91: threshold 0 keeps the usual top-20 region work.
        caches["full"] = ExtractConfig(
            out=str(work / "cache-full"),
            clip=clip_dir,
            detector="fasterrcnn_resnet50_fpn",
            detector_ckpt=ckpt,
            score_thr=0.0,
            batch_size=8,
            **common,
        )
    for name, cfg in caches.items():
        start = time.perf_counter()
        extract_features(cfg)
        print(f"built the {name} cache of {images} images in {time.perf_counter() - start:.1f} s", flush=True)
    return {"data_dir": str(data), "caches": {name: cfg.out for name, cfg in caches.items()}}


def epoch_split(source: DataSource) -> Split:
    """The train split with its posts repeated up to POSTS_PER_EPOCH (the loader reshuffles every epoch)."""
    split = source.read("train")
    repeat = max(1, math.ceil(POSTS_PER_EPOCH / len(split.posts)))
    return dataclasses.replace(split, posts=split.posts * repeat)


# ---------------------------------------------------------------------------------------- end to end


class RecordReader:
    """The records stage one's batch encoder just made, read as `train.data.PostDataset` reads a cache."""

    def __init__(self, records: list[Record], spec: TokenSpec):
        self.records = {record.key: record for record in records}
        self.spec = spec
        self.cache_dir = "(records computed this step)"

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def get(self, key: str) -> Record:
        return self.records[key]


class PostImages:
    """DataLoader collate_fn of the e2e mode: a batch of posts plus their images decoded and preprocessed
    by stage one's own dataset and collate (extract.run), in loader workers when num_workers > 0."""

    def __init__(self, source: DataSource, preprocess, detector_transform, keep_original: bool):
        self.source = source  # resolves image keys to files
        self.preprocess = preprocess  # the encoder's image_preprocess: [PIL image] -> (1, 3, S, S)
        self.detector_transform = detector_transform  # the detector's GeneralizedRCNNTransform (eval)
        self.keep_original = keep_original  # clip-crop region features crop the original pixels

    def __call__(self, posts: list[Post]) -> tuple[list[Post], dict]:
        images = _Images(
            [(post.key, self.source.image_path(post.key)) for post in posts],
            self.preprocess,
            self.detector_transform,
            self.keep_original,
        )
        return posts, _collate([images[i] for i in range(len(images))])


# ------------------------------------------------------------------------------------------ worker


class ModeRun:
    """One mode's model, optimiser and batch stream in a worker process; `step()` times one training step."""

    def __init__(self, mode: str, cache_dir: str | None, job: dict, runtime):
        """
        Args:
            mode: "text", "cached" or "e2e".
            cache_dir: the stage-one cache ("cached" reads its tokens, "e2e" its extractor settings).
            job: encoder, data_dir, batch_size, warmup, steps, num_workers, seed (see run_worker).
            runtime: mner.runtime.Runtime (device and autocast).
        """
        self.runtime = runtime
        source = resolve_data(job["data_dir"])
        split = epoch_split(source)
        labels = label_names(split)
        encoder_dir = resolve_text_encoder(job["encoder"])
        tokenizer = load_tokenizer(encoder_dir)
        model_cfg = ModelConfig(text_encoder=job["encoder"], text_only=mode == "text")
        self.train_cfg = TrainConfig(
            batch_size=job["batch_size"], seed=job["seed"], num_workers=job["num_workers"]
        )
        self.extractors = self.reference = None
        self.collate = Collate(tokenizer, labels, model_cfg.max_length, with_visual=True)
        if mode == "e2e":
            manifest = read_manifest(cache_dir)
            recorded = manifest["config"]
            cfg = ExtractConfig.from_dict({k: v for k, v in recorded.items() if k != "fingerprint_parts"})
            clip = load_clip(cfg.clip, runtime.device)
            detector = build_detector(cfg.detector, cfg.detector_ckpt, cfg).to(runtime.device)
            self.spec = token_spec(clip, detector, cfg)
            assert self.spec == TokenSpec.from_dict(manifest["spec"]), (
                "e2e extractors differ from the cache's"
            )
            num_classes = len(detector.info["categories"])
            self.extractors = (clip, detector, self.spec, cfg)
            # The first e2e batch is checked against the cache (fp32 only: the cache was made without amp).
            self.reference = CacheReader(cache_dir) if runtime.amp_dtype is None else None
            collate = PostImages(
                source, clip.image_preprocess, detector.transform, cfg.region_features == "clip-crop"
            )
            # The same batching and shuffling as make_loader; the posts' tokens are collated once extracted.
            loader = DataLoader(
                split.posts,
                batch_size=self.train_cfg.batch_size,
                shuffle=True,
                num_workers=self.train_cfg.num_workers,
                collate_fn=collate,
                generator=torch.Generator().manual_seed(self.train_cfg.seed),
                persistent_workers=self.train_cfg.num_workers > 0,
            )
        else:
            reader = CacheReader(cache_dir) if mode == "cached" else None
            self.spec = reader.spec if reader is not None else None
            num_classes = len(reader.models["detector"]["categories"]) if reader is not None else 91
            loader = make_loader(split, reader, tokenizer, labels, model_cfg, self.train_cfg, shuffle=True)
        self.batches = _forever(loader)
        torch.manual_seed(job["seed"])  # every mode starts from the same weights where they share modules
        self.model = MNERModel(model_cfg, labels, self.spec, encoder_dir, num_classes).to(runtime.device)
        self.model.train()
        self.optimizer, self.scheduler, self.scaler = build_optimizer(
            self.model, self.train_cfg, job["warmup"] + job["steps"], runtime
        )
        self.times = {"step": [], "data": [], "extract": [], "train": []}

    def step(self) -> None:
        """One `train.loop.train_step`, with the loader fetch and (e2e) the extractors before it.

        e2e: stage one's batch encoder (extract.run._encode_batch) turns the batch's images into records,
        which the training collate then batches as it batches cached records.
        """
        runtime = self.runtime
        start = time.perf_counter()
        batch = next(self.batches)
        fetched = time.perf_counter()
        posts = None
        if self.extractors is not None:
            posts, images = batch
            clip, detector, spec, cfg = self.extractors
            with runtime.autocast():
                records = _encode_batch(images, clip, detector, spec, cfg, runtime.device)
            dataset = PostDataset(posts, RecordReader(records, spec))
            batch = self.collate([dataset[i] for i in range(len(dataset))])
            self._sync()
        extracted = time.perf_counter()
        # train_step reads the loss (.item()), which waits for the step to finish.
        train_step(
            self.model,
            batch,
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.train_cfg.max_grad_norm,
            runtime,
        )
        self._sync()
        done = time.perf_counter()
        for name, seconds in (
            ("step", done - start),
            ("data", fetched - start),
            ("extract", extracted - fetched),
            ("train", done - extracted),
        ):
            self.times[name].append(seconds)
        if self.reference is not None:
            self._check_against_cache(posts, batch)
            self.reference = None

    def _check_against_cache(self, posts: list[Post], batch: dict) -> None:
        """The e2e tokens of a batch equal the cached ones up to float16 rounding: the same extractors.

        Only the CLIP tokens are compared; region features depend on how a detector batch is padded.
        """
        for row, key in enumerate(post.key for post in posts):
            record = self.reference.get(key)
            assert bool(batch["image_mask"][row]) == (record.status == "ok"), f"{key}: image status differs"
            for name in ("patch_tokens", "global_embed"):
                cached = torch.from_numpy(getattr(record, name)).float()
                computed = batch[name][row].float().cpu()
                assert torch.allclose(computed, cached, rtol=1e-2, atol=1e-2), f"{key}: e2e {name} != cache"

    def summary(self, warmup: int) -> dict:
        """Median and mean step time and mean phase times over the steps after `warmup`."""
        timed = {name: values[warmup:] for name, values in self.times.items()}
        return {
            "step_median_s": statistics.median(timed["step"]),
            "step_mean_s": statistics.fmean(timed["step"]),
            **{f"{name}_mean_s": statistics.fmean(timed[name]) for name in ("data", "extract", "train")},
            "spec": self.spec.to_dict() if self.spec is not None else None,
        }

    def _sync(self) -> None:
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize(self.runtime.device)


def run_worker(job: dict) -> dict:
    """Time `warmup + steps` training steps of each of job["modes"] in this (fresh) process.

    The modes take turns step by step (the first to go rotates), so a slow spell of a shared machine
    hits them alike and their ratio stays fair. job: modes [{"mode", "cache_dir"}], encoder, data_dir,
    batch_size, warmup, steps, device, amp, num_workers, seed, threads (None: torch's default).
    """
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    setup = time.perf_counter()
    runtime = resolve_runtime(job["device"], job["amp"])
    seed_everything(job["seed"])  # as train_from_cache does, deterministic kernels included
    runs = [ModeRun(m["mode"], m["cache_dir"], job, runtime) for m in job["modes"]]
    setup = time.perf_counter() - setup
    for i in range(job["warmup"] + job["steps"]):
        for run in runs[i % len(runs) :] + runs[: i % len(runs)]:
            run.step()
    return {
        "threads": torch.get_num_threads(),
        "setup_s": setup,
        "modes": [{**m, **run.summary(job["warmup"])} for m, run in zip(job["modes"], runs)],
        "peak_rss_mib": peak_rss_mib(),
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if runtime.device.type == "cuda" else None,
    }


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB.

    Linux's VmHWM belongs to the process's own address space, which exec starts afresh; ru_maxrss would
    also count the parent's resident memory at fork (the benchmark's parent holds the extractors).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def _forever(loader):
    """Batches of `loader`, epoch after epoch."""
    while True:
        yield from loader


def run_job(job: dict) -> dict:
    """Run a worker in a fresh Python process (so its peak memory is its own) and return its result."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        names = ", ".join(m["mode"] for m in job["modes"])
        raise RuntimeError(f"worker for {names} ({job['encoder']}) failed with exit code {proc.returncode}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


# ------------------------------------------------------------------------------------------- report


def _describe(spec: dict) -> str:
    """ "P=50 Dp=768 Dg=512 K=20 Dr=1024" for a TokenSpec dict."""
    names = {
        "P": "num_patches",
        "Dp": "patch_dim",
        "Dg": "global_dim",
        "K": "max_regions",
        "Dr": "region_dim",
    }
    return " ".join(f"{short}={spec[name]}" for short, name in names.items())


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'mode':6s} {'encoder':9s} {'tokens':6s} {'batch':>5s} {'steps':>5s} {'run':5s} | {'median':>8s} "
        f"{'mean':>8s} | {'data':>7s} {'extract':>8s} {'train':>7s} | {'peak RSS':>9s} {'CUDA peak':>9s}"
    )
    print("\nper-step seconds (data: loader fetch, decoding included; extract: frozen extractors;")
    print(
        "train: forward + backward + optimiser step; run: turns = took turns in one process, alone = own process)"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        cuda = f"{r['cuda_peak_mib']:7.0f} M" if r["cuda_peak_mib"] is not None else "-"
        print(
            f"{r['mode']:6s} {r['encoder']:9s} {r['tokens']:6s} {r['batch_size']:5d} {r['steps']:5d} "
            f"{'turns' if r['paired'] else 'alone':5s} | {r['step_median_s']:8.3f} {r['step_mean_s']:8.3f} | "
            f"{r['data_mean_s']:7.3f} {r['extract_mean_s']:8.3f} {r['train_mean_s']:7.3f} | "
            f"{r['peak_rss_mib']:7.0f} M {cuda:>9s}"
        )


def print_ratios(rows: list[dict]) -> None:
    def partner(row: dict, mode: str, tokens: str) -> dict | None:
        """The row of `mode` measured alongside `row` (same encoder, batch and way of running)."""
        run = ("encoder", "batch_size", "paired")
        for r in rows:
            if all(r[k] == row[k] for k in run) and (r["mode"], r["tokens"]) == (mode, tokens):
                return r
        return None

    print(f"\n(a) cache overhead = cached / text-only median step time (target <= {TARGET_OVERHEAD})")
    for r in rows:
        text = partner(r, "text", "-")
        if r["mode"] == "cached" and text is not None:
            ratio = r["step_median_s"] / text["step_median_s"]
            verdict = "ok" if ratio <= TARGET_OVERHEAD else "ABOVE TARGET"
            # The loader's share separates reading the cache from the visual modules' compute.
            reading = (r["data_mean_s"] - text["data_mean_s"]) * 1000
            print(
                f"    {r['encoder']:9s} {r['tokens']:4s} tokens ({_describe(r['spec'])}), batch {r['batch_size']}: "
                f"{ratio:.3f}  {verdict}  (loader {reading:+.1f} ms/step vs text-only)"
            )
    print("\n(b) speed-up over end to end = e2e / cached median step time")
    for r in rows:
        cached = partner(r, "cached", r["tokens"])
        if r["mode"] == "e2e" and cached is not None:
            print(
                f"    {r['encoder']:9s} {r['tokens']:4s} extractors, batch {r['batch_size']}: "
                f"{r['step_median_s'] / cached['step_median_s']:.1f}x  (e2e {r['step_median_s']:.3f} s = "
                f"decode + preprocess {r['data_mean_s']:.3f} + extractors {r['extract_mean_s']:.3f} + "
                f"train {r['train_mean_s']:.3f} (means); cached {cached['step_median_s']:.3f} s)"
            )
    print(
        "\n(c) peak memory = peak RSS (VmHWM) of each mode alone in a fresh process (and torch.cuda.max_memory_allocated)"
    )
    for r in rows:
        cached = partner(r, "cached", r["tokens"])
        if r["mode"] == "e2e" and cached is not None:
            cuda = ""
            if r["cuda_peak_mib"] is not None:
                cuda = f"; CUDA cached {cached['cuda_peak_mib']:.0f} MiB, e2e {r['cuda_peak_mib']:.0f} MiB"
            print(
                f"    {r['encoder']:9s} {r['tokens']:4s} batch {r['batch_size']}: RSS cached "
                f"{cached['peak_rss_mib']:.0f} MiB, e2e {r['peak_rss_mib']:.0f} MiB "
                f"({r['peak_rss_mib'] / cached['peak_rss_mib']:.2f}x){cuda}"
            )


# --------------------------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument(
        "--amp", choices=("off", "bf16", "fp16"), default="off", help="autocast dtype on CUDA (default off)"
    )
    parser.add_argument(
        "--encoder",
        nargs="+",
        default=["minilm"],
        help="text encoders to measure (default minilm; e.g. tiny-bert)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="posts per step (default 16)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps (default 5)")
    parser.add_argument(
        "--full",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure full-size ViT-B/32 + R50-FPN tokens and extractors (default on)",
    )
    parser.add_argument(
        "--full-batch-size", type=int, default=8, help="batch of the full-size e2e comparison (default 8)"
    )
    parser.add_argument(
        "--full-steps", type=int, default=2, help="timed steps of the full-size e2e comparison (default 2)"
    )
    parser.add_argument(
        "--full-warmup", type=int, default=1, help="warm-up steps of the full-size e2e comparison (default 1)"
    )
    parser.add_argument(
        "--images", type=int, default=8, help="demo images (= train posts) generated (default 8)"
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="DataLoader workers, every mode (default 0; their memory is not in the peak RSS)",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per process (default: torch's)"
    )
    parser.add_argument(
        "--memory-steps", type=int, default=2, help="steps of each interleaved mode's memory run (default 2)"
    )
    # Internal: the parent runs each job as `--worker JSON`, which prints RESULT {json}.
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is None:
        cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
        if args.amp != "off" and not cuda:
            parser.error("--amp needs --device cuda (the training loop autocasts on CUDA only)")
        counts = (
            args.batch_size,
            args.steps,
            args.full_batch_size,
            args.full_steps,
            args.memory_steps,
            args.threads or 1,
        )
        if min(counts) < 1:
            parser.error("--batch-size, --steps, --full-*, --memory-steps and --threads must be >= 1")
        if min(args.warmup, args.full_warmup, args.num_workers) < 0:
            parser.error("--warmup, --full-warmup and --num-workers must be >= 0")
        if args.images < 4:
            parser.error("--images must be >= 4 (the demo puts every entity type in train)")
    return args


def measure(encoder: str, made: dict, args: argparse.Namespace) -> list[dict]:
    """Rows (mode, tokens, batch, timing, memory) for one text encoder; see the module docstring."""
    base = {
        "encoder": encoder,
        "data_dir": made["data_dir"],
        "device": args.device,
        "amp": args.amp,
        "num_workers": args.num_workers,
        "seed": args.seed,
        "threads": args.threads,
    }
    caches = made["caches"]
    main_run = {"batch_size": args.batch_size, "warmup": args.warmup, "steps": args.steps}
    paired = [{"mode": "text", "tokens": "-", "cache_dir": None}]
    paired += [
        {"mode": "cached", "tokens": tokens, "cache_dir": cache_dir} for tokens, cache_dir in caches.items()
    ]
    paired += [{"mode": "e2e", "tokens": "tiny", "cache_dir": caches["tiny"]}]

    def report(result: dict, what: str) -> None:
        print(
            f"  {encoder}: {what} done ({result['threads']} torch threads, set-up {result['setup_s']:.1f} s, "
            f"peak RSS {result['peak_rss_mib']:.0f} MiB)",
            flush=True,
        )

    # Timing: the modes take turns in one process. Memory: each mode alone in a fresh process.
    timed = run_job({**base, **main_run, "modes": paired})
    report(timed, f"{len(paired)} modes interleaved, batch {args.batch_size}, {args.steps} steps")
    rows = []
    for mode in timed["modes"]:
        alone = run_job({**base, **main_run, "warmup": 0, "steps": args.memory_steps, "modes": [mode]})
        report(alone, f"{mode['mode']} {mode['tokens']} alone for memory")
        rows.append(_row(mode, alone, encoder, main_run, paired=True))
    if args.full:
        # Full-size extractors on a CPU take minutes per step: each mode runs once, alone, giving its
        # time and memory; the ratio is far from 1, so not interleaving costs it little.
        full_run = {"batch_size": args.full_batch_size, "warmup": args.full_warmup, "steps": args.full_steps}
        for mode in ("cached", "e2e"):
            result = run_job(
                {**base, **full_run, "modes": [{"mode": mode, "tokens": "full", "cache_dir": caches["full"]}]}
            )
            report(result, f"{mode} full alone, batch {args.full_batch_size}, {args.full_steps} steps")
            rows.append(_row(result["modes"][0], result, encoder, full_run, paired=False))
    return rows


def _row(mode: dict, memory: dict, encoder: str, run: dict, paired: bool) -> dict:
    return {
        **mode,
        "encoder": encoder,
        "batch_size": run["batch_size"],
        "steps": run["steps"],
        "paired": paired,
        "threads": memory["threads"],
        "peak_rss_mib": memory["peak_rss_mib"],
        "cuda_peak_mib": memory["cuda_peak_mib"],
    }


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.ERROR)
    transformers.utils.logging.disable_progress_bar()
    if args.worker is not None:
        print(RESULT_PREFIX + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return
    start = time.perf_counter()
    threads = args.threads or torch.get_num_threads()
    print(
        f"bench_train: torch {torch.__version__}, device {args.device}, amp {args.amp}, torch threads {threads} "
        f"({'--threads' if args.threads else 'torch default'}), {os.cpu_count()} CPUs visible",
        flush=True,
    )
    if args.device == "cpu":
        print(
            "note: on a CPU shared with other jobs step times are noisy; compare ratios, not seconds",
            flush=True,
        )
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        made = make_data(Path(tmp), args.images, args.device, args.full)
        rows = [row for encoder in args.encoder for row in measure(encoder, made, args)]
    print(
        f"\ndata: {args.images} demo images (500 px JPEGs), one train post each, repeated to >= {POSTS_PER_EPOCH} "
        f"posts per epoch; {args.num_workers} loader workers; peak RSS of each mode alone "
        f"({args.memory_steps} steps for the interleaved modes)"
    )
    print_table(rows)
    print_ratios(rows)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
