"""Two trainings on one machine: torch's intra-op threads against the CPUs each process gets.

Each training is `mner train-from-cache --text-only --model bert-crf` (the bundled MiniLM) for one
epoch over the first `--posts` posts of a tagging file; its epoch time is the `seconds` of its
metrics.jsonl line (the training epoch alone, no model loading). Scenarios, all in one run:

    alone                 one training, --threads 0 (the rule: the CPUs this process may use)
    pair, machine count   two at once, each --threads <the machine's CPU count> (torch's own default
                          before the rule, which sized its pool from the machine)
    pair, 0 (rule)        two at once, each --threads 0; without a cgroup quota or a CPU mask this is
                          the machine count again, so here it shows that the rule changes nothing alone
    pair, share           two at once, each --threads <CPUs / 2>: what to pass when you start two
    pinned, machine count one training under `taskset -c 0` with --threads <machine count>: the old
                          behaviour in a CPU mask
    pinned, 0 (rule)      the same under `taskset -c 0` with --threads 0: the rule reads the mask (1)

    python benchmarks/bench_threads.py                       # the demo's text, 128 posts
    python benchmarks/bench_threads.py --data ../shared/data/twitter2017 --posts 256
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mner.cache.conll import read_split, write_split
from mner.demo.build import DemoConfig, build_demo


def make_data(work: Path, source: str | None, posts: int) -> Path:
    """A data folder of `posts` train posts and 32 valid posts (from `source`, or the built demo)."""
    if source is None:
        source = str(build_demo(DemoConfig(out_dir=str(work / "demo"))))
    folder = work / "data"
    folder.mkdir()
    train = read_split(Path(source) / "train.txt").posts
    valid = read_split(Path(source) / "valid.txt").posts
    write_split(folder / "train.txt", train[:posts])
    write_split(folder / "valid.txt", valid[:32])
    return folder


def start(data: Path, out: Path, threads: int, pin: bool) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "mner", "train-from-cache", "--text-only", "--model", "bert-crf",
        "--data-dir", str(data), "--epochs", "1", "--threads", str(threads), "--out", str(out),
        "--set", "train.device=cpu", "--set", "train.batch_size=16",
    ]  # fmt: skip
    if pin:
        command = ["taskset", "-c", "0", *command]
    log = open(out.with_suffix(".log"), "w")  # noqa: SIM115 - closed by the OS when the child ends
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


def epoch_seconds(out: Path) -> float:
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return float(line["seconds"])


def threads_line(out: Path) -> str:
    for line in out.with_suffix(".log").read_text().splitlines():
        if "torch threads:" in line:
            return line.split("torch threads:", 1)[1].strip()
    return "?"


def scenario(work: Path, data: Path, name: str, jobs: list[tuple[int, bool]]) -> dict:
    outs = [work / f"{name}-{i}" for i in range(len(jobs))]
    started = time.perf_counter()
    procs = [start(data, out, threads, pin) for out, (threads, pin) in zip(outs, jobs)]
    for proc, out in zip(procs, outs):
        if proc.wait() != 0:
            sys.exit(f"{name}: training failed, see {out.with_suffix('.log')}")
    wall = time.perf_counter() - started
    seconds = [epoch_seconds(out) for out in outs]
    return {"name": name, "epochs": seconds, "wall": wall, "threads": threads_line(outs[0])}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="a tagging folder with train.txt and valid.txt [default: the demo]")
    parser.add_argument("--posts", type=int, default=128, help="train posts per epoch")
    args = parser.parse_args()
    machine = os.cpu_count() or 1
    pinning = shutil.which("taskset") is not None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_data(work, args.data, args.posts)
        rows = [
            scenario(work, data, "alone", [(0, False)]),
            scenario(work, data, "pair-machine", [(machine, False)] * 2),
            scenario(work, data, "pair-rule", [(0, False)] * 2),
            scenario(work, data, "pair-share", [(max(1, machine // 2), False)] * 2),
        ]
        if pinning and machine > 1:
            rows += [
                scenario(work, data, "pinned-machine", [(machine, True)]),
                scenario(work, data, "pinned-rule", [(0, True)]),
            ]
    base = rows[0]["epochs"][0]
    print(f"{args.posts} posts, bert-crf + MiniLM, batch 16, machine CPUs {machine}")
    print("| scenario | torch threads (first process's log) | epoch s (each) | x alone | wall s |")
    print("|---|---|---|---|---|")
    for row in rows:
        each = " / ".join(f"{s:.1f}" for s in row["epochs"])
        ratio = max(row["epochs"]) / base
        print(f"| {row['name']} | {row['threads']} | {each} | {ratio:.2f} | {row['wall']:.1f} |")


if __name__ == "__main__":
    main()
