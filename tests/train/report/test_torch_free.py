"""The reporting commands read run folders without torch: `mner results --plot` and `mner cases` run
in a process where importing torch or transformers fails (train/engine/run_files.py is the torch-free layer;
a command that rebuilds a model imports train/engine/runs.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.train.run_factories import make_prediction_pair

# Runs the CLI with torch, transformers and torchvision unimportable: `import torch` raises ImportError.
BLOCKED = """
import sys
for name in ("torch", "transformers", "torchvision"):
    sys.modules[name] = None
from mner.cli import main
main(sys.argv[1:])
"""

POSTS = [
    ("te0", "obama in paris", "B-PER O B-LOC", "O O B-LOC", "B-PER O B-LOC"),
    ("te1", "the game", "O O", "O O", "O O"),
    ("te2", "george lucas spoke", "B-PER I-PER O", "B-PER I-PER O", "B-ORG I-ORG O"),
]


def run_blocked(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCKED, *map(str, args)], capture_output=True, text=True, timeout=300
    )


def finish(run_dir, f1: float) -> None:
    """A finished run's metrics.jsonl and results.json, as far as the table and the figures read them."""
    micro = {"precision": f1, "recall": f1, "f1": f1, "support": 4}
    line = {"epoch": 1, "train_loss": 1.0, "dev_precision": f1, "dev_recall": f1, "dev_f1": f1, "best": True}
    (run_dir / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    results = {"best_epoch": 1, "epochs_run": 1, "test": {"micro": micro, "per_type": {"PER": micro}}}
    (run_dir / "results.json").write_text(json.dumps(results))


def test_results_with_plots_and_cases_run_with_torch_unimportable(tmp_path):
    run_a, run_b, _ = make_prediction_pair(tmp_path, POSTS)
    finish(run_a, 0.25)
    finish(run_b, 0.5)

    results = run_blocked("results", run_a, run_b, "--bootstrap", "50", "--plot", tmp_path / "figs")
    assert results.returncode == 0, results.stderr
    assert "25.00" in results.stdout and "50.00" in results.stdout
    drawn = json.loads((tmp_path / "figs" / "plots.json").read_text())["figures"]
    assert drawn == ["learning_curves.png", "per_type_f1.png"]
    assert all((tmp_path / "figs" / name).stat().st_size > 0 for name in drawn)

    cases = run_blocked("cases", run_a, run_b, "--out", tmp_path / "cases")
    assert cases.returncode == 0, cases.stderr
    assert cases.stdout.startswith("2 of 3 test posts differ")
    assert (tmp_path / "cases" / "index.html").is_file()


def test_the_block_is_real_a_command_that_rebuilds_a_model_fails_under_it(tmp_path):
    run_a, _, _ = make_prediction_pair(tmp_path, POSTS)
    evaluate = run_blocked("evaluate", run_a)
    assert evaluate.returncode != 0
    assert "import of torch halted" in evaluate.stderr
