"""Frozen text layers: epoch time, dev F1, the text-state cache's one-time cost and size, per N.

Each run is `mner train-from-cache --model MODEL --set model.text_frozen_layers=N` on a tagging folder
(train + valid), every run in its own process, one after another, all sharing one text-state root, so
the first run of an N builds the cache for train and valid and every later one (other seed, other
model) reads it. Measured per run:

    epoch s      the mean of metrics.jsonl's `seconds` (the training epoch alone)
    x N=0        that / the same model's N = 0 epoch, same seeds, same run of this script
    dev F1       results.json's best-epoch valid micro F1, mean over the seeds
    build s      first run of an N: from its "computing the frozen text states of .../train.txt" log
                 line to its "train: frozen text states read from" line (train split only), and the same
                 for valid
    cache MiB    the text-state folders of that N on disk
    legal F1     a softmax-head model (mango, bert-softmax decode each word's argmax): its best model's
                 dev F1 decoded again with model.bio_constraints, the most probable BIO-legal path

A multimodal model needs a feature cache: the folder's images are extracted once with the untrained
demo-clip (MiniLM's shape, so IFAformer's towers pair with it), storing its embedding output (MANGO's
last 2 blocks and IFAformer's tower train from it), and tiny-frcnn. On the shared Twitter data every
image is missing, so the multimodal model trains as text alone in effect, and says so. Every run trains
all its epochs (train.patience = epochs, at least the default 3).

    python benchmarks/bench_text_states.py --data ../shared/data/twitter2017 --epochs 1 --seeds 1
    python benchmarks/bench_text_states.py --data ../shared/data/twitter2017 --models bert-crf afdvqf \\
        --frozen 0 2 4 5 --epochs 2 --seeds 1 2
    python benchmarks/bench_text_states.py --data ../shared/data/twitter2017 --models bert-crf \\
        bert-bilstm-crf bert-softmax afdvqf mango ifaformer --frozen 0 --epochs 10 --seeds 1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mner.train.engine.config_files import load_run_config


def run(command: list[str], env: dict) -> tuple[int, list[tuple[float, str]]]:
    """Run `command`, returning its exit code and every output line with the seconds it arrived at."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = [(time.perf_counter() - started, line.rstrip("\n")) for line in proc.stdout]
    return proc.wait(), lines


def between(lines: list[tuple[float, str]], first: str, then: str) -> float | None:
    starts = [t for t, line in lines if first in line]
    ends = [t for t, line in lines if then in line]
    return ends[0] - starts[0] if starts and ends else None


def legal_path_f1(run_dir: Path, data_dir: Path) -> float:
    """Dev micro F1 of a finished run's best model (a softmax head) decoded with BIO constraints."""
    from mner.cache.datasets import resolve_data
    from mner.cache.reader import CacheReader
    from mner.runtime import resolve_runtime
    from mner.train.engine.decode import decode_and_score
    from mner.train.engine.run_files import read_record, run_config
    from mner.train.engine.runs import load_run_model

    record = read_record(run_dir)
    cfg, runtime = run_config(record), resolve_runtime("cpu", "off")
    model, tokenizer = load_run_model(run_dir, record, runtime)
    model.head.constrained = True
    split = resolve_data(data_dir=data_dir).read("valid")
    reader = None if cfg.model.text_only else CacheReader(record["cache"]["dir"])
    _, scores = decode_and_score(model, split, reader, tokenizer, record["label_names"], cfg, runtime)
    return scores["micro"]["f1"]


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="a tagging folder with train.txt and valid.txt")
    parser.add_argument("--models", nargs="+", default=["bert-crf"])
    parser.add_argument("--frozen", nargs="+", type=int, default=[0, 2, 4, 5])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1])
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    mner = [sys.executable, "-m", "mner"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = {**os.environ, "MNER_TEXT_CACHE": str(work / "text-states")}
        data = work / "data"
        data.mkdir()
        for name in ("train.txt", "valid.txt"):  # no test split: the benchmark scores dev
            (data / name).write_bytes((Path(args.data) / name).read_bytes())
        cache = work / "cache"
        if any(model != "bert-crf" for model in args.models):
            rc, lines = run([*mner, "extract-features", "--data-dir", str(data), "--clip", "demo-clip",
                             "--detector", "tiny-frcnn", "--vision-trainable-blocks", "6", "--out", str(cache)],
                            env)  # fmt: skip
            if rc != 0:
                sys.exit("\n".join(line for _, line in lines[-20:]))
        rows = []
        for frozen in args.frozen:
            before = set((work / "text-states").glob("*")) if (work / "text-states").exists() else set()
            for model in args.models:
                epochs, f1s, legal, builds = [], [], [], {}
                softmax = load_run_config(model=model)[0].head == "softmax"
                for seed in args.seeds:
                    out = work / "runs" / f"{model}-{frozen}-{seed}"
                    source = ["--text-only"] if model == "bert-crf" else ["--cache", str(cache)]
                    command = [*mner, "train-from-cache", "--model", model, "--data-dir", str(data), *source,
                               "--epochs", str(args.epochs), "--seed", str(seed), "--threads", str(args.threads),
                               "--set", f"model.text_frozen_layers={frozen}", "--set", "train.device=cpu",
                               "--set", f"train.patience={max(3, args.epochs)}", "--out", str(out)]  # fmt: skip
                    rc, lines = run(command, env)
                    if rc != 0:
                        sys.exit(
                            f"{model} N={frozen} seed {seed} failed:\n" + "\n".join(x for _, x in lines[-20:])
                        )
                    for split in ("train", "valid"):
                        took = between(lines, f"computing the frozen text states of {data / split}.txt",
                                       f"{split}: frozen text states read from")  # fmt: skip
                        if took is not None:
                            builds[split] = took
                    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                    epochs.append(statistics.mean(m["seconds"] for m in metrics))
                    f1s.append(json.loads((out / "results.json").read_text())["valid"]["micro"]["f1"])
                    if softmax:
                        legal.append(legal_path_f1(out, data))
                rows.append(
                    {
                        "model": model,
                        "N": frozen,
                        "epoch": statistics.mean(epochs),
                        "f1": f1s,
                        "legal": legal,
                        "builds": builds,
                    }
                )
            after = set((work / "text-states").glob("*")) if (work / "text-states").exists() else set()
            rows[-1]["mib"] = sum(folder_mib(f) for f in after - before)
    base = {row["model"]: row["epoch"] for row in rows if row["N"] == 0}
    print(f"{args.data}: {args.epochs} epoch(s), seeds {args.seeds}, threads {args.threads or 'auto'}")
    print(
        "| model | N | epoch s | x N=0 | dev F1 (each seed) | mean | legal F1 | build s (train / valid) "
        "| cache MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['epoch'] / base[row['model']]:.2f}" if row["model"] in base else "-"
        each = " / ".join(f"{100 * f:.2f}" for f in row["f1"])
        build = " / ".join(f"{row['builds'][s]:.1f}" for s in ("train", "valid") if s in row["builds"]) or "-"
        mib = f"{row['mib']:.0f}" if row.get("mib") else "-"
        legal = f"{100 * statistics.mean(row['legal']):.2f}" if row["legal"] else "-"
        print(f"| {row['model']} | {row['N']} | {row['epoch']:.1f} | {ratio} | {each} | "
              f"{100 * statistics.mean(row['f1']):.2f} | {legal} | {build} | {mib} |")  # fmt: skip


if __name__ == "__main__":
    main()
