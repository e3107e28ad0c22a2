"""Cache read speed and size: CacheReader vs naive h5py indexing, lazy vs in_memory.

    python benchmarks/bench_cache.py                      # 2000 tiny + 500 B/32-size records
    python benchmarks/bench_cache.py --n-tiny 20000 --n-b32 2000 --workdir /scratch/bench

Every number is measured in this run, in one process, reading full records in a random order.
The tokens are random normals cast to float16 and regions are zero-padded to K. Shards are
uncompressed: an earlier version of this benchmark measured gzip at 0.77-0.89x the size but 2.5-9x
slower lazy reads, missing both read targets (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from mner.cache.reader import CacheReader
from mner.cache.shards import (
    STATUS_NAMES,
    Record,
    ShardWriter,
    TokenSpec,
    compute_fingerprint,
    open_shard,
    read_manifest,
    shard_path,
    write_manifest,
)

# Required CacheReader lazy speed (records/s, one process, random order, full records).
TARGETS = {"tiny": 20_000, "b32": 3_000}
SPECS = {
    "tiny": TokenSpec(17, 32, 32, 8, 64, "bench", "bench", "frcnn_box_head"),
    # CLIP ViT-B/32 at 224px: 49 patches + CLS of width 768, 512-d projection; FRCNN box head 1024-d.
    "b32": TokenSpec(50, 768, 512, 20, 1024, "bench", "bench", "frcnn_box_head"),
}


def random_records(spec: TokenSpec, n: int, rng: np.random.Generator) -> list[Record]:
    """n ok records with 0..K regions (so padding is realistic)."""
    K = spec.max_regions
    records = []
    for i in range(n):
        count = int(rng.integers(0, K + 1))
        feats = np.zeros((K, spec.region_dim), np.float16)  # (K, Dr)
        feats[:count] = rng.standard_normal((count, spec.region_dim))
        labels = np.zeros(K, np.int32)
        labels[:count] = rng.integers(1, 91, count)
        scores = np.zeros(K, np.float32)
        scores[:count] = rng.uniform(0.05, 1, count)
        lo = rng.uniform(0, 0.5, (count, 2))
        boxes = np.zeros((K, 4), np.float32)  # (K, 4) xyxy
        boxes[:count] = np.concatenate([lo, lo + rng.uniform(0, 0.5, (count, 2))], axis=1)
        records.append(
            Record(
                key=f"{i:08d}",
                status="ok",
                width=640,
                height=480,
                num_regions=count,
                patch_tokens=rng.standard_normal((spec.num_patches, spec.patch_dim)).astype(np.float16),
                global_embed=rng.standard_normal(spec.global_dim).astype(np.float16),
                region_feats=feats,
                region_labels=labels,
                region_scores=scores,
                region_boxes=boxes,
            )
        )
    return records


def build_cache(cache_dir: Path, spec: TokenSpec, records: list[Record], shard_size: int) -> float:
    """Write a cache; returns records/s written."""
    cache_dir.mkdir(parents=True)
    config = {"bench": True}
    fingerprint = compute_fingerprint({"config": config, "spec": spec.to_dict()})
    start = time.perf_counter()
    files = []
    for index, first in enumerate(range(0, len(records), shard_size)):
        chunk = records[first : first + shard_size]
        attrs = {"fingerprint": fingerprint, "config_json": config, "shard_index": index}
        with ShardWriter(shard_path(cache_dir, index), spec, [r.key for r in chunk], attrs) as writer:
            for row, record in enumerate(chunk):
                writer.write(row, record)
            files.append(writer.commit())
    write_manifest(cache_dir, fingerprint, config, {}, spec, files, {})
    return len(records) / (time.perf_counter() - start)


def naive_reads(cache_dir: Path, order: list[str], cached_handles: bool) -> float:
    """Baseline: plain h5py indexing of each of the 9 datasets per record (records/s).

    cached_handles=False looks every dataset up by name per record (`f[name][row]`, the obvious
    code); True keeps the Dataset objects, so only h5py's per-read selection overhead remains.
    """
    manifest = read_manifest(cache_dir)
    files = {s["file"]: open_shard(cache_dir / s["file"]) for s in manifest["shards"]}
    where = {image["key"]: (image["shard"], image["row"]) for image in manifest["images"]}
    names = [name for name in next(iter(files.values())) if name != "keys"]
    handles = {shard: {name: f[name] for name in names} for shard, f in files.items()}
    start = time.perf_counter()
    for key in order:
        shard, row = where[key]
        source = handles[shard] if cached_handles else files[shard]
        values = {name: source[name][row] for name in names}
        Record(
            key=key,
            status=STATUS_NAMES[values["status"]],
            width=int(values["image_size"][0]),
            height=int(values["image_size"][1]),
            num_regions=int(values["num_regions"]),
            **{name: values[name] for name in names if name not in ("status", "image_size", "num_regions")},
        )
    rate = len(order) / (time.perf_counter() - start)
    for f in files.values():
        f.close()
    return rate


def reader_reads(cache_dir: Path, order: list[str], in_memory: bool) -> tuple[float, float]:
    """(records/s of get() in random order, seconds to construct + open)."""
    start = time.perf_counter()
    reader = CacheReader(cache_dir, in_memory=in_memory)
    reader.get(order[0])  # opens the first shard (lazy) so the loop times steady-state reads
    opened = time.perf_counter() - start
    start = time.perf_counter()
    for key in order:
        reader.get(key)
    rate = len(order) / (time.perf_counter() - start)
    reader.close()
    return rate, opened


def disk_bytes(cache_dir: Path) -> int:
    return sum(path.stat().st_size for path in cache_dir.iterdir())


def payload_bytes(spec: TokenSpec) -> int:
    """Bytes of one padded record as stored: fp16 tokens + int/float32 region metadata + status/size."""
    K = spec.max_regions
    tokens = 2 * (spec.num_patches * spec.patch_dim + spec.global_dim + K * spec.region_dim)
    return tokens + 4 * K + 4 * K + 16 * K + 1 + 8 + 4


def bench(name: str, n: int, workdir: Path, seed: int) -> None:
    spec = SPECS[name]
    rng = np.random.default_rng(seed)
    records = random_records(spec, n, rng)
    order = [r.key for r in records]
    rng.shuffle(order)
    shard_size = max(1, min(n, 1000 if name == "tiny" else 256))
    print(
        f"\n== {name}: N={n}, P={spec.num_patches}x{spec.patch_dim}, Dg={spec.global_dim}, "
        f"K={spec.max_regions}x{spec.region_dim}, shards of {shard_size} =="
    )
    payload = payload_bytes(spec)
    cache_dir = workdir / name
    write_rate = build_cache(cache_dir, spec, records, shard_size)
    size = disk_bytes(cache_dir)
    lazy, lazy_open = reader_reads(cache_dir, order, in_memory=False)
    ram, ram_open = reader_reads(cache_dir, order, in_memory=True)
    verdict = "meets" if lazy >= TARGETS[name] else "MISSES"
    print(
        f"write {write_rate:,.0f} rec/s; disk {size / n:,.0f} B/image "
        f"(raw padded payload {payload:,} B; ratio {size / n / payload:.3f})"
    )
    print(
        f"CacheReader lazy      {lazy:>10,.0f} rec/s  (construct + first open {lazy_open * 1e3:.1f} ms; "
        f"{verdict} the {TARGETS[name]:,} target)"
    )
    print(f"CacheReader in_memory {ram:>10,.0f} rec/s  (construct + load {ram_open * 1e3:.1f} ms)")
    for cached, what in ((False, "h5py f[name][row]     "), (True, "h5py cached dset[row] ")):
        naive = naive_reads(cache_dir, order, cached_handles=cached)
        print(
            f"baseline {what}{naive:>10,.0f} rec/s  -> lazy is {lazy / naive:.1f}x, "
            f"in_memory {ram / naive:.1f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-tiny", type=int, default=2000, help="records in the tiny cache (default 2000)")
    parser.add_argument("--n-b32", type=int, default=500, help="records in the B/32-size cache (default 500)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to write the caches (default: a temp dir)"
    )
    parser.add_argument("--seed", type=int, default=0, help="RNG seed of the random records (default 0)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_cache_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.n_tiny > 0:
            bench("tiny", args.n_tiny, workdir, args.seed)
        if args.n_b32 > 0:
            bench("b32", args.n_b32, workdir, args.seed)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
