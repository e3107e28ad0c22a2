"""Trained vision blocks against frozen ones on the demo: MANGO (CLIP's last 2 blocks) and IFAformer
(its whole vision tower), each at its model file's default and with the blocks frozen
(model.vision_trainable_blocks = 0), two training seeds, all from one demo cache.

The demo is `./run_pipeline.sh`'s: the seeded data (`mner demo-data`), one cache extracted with the
untrained demo-clip and tiny-frcnn storing the embedding output (`--vision-trainable-blocks 6`), and the
demo's run settings (configs/experiments/demo.toml, the epochs and extra settings of run_pipeline.sh's
DEMO_RUNS). Every run is `mner train-from-cache` in its own process. Printed: test F1 of each run, and
for each (model, seed) the paired bootstrap of `mner results` of the trained run against the frozen
one (dF1 in points, CI95, p).

    python benchmarks/bench_vision_demo.py                    # seeds 1 2, into a temporary folder
    python benchmarks/bench_vision_demo.py --out /tmp/vd --seeds 1 2 --threads 2 --models mango
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("mango", "ifaformer")


def demo_runs() -> dict[str, tuple[int, list[str]]]:
    """{model: (epochs, extra options)} as run_pipeline.sh's DEMO_RUNS rows give them (its one copy)."""
    script = (ROOT / "run_pipeline.sh").read_text(encoding="utf-8")
    rows = re.search(r"^DEMO_RUNS=\((.*?)^\)", script, re.S | re.M)
    if rows is None:
        sys.exit("run_pipeline.sh has no DEMO_RUNS=( ... ) table")
    runs = {}
    for row in re.findall(r'^\s*"([^"]+)"', rows.group(1), re.M):
        _, model, epochs, *extra = shlex.split(row)
        runs[model] = (int(epochs), extra)
    return runs


def mner(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "mner", *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"mner {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", help="work folder (default: a temporary one)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    args = parser.parse_args()
    settings = demo_runs()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        data, cache = out / "data", out / "cache"
        mner("demo-data", "--out", str(data))
        mner("extract-features", "--data-dir", str(data), "--clip", "demo-clip", "--detector", "tiny-frcnn",
             "--vision-trainable-blocks", "6", "--out", str(cache))  # fmt: skip
        rows = []
        for model in args.models:
            epochs, extra = settings[model]
            for seed in args.seeds:
                runs = {}
                for arm, blocks in (
                    ("frozen", ["--set", "model.vision_trainable_blocks=0"]),
                    ("trained", []),
                ):
                    run = out / "runs" / f"{model}-{arm}-{seed}"
                    if not (run / "results.json").is_file():
                        mner("train-from-cache", "--cache", str(cache), "--model", model, "--data-dir", str(data),
                             "--config", str(ROOT / "configs/experiments/demo.toml"), "--epochs", str(epochs),
                             "--seed", str(seed), "--threads", str(args.threads), *extra, *blocks,
                             "--out", str(run))  # fmt: skip
                    runs[arm] = run
                table = mner("results", str(runs["frozen"]), str(runs["trained"]), "--split", "test")
                f1 = {arm: json.loads((run / "results.json").read_text())["test"]["micro"]["f1"]
                      for arm, run in runs.items()}  # fmt: skip
                rows.append((model, seed, f1, table.splitlines()[2]))
    print("| model | seed | frozen F1 | trained F1 | mner results row of trained against frozen |")
    print("|---|---|---|---|---|")
    for model, seed, f1, line in rows:
        print(
            f"| {model} | {seed} | {100 * f1['frozen']:.2f} | {100 * f1['trained']:.2f} | `{line.strip()}` |"
        )


if __name__ == "__main__":
    main()
