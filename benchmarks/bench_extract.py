"""Extraction efficiency: how close `extract_features` gets to the bare model forwards.

    efficiency = wall time of the model forwards alone on pre-decoded, pre-processed tensors
                 / wall time of extract_features on the same images (decode, preprocess, forwards,
                   HDF5 writes, manifest, model loading included)

A value near 1 means decoding and IO hide behind compute. Runs on generated 500x375 JPEGs with
(a) the tiny presets and (b) full-size random-init ViT-B/32 CLIP + Faster R-CNN R50-FPN (nothing is
downloaded). With --amp on CUDA it also compares fp32 with fp16 and bf16 autocast.

    python benchmarks/bench_extract.py                          # CPU, both model sizes
    python benchmarks/bench_extract.py --models full --images-full 32
    python benchmarks/bench_extract.py --device cuda --amp      # GPU: fp32 vs fp16 vs bf16
    python benchmarks/bench_extract.py --threads 1              # small shared CPU boxes
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.models import detection
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from mner.cache.datasets import DataConfig
from mner.extract.clip import load_clip
from mner.extract.config import ExtractConfig
from mner.extract.detector import build_detector
from mner.extract.images import load_image
from mner.extract.models import model_info
from mner.extract.run import extract_features
from mner.runtime import resolve_device

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def make_images(folder: Path, n: int, size=(500, 375)) -> Path:
    """n distinct photo-like JPEGs (smooth colour fields plus grain) and an IMGID train.txt."""
    images = folder / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    width, height = size
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize(size, Image.BILINEAR)
        grain = rng.normal(0, 12, (height, width, 3))
        pixels = np.clip(np.asarray(coarse, np.float64) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.jpg", quality=90)
    posts = [f"IMGID:{i}\nPhoto\tO\nof\tO\nParis\tB-LOC\n" for i in range(n)]
    (folder / "train.txt").write_text("\n".join(posts))
    return folder


def make_full_models(folder: Path) -> tuple[str, str]:
    """Random-init ViT-B/32 CLIP vision folder (hidden 768, patch 32, 224 px) and an R50-FPN checkpoint."""
    torch.manual_seed(0)
    clip_dir = folder / "clip-vit-b32-random"
    CLIPVisionModelWithProjection(CLIPVisionConfig(projection_dim=512)).save_pretrained(clip_dir)
    CLIPImageProcessor().save_pretrained(clip_dir)  # defaults: shortest edge 224, centre crop 224
    ckpt = folder / "fasterrcnn_resnet50_fpn-random.pt"
    model = detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    torch.save(model.state_dict(), ckpt)
    return str(clip_dir), str(ckpt)


def bare_forward_seconds(cfg: ExtractConfig, keys: list[str], image_dir: Path) -> float:
    """Wall time of the model forwards alone, same batches, inputs decoded and on the device beforehand."""
    device = resolve_device(cfg.device)
    clip = load_clip(cfg.clip, device)
    detector = build_detector(cfg.detector, cfg.detector_ckpt, cfg).to(device)
    batches = []
    for start in range(0, len(keys), cfg.batch_size):
        images = [load_image(image_dir / f"{key}.jpg").image for key in keys[start : start + cfg.batch_size]]
        pixels = [
            torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 for image in images
        ]  # (3, H, W)
        batches.append(
            (
                clip.preprocess(images).to(device),  # (B, 3, S, S)
                [detector.preprocess(p).to(device) for p in pixels],  # (3, h, w) each
                [(image.height, image.width) for image in images],
            )
        )
    amp = (
        torch.autocast(device.type, dtype=AMP_DTYPES[cfg.amp])
        if cfg.amp != "off"
        else contextlib.nullcontext()
    )

    def forward(batch):
        pixel_values, detector_inputs, sizes = batch
        clip.encode(pixel_values)
        detector.detect(detector_inputs, sizes)

    with amp:
        forward(batches[0])  # warm-up (kernel selection), not timed: the bare time is the ideal
        _sync(device)
        start = time.perf_counter()
        for batch in batches:
            forward(batch)
        _sync(device)
    return time.perf_counter() - start


def extract_seconds(cfg: ExtractConfig) -> tuple[float, float]:
    """(wall time of extract_features, of which model loading + weight hashing)."""
    device = resolve_device(cfg.device)
    start = time.perf_counter()
    model_info(load_clip(cfg.clip, device), build_detector(cfg.detector, cfg.detector_ckpt, cfg).to(device))
    setup = time.perf_counter() - start
    start = time.perf_counter()
    extract_features(cfg)
    return time.perf_counter() - start, setup


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(
    name: str, n: int, work: Path, args, clip: str, detector: str, ckpt: str | None, score_thr: float
) -> None:
    data = make_images(work / f"data-{name}", n)
    keys = [str(i) for i in sorted(range(n), key=str)]  # extraction order: keys sorted as strings
    amps = ["off", "fp16", "bf16"] if args.amp else ["off"]
    for amp in amps:
        cfg = ExtractConfig(
            data=DataConfig(data_dir=str(data)),
            out=str(work / f"cache-{name}-{amp}"),
            clip=clip,
            detector=detector,
            detector_ckpt=ckpt,
            score_thr=score_thr,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            device=args.device,
            amp=amp,
        )
        bare = bare_forward_seconds(cfg, keys, data / "images")
        total, setup = extract_seconds(cfg)
        print(
            f"{name:5s} amp={amp:4s} images={n:4d} batch={args.batch_size} workers={args.num_workers} | "
            f"bare forwards {n / bare:7.2f} img/s | extract_features {n / total:7.2f} img/s "
            f"(model load + hashing {setup:.1f} s of {total:.1f} s) | efficiency {bare / total:.3f} "
            f"| without model load {bare / max(total - setup, 1e-9):.3f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", choices=("tiny", "full", "both"), default="both")
    parser.add_argument(
        "--images-tiny", type=int, default=256, help="images for the tiny presets (default 256)"
    )
    parser.add_argument(
        "--images-full", type=int, default=16, help="images for ViT-B/32 + R50-FPN (default 16)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--amp", action="store_true", help="CUDA only: also time fp16 and bf16 autocast")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads of the main process (default: torch's)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        # On a small shared machine, OpenMP threads that spin at barriers while DataLoader workers (or
        # other jobs) hold the cores slow every op down; fewer threads can be faster.
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        work = Path(tmp)
        if args.models in ("tiny", "both"):
            # score_thr is forced to 0 for tiny-frcnn so it always returns its top-k regions.
            bench("tiny", args.images_tiny, work, args, "tiny-clip", "tiny-frcnn", None, 0.0)
        if args.models in ("full", "both"):
            clip_dir, ckpt = make_full_models(work)
            # A random R50-FPN scores every class near 1/91; threshold 0 keeps the usual top-20 region work.
            bench("full", args.images_full, work, args, clip_dir, "fasterrcnn_resnet50_fpn", ckpt, 0.0)


if __name__ == "__main__":
    main()
