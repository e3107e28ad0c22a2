"""Cache read speed and size: CacheReader vs naive h5py indexing, lazy vs in_memory; and the cost
of checking shard integrity before use and of an image content hash.

    python benchmarks/bench_cache.py                      # 60 demo-size, 2000 tiny, 500 B/32-size records
    python benchmarks/bench_cache.py --n-tiny 20000 --n-b32 2000 --workdir /scratch/bench

Every number is measured in this run, in one process, reading full records in a random order.
The tokens are random normals cast to float16 and regions are zero-padded to K. Shards are
uncompressed: an earlier version of this benchmark measured gzip at 0.77-0.89x the size but 2.5-9x
slower lazy reads, missing both read targets (benchmarks/README.md).

Integrity: CacheReader checks each shard's sha256 against the manifest on its first open in a
process; cache/checksums.py remembers the result per file stat in checksums.json. "open" below is a
CacheReader constructed and every shard opened (one get() each): the first time, with no memo (every
shard read in full), with the memo (a stat per shard), and with the check skipped (the plain open the
ratios divide by). The files were just written, so the hashing reads from the page cache; a cold
disk reads at its own speed. The image lines price what a re-run pays per image to notice changed
files: a stat (size + mtime, the default) against a sha256 of the file's bytes (not done).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from mner.cache.checksums import MEMO_NAME, file_sha256
from mner.cache.fingerprint import compute_fingerprint
from mner.cache.manifest import read_manifest, write_manifest
from mner.cache.reader import CacheReader
from mner.cache.shards import ShardWriter, open_shard, shard_path
from mner.cache.spec import STATUS_NAMES, Record, TokenSpec

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


def open_every_shard(cache_dir: Path, check: bool = True) -> float:
    """Seconds to construct a CacheReader and open each shard once (one get() per shard)."""
    firsts = {}
    for image in read_manifest(cache_dir)["images"]:
        firsts.setdefault(image["shard"], image["key"])
    checker = CacheReader._check_sha256
    if not check:
        CacheReader._check_sha256 = lambda self, shard, path: None  # the plain open, for the ratio only
    try:
        start = time.perf_counter()
        reader = CacheReader(cache_dir)
        for key in firsts.values():
            reader.get(key)
        seconds = time.perf_counter() - start
    finally:
        CacheReader._check_sha256 = checker
    reader.close()
    return seconds


def integrity_costs(cache_dir: Path, built_at: float, repeats: int = 5) -> tuple[float, float, float]:
    """(first open with no memo, open with the memo, plain open without the check), in seconds."""
    # The memo keeps a hash only for files whose timestamps are 2 s old (cache/checksums.py _RACY_NS).
    time.sleep(max(0.0, built_at + 2.1 - time.time()))
    (cache_dir / MEMO_NAME).unlink(missing_ok=True)
    first = open_every_shard(cache_dir)
    hit = statistics.median(open_every_shard(cache_dir) for _ in range(repeats))
    plain = statistics.median(open_every_shard(cache_dir, check=False) for _ in range(repeats))
    return first, hit, plain


def print_integrity(cache_dir: Path, built_at: float) -> None:
    first, hit, plain = integrity_costs(cache_dir, built_at)
    shards = sum(1 for _ in cache_dir.glob("shard-*.h5"))
    size = sum(path.stat().st_size for path in cache_dir.glob("shard-*.h5"))
    print(
        f"open {shards} shard(s), {size / 2**20:,.1f} MiB: first (sha256 of every shard) {first * 1e3:,.1f} ms "
        f"= {first / plain:.1f}x plain ({size / 2**20 / first:,.0f} MiB/s); memo hit {hit * 1e3:,.2f} ms "
        f"= {hit / plain:.2f}x plain; plain {plain * 1e3:,.2f} ms"
    )


def image_hash_costs(workdir: Path, n: int, size: int, seed: int) -> None:
    """Per image: a stat (what extraction records and a re-run compares) vs a sha256 of the bytes."""
    folder = workdir / "images"
    folder.mkdir()
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        path.write_bytes(rng.bytes(size))
        paths.append(path)
    start = time.perf_counter()
    for path in paths:
        os.stat(path)
    stat = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for path in paths:
        file_sha256(path)
    digest = (time.perf_counter() - start) / n
    print(
        f"\n== images: {n} files of {size:,} B (page cache warm) ==\n"
        f"per image: stat (size + mtime, recorded by default) {stat * 1e6:,.1f} us; "
        f"sha256 of the content {digest * 1e6:,.1f} us = {digest / stat:,.0f}x "
        f"({size / digest / 2**20:,.0f} MiB/s); 100,000 images: {stat * 1e5:,.2f} s vs {digest * 1e5:,.1f} s"
    )


def bench_demo(n: int, workdir: Path, seed: int) -> None:
    """A cache the size of the demo's (tiny tokens, shards of 512): only the integrity costs."""
    spec = SPECS["tiny"]
    records = random_records(spec, n, np.random.default_rng(seed))
    print(f"\n== demo-size: N={n}, tiny tokens, shards of 512 ==")
    cache_dir = workdir / "demo"
    build_cache(cache_dir, spec, records, 512)
    print_integrity(cache_dir, time.time())


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
    built_at = time.time()
    size = disk_bytes(cache_dir)
    print_integrity(cache_dir, built_at)  # leaves the memo written, so the reads below are memo hits
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
    parser.add_argument("--n-demo", type=int, default=60, help="records in the demo-size cache (default 60)")
    parser.add_argument("--n-tiny", type=int, default=2000, help="records in the tiny cache (default 2000)")
    parser.add_argument("--n-b32", type=int, default=500, help="records in the B/32-size cache (default 500)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to write the caches (default: a temp dir)"
    )
    parser.add_argument(
        "--n-images", type=int, default=500, help="image files the content hash is priced on (default 500)"
    )
    parser.add_argument(
        "--image-bytes",
        type=int,
        default=60_000,
        help="size of each image file (default 60000, a tweet JPEG)",
    )
    parser.add_argument("--seed", type=int, default=0, help="RNG seed of the random records (default 0)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_cache_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.n_demo > 0:
            bench_demo(args.n_demo, workdir, args.seed)
        if args.n_tiny > 0:
            bench("tiny", args.n_tiny, workdir, args.seed)
        if args.n_b32 > 0:
            bench("b32", args.n_b32, workdir, args.seed)
        if args.n_images > 0:
            image_hash_costs(workdir, args.n_images, args.image_bytes, args.seed)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
