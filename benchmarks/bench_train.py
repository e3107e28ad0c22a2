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

`--model NAME [NAME ...]` (or `--model all`, issue 11 section 5) measures the model zoo instead of the
three modes: one table, one row per model and text encoder, with

    ms/step          median training step (loader fetch + train_step) after the warm-up
    x bert-crf       that step / bert-crf's with the same encoder, timed in the same process (bert-crf
                     always runs as the reference)
    peak RSS         the model alone in a fresh process, reading the cache lazily
    loader share     time waiting for the next batch / step time, summed over the timed steps (<= 5 %)
    lazy / RAM       median step reading the cache lazily (CacheReader) / with every token already in RAM
                     (CacheReader(in_memory=True), what train.cache_in_memory does) (<= 1.05; text-only
                     models never read the cache: -)

Every model takes its turn with both readers step by step in one worker process, so a slow spell of a
shared machine hits them alike (`--process-per-model`: each model with its own bert-crf in its own
process, for an encoder whose zoo does not fit in memory at once). `--encoder bert-base-random` is a
BERT-base-size encoder (12 layers x 768, seeded random weights, MiniLM's tokenizer) written to the
temporary folder; nothing is downloaded.

    python benchmarks/bench_train.py --model all --encoder minilm --threads 1
    python benchmarks/bench_train.py --model all --encoder bert-base-random --process-per-model --threads 1
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

from mner.cache.conll import Post, Split, label_names
from mner.cache.datasets import DataConfig, DataSource, resolve_data
from mner.cache.manifest import read_manifest
from mner.cache.reader import CacheReader
from mner.cache.spec import Record, TokenSpec
from mner.demo.build import DemoConfig, build_demo
from mner.extract.batches import Images, collate, encode_batch
from mner.extract.clip import load_clip
from mner.extract.config import ExtractConfig
from mner.extract.detector import build_detector
from mner.extract.run import extract_features, token_spec
from mner.runtime import resolve_runtime, seed_everything
from mner.train.engine.config import ModelConfig, TrainConfig, model_names
from mner.train.engine.config_files import load_run_config
from mner.train.engine.data import Collate, PostDataset, make_loader
from mner.train.engine.loop import build_optimizer, train_step
from mner.train.engine.runs import vision_blocks_of
from mner.train.zoo.model import MNERModel
from mner.train.zoo.text import load_tokenizer, minilm_dir, resolve_text_encoder

TARGET_OVERHEAD = 1.25  # issue "Stage two" section 6: cached step <= 1.25 x text-only step
POSTS_PER_EPOCH = 64  # the demo's train posts are repeated up to this many per epoch
RESULT_PREFIX = "RESULT "  # a worker's last stdout line: RESULT {json}
ZOO_REFERENCE = "bert-crf"  # every --model step time is divided by this model's, same encoder, same run
TARGET_LOADER_SHARE = 0.05  # issue 11 section 5: waiting for the next batch <= 5 % of a step
TARGET_LAZY_RATIO = 1.05  # issue 11 section 5: a lazy-cache step <= 1.05 x a step with the tokens in RAM
# --encoder bert-base-random: BERT-base's shape (110M parameters with MiniLM's 30,522-word vocabulary).
BERT_BASE = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
}
BERT_BASE_SEED = 0
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ------------------------------------------------------------------------------------------ set-up


def make_data(work: Path, images: int, device: str, full: bool, vision_blocks: int = 0) -> dict:
    """The demo data folder, a tiny-preset cache and (if `full`) a ViT-B/32 + R50-FPN cache of it;
    `vision_blocks`: the caches store the state before the vision model's last K blocks (the most a
    measured model trains: MANGO's 2)."""
    data = build_demo(
        DemoConfig(out_dir=str(work / "data"), n_train=images, n_valid=1, n_test=1, image_size=500)
    )
    common = {
        "data": DataConfig(data_dir=str(data)),
        "splits": ("train",),
        "num_workers": 0,
        "device": device,
        "vision_trainable_blocks": vision_blocks,
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


def make_bert_base(work: Path) -> Path:
    """A BERT-base-size text encoder folder (seeded random weights, MiniLM's tokenizer) under `work`."""
    folder = work / "bert-base-random"
    folder.mkdir()
    source = minilm_dir()
    for name in _TOKENIZER_FILES:
        (folder / name).write_bytes((source / name).read_bytes())
    vocab_size = sum(1 for _ in (source / "vocab.txt").open(encoding="utf-8"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BERT_BASE_SEED)
        transformers.BertModel(transformers.BertConfig(vocab_size=vocab_size, **BERT_BASE)).save_pretrained(
            folder
        )
    return folder


def encoder_path(name: str, work: Path) -> str:
    """What ModelConfig.text_encoder gets for an --encoder name: a preset or folder, or the made bert-base."""
    return str(make_bert_base(work)) if name == "bert-base-random" else name


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
    by stage one's own dataset and collate (extract.batches), in loader workers when num_workers > 0."""

    def __init__(self, source: DataSource, preprocess, detector_transform, keep_original: bool):
        self.source = source  # resolves image keys to files
        self.preprocess = preprocess  # the encoder's image_preprocess: [PIL image] -> (1, 3, S, S)
        self.detector_transform = detector_transform  # the detector's GeneralizedRCNNTransform (eval)
        self.keep_original = keep_original  # clip-crop region features crop the original pixels

    def __call__(self, posts: list[Post]) -> tuple[list[Post], dict]:
        images = Images(
            [(post.key, self.source.image_path(post.key)) for post in posts],
            self.preprocess,
            self.detector_transform,
            self.keep_original,
        )
        return posts, collate([images[i] for i in range(len(images))])


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
        self.batches = forever(loader)
        torch.manual_seed(job["seed"])  # every mode starts from the same weights where they share modules
        self.model = MNERModel(model_cfg, labels, self.spec, encoder_dir, num_classes).to(runtime.device)
        self.model.train()
        self.optimizer, self.scheduler, self.scaler = build_optimizer(
            self.model, self.train_cfg, job["warmup"] + job["steps"], runtime
        )
        self.times = {"step": [], "data": [], "extract": [], "train": []}

    def step(self) -> None:
        """One `train.loop.train_step`, with the loader fetch and (e2e) the extractors before it.

        e2e: stage one's batch encoder (extract.batches.encode_batch) turns the batch's images into records,
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
                records = encode_batch(images, clip, detector, spec, cfg, runtime.device)
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
    return _take_turns(runs, "modes", job["modes"], job, time.perf_counter() - setup, runtime)


def step_in_turns(runs: list, rounds: int) -> None:
    """`rounds` rounds of run.step() for every run, the first to go rotating each round, so that a slow
    spell of a shared machine hits them alike (also used by bench_classify.py)."""
    for i in range(rounds):
        for run in runs[i % len(runs) :] + runs[: i % len(runs)]:
            run.step()


def _take_turns(runs: list, key: str, entries: list[dict], job: dict, setup: float, runtime) -> dict:
    """Step `runs` in turns for job["warmup"] + job["steps"] rounds (the first to go rotates, so a slow
    spell of a shared machine hits them alike) and return the worker's result: each entry of `entries`
    under `key` with its run's summary, threads, set-up time and peak memory."""
    step_in_turns(runs, job["warmup"] + job["steps"])
    return {
        "threads": torch.get_num_threads(),
        "setup_s": setup,
        key: [{**entry, **run.summary(job["warmup"])} for entry, run in zip(entries, runs)],
        "peak_rss_mib": peak_rss_mib(),
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if runtime.device.type == "cuda" else None,
    }


class ModelRun:
    """One zoo model's training in a worker process, its tokens read lazily or from RAM; `step()` times
    one loader fetch + `train.loop.train_step`."""

    def __init__(self, model: str, store: str, cache_dir: str, job: dict, runtime):
        """
        Args:
            model: a configs/models name; its model and train settings come from `load_run_config`.
            store: "lazy" (CacheReader) or "ram" (CacheReader(in_memory=True)).
            cache_dir: the stage-one cache (text-only models never open it).
            job: encoder, data_dir, batch_size, warmup, steps, num_workers, seed (see run_zoo_worker).
            runtime: mner.runtime.Runtime (device and autocast).
        """
        self.runtime = runtime
        model_cfg, train_cfg = load_run_config(model=model)
        model_cfg = dataclasses.replace(model_cfg, text_encoder=job["encoder"])
        self.train_cfg = dataclasses.replace(
            train_cfg, batch_size=job["batch_size"], seed=job["seed"], num_workers=job["num_workers"]
        )
        split = epoch_split(resolve_data(job["data_dir"]))
        labels = label_names(split)
        encoder_dir = resolve_text_encoder(job["encoder"])
        tokenizer = load_tokenizer(encoder_dir)
        reader = None if model_cfg.text_only else CacheReader(cache_dir, in_memory=store == "ram")
        spec = reader.spec if reader is not None else None
        num_classes = len(reader.models["detector"]["categories"]) if reader is not None else 91
        loader = make_loader(split, reader, tokenizer, labels, model_cfg, self.train_cfg, shuffle=True)
        self.batches = forever(loader)
        # The vision blocks the model trains (MANGO's last 2), as a run builds them from its cache.
        blocks, weights = vision_blocks_of(model_cfg, reader, job["data_dir"]) or (None, None)
        torch.manual_seed(job["seed"])
        self.model = MNERModel(
            model_cfg, labels, spec, encoder_dir, num_classes, vision_blocks=blocks, vision_weights=weights
        ).to(runtime.device)
        self.model.train()
        self.model.epoch = 1  # as the loop sets it: the first epoch (MANGO's alignment warm-up)
        self.optimizer, self.scheduler, self.scaler = build_optimizer(
            self.model, self.train_cfg, job["warmup"] + job["steps"], runtime
        )
        self.text_only = model_cfg.text_only
        self.times = {"step": [], "data": []}

    def step(self) -> None:
        start = time.perf_counter()
        batch = next(self.batches)
        fetched = time.perf_counter()
        train_step(
            self.model,
            batch,
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.train_cfg.max_grad_norm,
            self.runtime,
        )
        if self.runtime.device.type == "cuda":
            torch.cuda.synchronize(self.runtime.device)
        done = time.perf_counter()
        self.times["step"].append(done - start)
        self.times["data"].append(fetched - start)

    def summary(self, warmup: int) -> dict:
        """Median step time and the loader's share of the steps after `warmup`."""
        step, data = self.times["step"][warmup:], self.times["data"][warmup:]
        return {
            "step_median_s": statistics.median(step),
            "data_mean_s": statistics.fmean(data),
            "loader_share": sum(data) / sum(step),
            "text_only": self.text_only,
        }


def run_zoo_worker(job: dict) -> dict:
    """Time `warmup + steps` steps of each of job["runs"] ({"model", "store"}) in this (fresh) process,
    taking turns step by step (the first to go rotates). job: runs, cache_dir, encoder, data_dir,
    batch_size, warmup, steps, device, amp, num_workers, seed, threads (None: torch's default)."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    setup = time.perf_counter()
    runtime = resolve_runtime(job["device"], job["amp"])
    seed_everything(job["seed"])
    runs = [ModelRun(r["model"], r["store"], job["cache_dir"], job, runtime) for r in job["runs"]]
    return _take_turns(runs, "runs", job["runs"], job, time.perf_counter() - setup, runtime)


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


def forever(loader):
    """Batches of `loader`, epoch after epoch (also used by bench_classify.py)."""
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
        names = ", ".join(f"{m['model']} {m['store']}" for m in job["runs"]) if "runs" in job else ""
        names = names or ", ".join(m["mode"] for m in job["modes"])
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


def zoo_rows(timed: dict, memory: dict[str, dict], encoder: str, tokens: str) -> list[dict]:
    """Table rows of one zoo timing run: each model's lazy step, its ratio to bert-crf's lazy step, its
    loader share, lazy / RAM (None for a text-only model, which has no RAM run) and peak RSS."""
    steps = {(r["model"], r["store"]): r for r in timed["runs"]}
    reference = steps[(ZOO_REFERENCE, "lazy")]["step_median_s"]
    rows = []
    for (model, store), run in steps.items():
        if store != "lazy":
            continue
        ram = steps.get((model, "ram"))
        rows.append(
            {
                "model": model,
                "encoder": encoder,
                "tokens": tokens,
                "step_median_s": run["step_median_s"],
                "ratio_to_reference": run["step_median_s"] / reference,
                "loader_share": run["loader_share"],
                "lazy_over_ram": run["step_median_s"] / ram["step_median_s"] if ram is not None else None,
                "peak_rss_mib": memory[model]["peak_rss_mib"],
            }
        )
    return rows


def zoo_table(rows: list[dict]) -> list[str]:
    """The --model table's lines: one row per model and encoder, a ✔/✘ column after each target."""
    header = (
        f"{'model':16s} {'encoder':16s} {'tokens':6s} | {'ms/step':>8s} {'x ' + ZOO_REFERENCE:>10s} | "
        f"{'peak RSS':>9s} | {'loader':>7s} {'<=5%':4s} | {'lazy/RAM':>8s} {'<=' + str(TARGET_LAZY_RATIO):7s}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        share_ok = "✔" if r["loader_share"] <= TARGET_LOADER_SHARE else "✘"
        if r["lazy_over_ram"] is None:
            lazy, lazy_ok = "-", "-"
        else:
            lazy, lazy_ok = (
                f"{r['lazy_over_ram']:.3f}",
                "✔" if r["lazy_over_ram"] <= TARGET_LAZY_RATIO else "✘",
            )
        lines.append(
            f"{r['model']:16s} {r['encoder']:16s} {r['tokens']:6s} | {r['step_median_s'] * 1000:8.1f} "
            f"{r['ratio_to_reference']:10.2f} | {r['peak_rss_mib']:7.0f} M | {r['loader_share'] * 100:6.1f}% "
            f"{share_ok:4s} | {lazy:>8s} {lazy_ok:7s}"
        )
    return lines


def measure_zoo(
    models: list[str], encoder: str, path: str, made: dict, args: argparse.Namespace
) -> list[dict]:
    """Zoo rows for one text encoder and each cache (see the module docstring): one interleaved timing
    run per cache, then each model alone in a fresh process for its peak RSS."""
    if ZOO_REFERENCE not in models:
        models = [ZOO_REFERENCE, *models]
    base = {
        "encoder": path,
        "data_dir": made["data_dir"],
        "device": args.device,
        "amp": args.amp,
        "num_workers": args.num_workers,
        "seed": args.seed,
        "threads": args.threads,
        "batch_size": args.batch_size,
    }

    def runs_of(model: str) -> list[dict]:
        text_only = load_run_config(model=model)[0].text_only
        return [{"model": model, "store": store} for store in (("lazy",) if text_only else ("lazy", "ram"))]

    # One process holds every model, or (--process-per-model, for encoders too large to hold the zoo in
    # memory at once) each model takes turns with its own bert-crf; bert-crf's row is from the first.
    if args.process_per_model:
        groups = [runs_of(ZOO_REFERENCE) + runs_of(model) for model in models if model != ZOO_REFERENCE]
        groups = groups or [runs_of(ZOO_REFERENCE)]
    else:
        groups = [[run for model in models for run in runs_of(model)]]
    rows = []
    for tokens, cache_dir in made["caches"].items():
        job = {**base, "cache_dir": cache_dir, "warmup": args.warmup, "steps": args.steps}
        memory = {}
        for model in models:
            memory[model] = run_job(
                {**job, "warmup": 0, "steps": args.memory_steps, "runs": [{"model": model, "store": "lazy"}]}
            )
            print(
                f"  {encoder} {tokens}: {model} alone, peak RSS {memory[model]['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
        done = set()
        for runs in groups:
            timed = run_job({**job, "runs": runs})
            print(
                f"  {encoder} {tokens}: {len(runs)} runs interleaved, {args.steps} steps "
                f"({timed['threads']} torch threads, set-up {timed['setup_s']:.1f} s)",
                flush=True,
            )
            new = [row for row in zoo_rows(timed, memory, encoder, tokens) if row["model"] not in done]
            done.update(row["model"] for row in new)
            rows += new
    order = {model: i for i, model in enumerate(models)}
    return sorted(rows, key=lambda row: (row["tokens"], order[row["model"]]))


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
        help="text encoders to measure (default minilm; e.g. tiny-bert, bert-base-random, a folder)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="posts per step (default 16)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps (default 5)")
    parser.add_argument(
        "--model",
        nargs="+",
        default=None,
        help="measure these zoo models (or 'all') instead of the text/cached/e2e modes; bert-crf always runs",
    )
    parser.add_argument(
        "--process-per-model",
        action="store_true",
        help="--model: time each model with its own bert-crf in its own process (for an encoder too large to "
        "hold every model of the zoo in memory at once, e.g. bert-base-random); default: all in one",
    )
    parser.add_argument(
        "--full",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure full-size ViT-B/32 + R50-FPN tokens (and extractors); default on, off with --model",
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
        if args.model is not None:
            names = model_names()
            args.model = list(names) if args.model == ["all"] else args.model
            unknown = [name for name in args.model if name not in names]
            if unknown:
                parser.error(f"--model: unknown {', '.join(unknown)}; the models are all, {', '.join(names)}")
        if args.full is None:
            args.full = args.model is None
    return args


def measure(encoder: str, path: str, made: dict, args: argparse.Namespace) -> list[dict]:
    """Rows (mode, tokens, batch, timing, memory) for one text encoder; see the module docstring."""
    base = {
        "encoder": path,
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
        job = json.loads(args.worker)
        result = run_zoo_worker(job) if "runs" in job else run_worker(job)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
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
        blocks = max(
            (load_run_config(model=name)[0].vision_trainable_blocks for name in args.model or ()), default=0
        )
        made = make_data(Path(tmp), args.images, args.device, args.full, blocks)
        encoders = {name: encoder_path(name, Path(tmp)) for name in args.encoder}
        if args.model is not None:
            rows = [
                row
                for name, path in encoders.items()
                for row in measure_zoo(args.model, name, path, made, args)
            ]
            print(
                f"\nmodel zoo, batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up "
                f"(medians), {threads} torch threads, device {args.device}"
                + (
                    " (a CPU shared with other jobs: compare ratios, not seconds)"
                    if args.device == "cpu"
                    else ""
                )
            )
            print(
                f"x {ZOO_REFERENCE}: step / {ZOO_REFERENCE}'s, same encoder, same process; peak RSS: alone, "
                f"lazy cache, {args.memory_steps} steps; loader: waiting for the next batch / step; lazy/RAM: "
                "CacheReader lazy / in_memory"
            )
            print("\n".join(zoo_table(rows)))
            print(f"\ntotal {time.perf_counter() - start:.0f} s")
            return
        rows = [row for name, path in encoders.items() for row in measure(name, path, made, args)]
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
