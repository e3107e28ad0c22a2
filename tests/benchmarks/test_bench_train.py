"""benchmarks/bench_train.py --model: the zoo table from measured steps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts import their siblings as top-level modules

import bench_train  # noqa: E402

# The benchmark script's own data and cache are built once per module: outside the inner loop.
pytestmark = pytest.mark.slow

COLUMNS = ("model", "encoder", "tokens", "ms/step", "x bert-crf", "peak RSS", "loader", "lazy/RAM")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The demo data and its tiny-preset cache, as the script makes them."""
    return bench_train.make_data(tmp_path_factory.mktemp("bench"), images=4, device="cpu", full=False)


def _job(made: dict, runs: list[dict], steps: int = 2) -> dict:
    return {
        "encoder": "tiny-bert",
        "data_dir": made["data_dir"],
        "cache_dir": made["caches"]["tiny"],
        "device": "cpu",
        "amp": "off",
        "num_workers": 0,
        "seed": 0,
        "threads": None,
        "batch_size": 4,
        "warmup": 0,
        "steps": steps,
        "runs": runs,
    }


def test_zoo_table_has_one_row_per_model_with_ratios_from_the_measured_steps(made):
    runs = [{"model": "bert-crf", "store": "lazy"}, {"model": "afner", "store": "lazy"}]
    runs.append({"model": "afner", "store": "ram"})
    timed = bench_train.run_zoo_worker(_job(made, runs))
    steps = {(r["model"], r["store"]): r for r in timed["runs"]}
    memory = {"bert-crf": {"peak_rss_mib": 100.0}, "afner": {"peak_rss_mib": 150.0}}

    rows = bench_train.zoo_rows(timed, memory, "tiny-bert", "tiny")

    assert [r["model"] for r in rows] == ["bert-crf", "afner"]
    reference = steps[("bert-crf", "lazy")]["step_median_s"]
    afner, crf = rows[1], rows[0]
    assert crf["ratio_to_reference"] == 1.0
    assert afner["ratio_to_reference"] == steps[("afner", "lazy")]["step_median_s"] / reference
    assert afner["lazy_over_ram"] == (
        steps[("afner", "lazy")]["step_median_s"] / steps[("afner", "ram")]["step_median_s"]
    )
    assert crf["lazy_over_ram"] is None  # a text-only model never reads the cache
    assert 0 < afner["loader_share"] < 1 and afner["peak_rss_mib"] == 150.0

    header, rule, *lines = bench_train.zoo_table(rows)
    assert all(column in header for column in COLUMNS) and set(rule) == {"-"}
    assert len(lines) == 2
    cells = [[cell.split() for cell in line.split("|")] for line in lines]
    assert cells[0][0] == ["bert-crf", "tiny-bert", "tiny"] and cells[1][0] == ["afner", "tiny-bert", "tiny"]
    assert cells[0][1] == [f"{reference * 1000:.1f}", "1.00"]
    assert cells[1][1][1] == f"{afner['ratio_to_reference']:.2f}"
    assert cells[0][2] == ["100", "M"] and cells[1][2] == ["150", "M"]
    for row, cell in zip(rows, cells):
        share, verdict = cell[3]
        assert share == f"{row['loader_share'] * 100:.1f}%"
        assert verdict == ("✔" if row["loader_share"] <= bench_train.TARGET_LOADER_SHARE else "✘")
    assert cells[0][4] == ["-", "-"]
    ratio, verdict = cells[1][4]
    assert ratio == f"{afner['lazy_over_ram']:.3f}"
    assert verdict == ("✔" if afner["lazy_over_ram"] <= bench_train.TARGET_LAZY_RATIO else "✘")


def test_zoo_rows_need_the_reference_model_in_the_run(made):
    timed = bench_train.run_zoo_worker(_job(made, [{"model": "bert-softmax", "store": "lazy"}], steps=1))
    with pytest.raises(KeyError, match="bert-crf"):
        bench_train.zoo_rows(timed, {"bert-softmax": {"peak_rss_mib": 1.0}}, "tiny-bert", "tiny")


def test_process_per_model_divides_each_model_by_the_bert_crf_it_ran_beside(monkeypatch):
    """Each process times bert-crf beside one model; a fake worker makes bert-crf slower in the second."""
    jobs = []

    def fake_run_job(job: dict) -> dict:
        jobs.append(job)
        group = sum(1 for j in jobs if j["warmup"] > 0)  # timing processes so far (memory ones have none)
        runs = [
            {
                **run,
                "step_median_s": (2.0 if run["model"] == "bert-crf" else 3.0) * group,
                "loader_share": 0.01,
            }
            for run in job["runs"]
        ]
        return {"runs": runs, "threads": 1, "setup_s": 0.0, "peak_rss_mib": 10.0 * len(jobs)}

    monkeypatch.setattr(bench_train, "run_job", fake_run_job)
    monkeypatch.setattr(
        sys, "argv", ["bench_train.py", "--model", "afner", "bert-softmax", "--process-per-model"]
    )
    args = bench_train.parse_args()
    made = {"data_dir": "unused", "caches": {"tiny": "unused"}}

    rows = bench_train.measure_zoo(args.model, "tiny-bert", "tiny-bert", made, args)

    timing = [[(r["model"], r["store"]) for r in job["runs"]] for job in jobs if job["warmup"] > 0]
    assert timing == [
        [("bert-crf", "lazy"), ("afner", "lazy"), ("afner", "ram")],
        [("bert-crf", "lazy"), ("bert-softmax", "lazy")],
    ]
    assert [(r["model"], r["ratio_to_reference"]) for r in rows] == [
        ("bert-crf", 1.0),
        ("afner", 1.5),
        ("bert-softmax", 1.5),
    ]
    assert rows[0]["step_median_s"] == 2.0  # bert-crf's row is from the first process
    assert rows[1]["lazy_over_ram"] == 1.0 and rows[2]["lazy_over_ram"] is None


def test_an_unknown_model_is_refused_with_the_list(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--model", "afner", "nope"])
    with pytest.raises(SystemExit):
        bench_train.parse_args()
    err = capsys.readouterr().err
    assert "--model: unknown nope" in err and "all, afdvqf" in err


@pytest.mark.slow
def test_the_script_prints_the_zoo_table_with_the_reference_added():
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_train.py"), "--model", "afner", "--encoder", "tiny-bert"]
        + ["--steps", "2", "--warmup", "0", "--memory-steps", "1", "--images", "4", "--threads", "1"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("model ") and "x bert-crf" in line)
    rows = [line.split()[0] for line in lines[start + 2 : start + 4]]
    assert rows == ["bert-crf", "afner"]
    assert lines[start + 2].split("|")[1].split()[1] == "1.00"


def test_zoo_table_cells_from_hand_made_timings():
    """Steps with known medians give the ratios and cells computed here by hand: bert-crf 0.2 s, afner
    0.5 s lazy and 0.4 s in RAM -> x bert-crf 2.50, lazy/RAM 1.250."""
    timed = {
        "runs": [
            {"model": "bert-crf", "store": "lazy", "step_median_s": 0.2, "loader_share": 0.01},
            {"model": "afner", "store": "lazy", "step_median_s": 0.5, "loader_share": 0.03},
            {"model": "afner", "store": "ram", "step_median_s": 0.4, "loader_share": 0.02},
        ]
    }
    memory = {"bert-crf": {"peak_rss_mib": 100.0}, "afner": {"peak_rss_mib": 150.0}}
    rows = bench_train.zoo_rows(timed, memory, "tiny-bert", "tiny")
    assert [(r["model"], r["ratio_to_reference"], r["lazy_over_ram"]) for r in rows] == [
        ("bert-crf", 1.0, None),
        ("afner", 2.5, 1.25),
    ]
    _, _, crf_line, afner_line = bench_train.zoo_table(rows)
    crf_cells = [cell.split() for cell in crf_line.split("|")]
    afner_cells = [cell.split() for cell in afner_line.split("|")]
    assert crf_cells[1] == ["200.0", "1.00"] and afner_cells[1] == ["500.0", "2.50"]
    assert crf_cells[3][0] == "1.0%" and afner_cells[3][0] == "3.0%"
    assert crf_cells[4] == ["-", "-"] and afner_cells[4][0] == "1.250"


def test_mango_is_timed_with_its_vision_blocks_on_a_cache_that_stores_their_input(made, tmp_path):
    """MANGO trains its last 2 CLIP blocks by default: the script extracts the state before them when a
    measured model needs it and times the step with the blocks; on a cache without it the model is
    refused (never timed frozen)."""
    runs = [{"model": "mango", "store": "lazy"}]
    with pytest.raises(ValueError, match="stores no vision state"):
        bench_train.run_zoo_worker(_job(made, runs, steps=1))
    with_state = bench_train.make_data(tmp_path, images=4, device="cpu", full=False, vision_blocks=2)
    (timed,) = bench_train.run_zoo_worker(_job(with_state, runs, steps=1))["runs"]
    assert timed["model"] == "mango" and timed["step_median_s"] > 0
