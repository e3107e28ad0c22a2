"""mner.runtime: one device/AMP rule for both stages, torchrun start-up, seeding, the atomic write.

The GPU paths run here without a GPU: torch.cuda's availability, device count and bf16 support
are monkeypatched, as is the process-group start-up, and the tests check what the resolver asks
torch for.
"""

from __future__ import annotations

import io
import logging
import os
import random
import re
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mner import runtime as rt
from mner.cache.datasets import DataConfig
from mner.extract.config import ExtractConfig
from mner.runtime import device as rt_device
from mner.runtime import folders as rt_folders
from mner.runtime import progress as rt_progress
from mner.runtime import resolve_amp, resolve_device, resolve_runtime, start_runtime, write_atomic
from mner.train.config import TrainConfig


@pytest.fixture
def gpus(monkeypatch):
    """Pretend torch sees `n` CUDA devices; returns the list of set_device calls."""
    calls = []

    def with_gpus(n: int, bf16: bool = True) -> list:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: bf16)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
        return calls

    return with_gpus


@pytest.fixture
def torchrun(monkeypatch):
    """torchrun's environment for rank `rank` of `world`, with a recorded (fake) process group."""
    calls = []

    def join(rank: int, world: int, local_rank: int | None = None) -> list:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("LOCAL_RANK", str(rank if local_rank is None else local_rank))
        state = {"up": False}

        def init(backend, **options):
            calls.append(("init", backend, options))
            state["up"] = True

        monkeypatch.setattr(dist, "is_initialized", lambda: state["up"])
        monkeypatch.setattr(dist, "init_process_group", init)
        monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
        monkeypatch.setattr(dist, "get_rank", lambda: rank)
        monkeypatch.setattr(dist, "get_world_size", lambda: world)
        return calls

    return join


# ------------------------------------------------------------------------------------------ device


def test_auto_and_cpu_without_cuda(gpus):
    gpus(0)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "local_rank", "expected"),
    [
        ("auto", 0, "cuda:0"),
        ("auto", 1, "cuda:1"),
        ("cuda", 0, "cuda:0"),
        ("cuda", 1, "cuda:1"),
        ("cuda:1", 0, "cuda:1"),
        ("cpu", 1, "cpu"),
    ],
)
def test_cuda_names_resolve_to_an_indexed_device(gpus, name, local_rank, expected):
    gpus(2)
    assert resolve_device(name, local_rank) == torch.device(expected)


def test_explicit_gpu_under_torchrun_gives_each_rank_its_own(gpus, caplog):
    gpus(2)
    with caplog.at_level(logging.WARNING, logger="mner.runtime"):
        assert resolve_device("cuda:0", local_rank=1, world_size=2) == torch.device("cuda:1")
    assert "rank with LOCAL_RANK 1 uses its own GPU, cuda:1" in caplog.text
    # The rank whose LOCAL_RANK is the named GPU keeps it, silently.
    caplog.clear()
    assert resolve_device("cuda:0", local_rank=0, world_size=2) == torch.device("cuda:0")
    assert caplog.text == ""


@pytest.mark.parametrize(
    ("gpu_count", "name", "hint", "message"),
    [
        (
            0,
            "cuda",
            "--device cpu",
            "device 'cuda' asked for, but torch sees no CUDA device; use --device cpu",
        ),
        (
            0,
            "cuda:1",
            "--set train.device=cpu",
            "device 'cuda:1' asked for, but torch sees no CUDA device; use --set train.device=cpu",
        ),
        (
            2,
            "cuda:2",
            "--device cpu",
            "device cuda:2 asked for, but torch sees 2 CUDA device(s); use --device cpu",
        ),
        (1, "gpu", "--device cpu", "device must be auto, cpu, mps, cuda or cuda:N; got 'gpu'"),
    ],
)
def test_unusable_device_is_refused(gpus, gpu_count, name, hint, message):
    gpus(gpu_count)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        resolve_device(name, hint=hint)


def test_mps_needs_an_mps_device(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(
        ValueError, match=re.escape("device 'mps' asked for, but torch sees no MPS device; use x")
    ):
        resolve_device("mps", hint="x")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize("name", ["auto", "cpu", "mps", "cuda", "cuda:0", "cuda:12"])
def test_both_stages_accept_the_same_device_names(tmp_path, name):
    assert TrainConfig(device=name).device == name
    assert (
        ExtractConfig(
            data=DataConfig(data_dir=str(tmp_path)), out=str(tmp_path / "cache"), device=name
        ).device
        == name
    )


# --------------------------------------------------------------------------------------------- amp


@pytest.mark.parametrize("amp", ["auto", "off", "fp16", "bf16"])
def test_no_autocast_off_cuda(amp):
    assert resolve_amp(amp, torch.device("cpu")) is None
    assert resolve_runtime("cpu", amp).autocast().__class__.__name__ == "nullcontext"


@pytest.mark.parametrize(
    ("amp", "bf16_supported", "expected"),
    [
        ("off", True, None),
        ("fp16", True, torch.float16),
        ("bf16", False, torch.bfloat16),
        ("auto", True, torch.bfloat16),
        ("auto", False, torch.float16),
    ],
)
def test_cuda_autocast_dtype(gpus, amp, bf16_supported, expected):
    gpus(1, bf16=bf16_supported)
    runtime = resolve_runtime("cuda", amp)
    assert (runtime.device, runtime.amp_dtype) == (torch.device("cuda:0"), expected)


def test_unknown_amp_is_refused():
    with pytest.raises(ValueError, match=re.escape("amp must be one of auto, off, fp16, bf16; got 'fp8'")):
        resolve_amp("fp8", torch.device("cpu"))


# ---------------------------------------------------------------------------------------- torchrun


def test_single_process_joins_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: pytest.fail("joined a group"))
    runtime = start_runtime("cpu", "off")
    assert (runtime.rank, runtime.world_size, runtime.owns_group, runtime.is_main) == (0, 1, False, True)
    runtime.barrier()
    runtime.close()


def test_cpu_ranks_join_a_gloo_group_and_leave_it(torchrun, gpus):
    gpus(0)
    calls = torchrun(rank=1, world=2)
    runtime = start_runtime("auto", "auto", timeout=timedelta(hours=24))
    assert calls == [("init", "gloo", {"timeout": timedelta(hours=24)})]
    assert (runtime.device, runtime.rank, runtime.world_size, runtime.is_main) == (
        torch.device("cpu"),
        1,
        2,
        False,
    )
    runtime.close()
    runtime.close()  # a second close does nothing
    assert calls[1:] == [("destroy",)]


def test_gpu_ranks_bind_their_gpu_before_the_nccl_group(torchrun, gpus):
    set_device = gpus(4)
    calls = torchrun(rank=3, world=4, local_rank=1)  # second node: global rank 3, local rank 1
    runtime = start_runtime("cuda:0", "off")
    assert set_device == [("set_device", torch.device("cuda:1"))]
    assert calls == [("init", "nccl", {})]  # no timeout given: torch's default
    assert (runtime.device, runtime.rank) == (torch.device("cuda:1"), 3)


def test_a_group_made_elsewhere_is_not_destroyed(torchrun, monkeypatch):
    calls = torchrun(rank=0, world=2)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    runtime = start_runtime("cpu", "off")
    runtime.close()
    assert calls == [] and runtime.world_size == 2


# ------------------------------------------------------------------------------------ seed, device


def test_seed_everything_repeats_every_generator():
    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    rt.seed_everything(7)
    first = draws()
    rt.seed_everything(7)
    assert draws() == first
    rt.seed_everything(8)
    assert draws() != first
    assert torch.are_deterministic_algorithms_enabled()


def test_to_device_moves_tensors_only():
    batch = {"x": torch.ones(2, 3), "keys": ["a", "b"], "n": 3}
    moved = rt.to_device(batch, torch.device("meta"))
    assert moved["x"].device.type == "meta" and moved["x"].shape == (2, 3)
    assert moved["keys"] is batch["keys"] and moved["n"] == 3


# ------------------------------------------------------------------------------------ atomic write


def test_write_atomic_replaces_the_file_and_leaves_no_tmp(tmp_path):
    path = tmp_path / "results.json"
    assert write_atomic(path, "old\n") == path
    write_atomic(path, "néw\n")
    assert path.read_bytes() == "néw\n".encode()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_write_atomic_fsyncs_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    tmp = tmp_path / "a.json.tmp"

    def fsync(fd):
        events.append(("fsync", "tmp written" if tmp.exists() else "tmp renamed"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(src), os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_atomic(tmp_path / "a.json", "{}")
    assert events == [("fsync", "tmp written"), ("replace", "a.json.tmp", "a.json"), ("fsync", "tmp renamed")]


def test_a_write_that_fails_keeps_the_old_file_and_leaves_no_tmp(tmp_path, monkeypatch):
    import errno

    path = write_atomic(tmp_path / "metrics.jsonl", "old\n")

    def immutable(src, dst):
        raise PermissionError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))

    monkeypatch.setattr(os, "replace", immutable)
    with pytest.raises(PermissionError):
        write_atomic(path, "new\n")
    assert path.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_kill_while_writing_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    write_atomic(path, "complete old text\n")

    def killed(fd):
        raise KeyboardInterrupt  # stands in for a kill between writing and the rename

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, "new text that never lands\n")
    assert path.read_text() == "complete old text\n"


# ------------------------------------------------------------------- outputs that are inputs (A8)


def test_an_output_that_is_an_input_file_is_refused_however_it_is_named(tmp_path, monkeypatch):
    from mner.runtime import refuse_inputs_as_output

    gold = tmp_path / "data" / "gold.txt"
    gold.parent.mkdir()
    gold.write_text("IMGID:1\nParis\tB-LOC\n")
    link = tmp_path / "link.txt"
    link.symlink_to(gold)
    hard = tmp_path / "hard.txt"
    os.link(gold, hard)
    monkeypatch.chdir(tmp_path)
    inputs = [("the --input file", gold)]
    for out in (gold, link, hard, "data/gold.txt", "data/../data/gold.txt", "link.txt"):
        with pytest.raises(
            ValueError,
            match=f"^--out {re.escape(str(out))} is the --input file {re.escape(str(gold))}: writing it "
            "would overwrite an input of this command; choose another path$",
        ):
            refuse_inputs_as_output(out, "--out", files=inputs)
    refuse_inputs_as_output(tmp_path / "data" / "new.txt", "--out", files=inputs)  # beside it is fine
    refuse_inputs_as_output(
        tmp_path / "not-yet" / "x.txt", "--out", files=[("the --input file", tmp_path / "gone")]
    )


def test_an_output_inside_an_input_folder_is_refused_where_it_would_replace_a_file(tmp_path):
    from mner.runtime import refuse_inputs_as_output

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "checkpoint" / "state.pt").write_text("x")
    folders = [("the run folder", run)]
    for out in (run / "config.json", run / "checkpoint" / "state.pt", run, run / "checkpoint"):
        with pytest.raises(
            ValueError, match=rf"^--out {re.escape(str(out))} is in the run folder {re.escape(str(run))}"
        ):
            refuse_inputs_as_output(out, "--out", folders=folders)
    refuse_inputs_as_output(run / "new.pred.conll", "--out", folders=folders)  # a new file there is fine


# ---------------------------------------------------------------------------------------- progress

LINE = re.compile(
    r"(?P<desc>.+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) \(\d+%\), [\d.]+ \w+/s, ETA (\S+)(, .*)?"
)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress_lines(caplog) -> list[re.Match]:
    """The match of every mner.runtime line but the torch-threads line start_runtime logs."""
    records = [r for r in caplog.records if r.name == "mner.runtime"]
    return [
        LINE.fullmatch(r.getMessage()) for r in records if not r.getMessage().startswith("torch threads:")
    ]


# A process that takes a folder's write lock, forks a child that keeps running (as a DataLoader
# worker does), and waits to be killed.
LOCK_THEN_FORK = """
import os, sys, time
from mner.runtime import lock_folder
lock = lock_folder(sys.argv[1], command="mner extract-features")
if os.fork() == 0:
    time.sleep(60)
    os._exit(0)
print("locked", flush=True)
time.sleep(60)
"""


def test_a_dead_writer_and_its_forked_children_never_hold_the_lock(tmp_path):
    import signal
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_THEN_FORK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(ValueError) as refused:
            rt.lock_folder(tmp_path)
        assert str(refused.value) == (
            f"{tmp_path} is being written by another `mner extract-features` (pid {holder.pid}); "
            "wait for it to finish, or give another --out folder"
        )
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
        # Its forked child is still alive here, and does not hold the lock.
        rt.lock_folder(tmp_path).release()
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait()
        # The child's pid is not known here; it exits on its own after its sleep.


def test_a_second_claim_in_the_same_process_is_refused_and_release_frees_it(tmp_path):
    # Both claim the new folder before either creates it; the second to create it is refused.
    first = rt.claim_folder(tmp_path / "run", "config.json", ("model",), resume=False)
    second = rt.claim_folder(tmp_path / "run", "config.json", ("model",), resume=False)
    first.create()
    with pytest.raises(ValueError) as refused:
        second.create()
    assert str(refused.value) == (
        f"{tmp_path / 'run'} is being written by another `mner` (pid {os.getpid()}); wait for it to finish, "
        "or give another --out folder"
    )
    second.release()  # never got the lock: removes nothing of the first writer's folder
    assert (tmp_path / "run").is_dir()
    # Once the folder exists, the claim itself is refused, before anything is read.
    with pytest.raises(ValueError, match="is being written by another `mner`"):
        rt.claim_folder(tmp_path / "run", "config.json", ("model",), resume=False)
    first.unlock()
    rt.claim_folder(
        tmp_path / "run", "config.json", ("model",), resume=False
    ).create()  # a lone lock file is empty


def test_an_out_that_is_a_dangling_symlink_is_refused_in_one_line(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError) as refused:
        rt.claim_folder(link, "config.json", ("model",), resume=False)
    assert str(refused.value) == (
        f"--out {link} is a symbolic link to {tmp_path / 'nowhere'}, which does not exist; create its target, "
        "remove the link, or choose another --out"
    )


def test_a_folder_that_cannot_be_written_is_refused_in_one_line(tmp_path, monkeypatch):
    import errno

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(rt_folders, "_open_lock_file", read_only)
    with pytest.raises(ValueError) as refused:
        rt.lock_folder(tmp_path, command="mner extract-features")
    assert str(refused.value) == (
        f"{tmp_path} cannot be written (Read-only file system): `mner extract-features` writes its files there; "
        "make the folder writable, or give another --out folder"
    )


def test_progress_in_a_log_file_is_plain_lines_at_the_interval(caplog):
    caplog.set_level(logging.INFO, logger="mner.runtime")
    stream = io.StringIO()
    with rt.ProgressLog(4, "extract", unit="img", interval=0.0, stream=stream) as progress:
        for _ in range(4):
            progress.update()
    lines = progress_lines(caplog)
    assert all(lines) and [int(m["done"]) for m in lines] == [1, 2, 3, 4, 4]  # each update, then the end
    assert {(m["desc"], m["total"], m["unit"]) for m in lines} == {("extract", "4", "img")}
    assert "\r" not in stream.getvalue()  # no bar drawn into a file


def test_progress_every_n_steps_and_postfix(caplog):
    caplog.set_level(logging.INFO, logger="mner.runtime")
    with rt.ProgressLog(10, "epoch 1/3", unit="step", interval=3600.0, every=4, stream=io.StringIO()) as bar:
        for step in range(10):
            bar.update()
            bar.set_postfix(loss=f"{1 / (step + 1):.4f}")
    lines = progress_lines(caplog)
    assert [int(m["done"]) for m in lines] == [4, 8, 10]
    assert lines[-1].group(0).endswith(", loss=0.1000")


def test_progress_on_a_terminal_is_a_bar_and_no_log_lines(caplog):
    caplog.set_level(logging.INFO, logger="mner.runtime")
    terminal = FakeTerminal()
    with rt.ProgressLog(3, "extract", unit="img", interval=0.0, stream=terminal) as progress:
        for _ in range(3):
            progress.update()
    assert progress_lines(caplog) == []
    assert "3/3" in terminal.getvalue()
    with rt.ProgressLog(3, "rank 1", interval=0.0, enabled=False, stream=terminal) as quiet:
        quiet.update(3)
    assert progress_lines(caplog) == []


def test_extraction_logs_progress_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch, caplog):
    from mner.extract.run import extract_features
    from tests.train.run_factories import make_data, make_images

    data_dir, posts = make_data(tmp_path, n_train=6, n_valid=2, n_test=None)
    make_images(data_dir / "images", [post.key for post in posts])
    monkeypatch.setattr(rt_progress, "PROGRESS_INTERVAL_S", 0.0)
    caplog.set_level(logging.INFO, logger="mner.runtime")
    cfg = ExtractConfig(
        data=DataConfig(data_dir=str(data_dir)), out=str(tmp_path / "cache"), num_workers=0, batch_size=2,
        device="cpu", topk=2, clip="tiny-clip", detector="tiny-frcnn",
    )  # fmt: skip
    extract_features(cfg)
    lines = progress_lines(caplog)
    assert all(lines) and [int(m["done"]) for m in lines] == [2, 4, 6, 8, 8]
    assert {(m["desc"], m["total"], m["unit"]) for m in lines} == {("extract", "8", "img")}


def test_library_loading_bars_are_switched_off():
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    runtime = start_runtime("cpu", "off")
    runtime.close()
    assert not hf_logging.is_progress_bar_enabled()
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"


@pytest.mark.slow
def test_training_logs_about_ten_lines_per_epoch(tmp_path, caplog):
    from mner.train.loop import train_from_cache
    from tests.train.run_factories import make_data, run_config

    data_dir, _ = make_data(tmp_path, n_train=40, n_valid=4, n_test=None)
    caplog.set_level(logging.INFO, logger="mner.runtime")
    train_from_cache(run_config(tmp_path / "run", None, data_dir, epochs=1, text_only=True))
    lines = [m for m in progress_lines(caplog) if m and m["desc"] == "epoch 1/1"]
    # 40 posts in batches of 4: 10 steps, a line each step (every = ceil(10 / 10)), then the end line.
    assert [int(m["done"]) for m in lines] == [*range(1, 11), 10]
    assert all(m["unit"] == "step" and m["total"] == "10" for m in lines)
    assert re.fullmatch(r", loss=\d+\.\d{4}", lines[-2].group(6))
    assert re.fullmatch(r", loss=\d+\.\d{4}, dev_f1=\d\.\d{4}", lines[-1].group(6))  # the epoch's end


# ------------------------------------------------------------------------- new, empty or ours


def test_folder_state_is_new_empty_or_ours_and_refuses_anything_else(tmp_path):
    def why_not_ours(path):
        return "" if (path / "mark.json").is_file() else "no mark.json"

    assert rt.folder_state(tmp_path / "absent", why_not_ours, "thing") == "new"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / rt.LOCK_NAME).write_text("")  # a lone lock file: a start that failed early
    assert rt.folder_state(tmp_path / "empty", why_not_ours, "thing") == "empty"
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "mark.json").write_text("{}")
    assert rt.folder_state(tmp_path / "ours", why_not_ours, "thing") == "ours"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError) as refused:
        rt.folder_state(tmp_path / "other", why_not_ours, "thing", flag="--to", hint=", or else")
    assert str(refused.value) == (
        f"--to {tmp_path / 'other'} is not empty and is not one of our thing folders (no mark.json); "
        "nothing in it was touched — choose a new or empty folder, or else"
    )
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        ValueError, match=r"^--out .*file is a file, not a folder; choose a new or empty folder$"
    ):
        rt.folder_state(tmp_path / "file", why_not_ours, "thing")
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep"


# The refusal every command that writes a folder gives for a folder of someone else's files.
NOT_OURS = re.compile(
    r"--out (?P<path>\S+) is not empty and is not one of our (?P<what>.+?) folders \((?P<why>.+)\); "
    r"nothing in it was touched — choose a new or empty folder(?P<hint>.*)"
)


def test_every_command_that_writes_a_folder_refuses_a_foreign_one_with_the_one_wording(tmp_path):
    from click.testing import CliRunner

    from mner.cli import main

    runner = CliRunner()
    data = tmp_path / "data"
    assert runner.invoke(main, ["demo-data", "--out", str(data)]).exit_code == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    commands = {
        "feature cache": [
            "extract-features",
            "--data-dir",
            str(data),
            "--clip",
            "tiny-clip",
            "--out",
            str(foreign),
        ],
        "demo": ["demo-data", "--classification", "--out", str(foreign)],
        "run": [
            "train-from-cache",
            "--cache",
            str(tmp_path / "cache"),
            "--data-dir",
            str(data),
            "--out",
            str(foreign),
        ],
    }
    for what, args in commands.items():
        result = runner.invoke(main, args)
        message = " ".join(result.output.split())  # click may wrap a long line
        found = NOT_OURS.search(message)
        assert result.exit_code == 1 and found, f"{args[0]}: {result.output}"
        assert (found["path"], found["what"]) == (str(foreign), what)
    assert [entry.name for entry in foreign.iterdir()] == ["notes.txt"]
    assert (foreign / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------- threads


def cgroup_tree(tmp_path, proc: str, files: dict[str, str]):
    """A fake /proc/self/cgroup (text `proc`) and /sys/fs/cgroup holding `files` (relative path -> text)."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    root.mkdir(exist_ok=True)
    (tmp_path / "proc").write_text(proc)
    return tmp_path / "proc", root


@pytest.mark.parametrize(
    "proc, files, expected",
    [
        # v2: the tightest quota on the path from the process's group up to the root, rounded up
        ("0::/job/step\n", {"job/cpu.max": "150000 100000", "job/step/cpu.max": "max 100000"}, 2),
        ("0::/job/step\n", {"cpu.max": "400000 100000", "job/step/cpu.max": "50000 100000"}, 1),
        ("0::/\n", {"cpu.max": "max 100000"}, None),
        # v1: the cpu controller's quota and period; -1 is no quota
        ("4:cpu,cpuacct:/grp\n", {"cpu,cpuacct/grp/cpu.cfs_quota_us": "250000", "cpu,cpuacct/grp/cpu.cfs_period_us": "100000"}, 3),
        ("4:cpu,cpuacct:/grp\n", {"cpu,cpuacct/grp/cpu.cfs_quota_us": "-1", "cpu,cpuacct/grp/cpu.cfs_period_us": "100000"}, None),
        ("9:memory:/m\n", {"memory/m/memory.max": "1"}, None),
    ],
)  # fmt: skip
def test_cgroup_cpu_quota_reads_v1_and_v2(tmp_path, proc, files, expected):
    assert rt.cgroup_cpu_quota(*cgroup_tree(tmp_path, proc, files)) == expected


def test_cgroup_cpu_quota_without_a_proc_file_is_none(tmp_path):
    assert rt.cgroup_cpu_quota(tmp_path / "absent", tmp_path) is None


def test_usable_cpus_is_the_affinity_capped_by_the_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    assert rt.usable_cpus(*cgroup_tree(tmp_path, "0::/\n", {"cpu.max": "200000 100000"})) == 2
    assert rt.usable_cpus(*cgroup_tree(tmp_path, "0::/\n", {"cpu.max": "max 100000"})) == 6


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_set_threads_takes_a_count_or_the_share_of_the_usable_cpus(monkeypatch, restore_threads, caplog):
    monkeypatch.setattr(rt_device, "usable_cpus", lambda: 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    torch.set_num_threads(8)
    with caplog.at_level(logging.INFO, logger="mner.runtime"):
        assert rt.set_threads(0) == 2 == torch.get_num_threads()
    assert "torch threads: 2 (the usable CPUs / 2 local ranks; this process may use 4 CPU(s)" in caplog.text
    assert rt.set_threads(3) == 3 == torch.get_num_threads()
    assert "more than" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="mner.runtime"):
        assert rt.set_threads(64) == 64
    assert "torch threads: 64 asked, more than the 4 CPU(s) this process may use" in caplog.text
    torch.set_num_threads(1)  # OMP_NUM_THREADS=1, or the caller's own choice: never raised
    assert rt.set_threads(0) == 1 == torch.get_num_threads()


def test_start_runtime_sets_the_threads_it_is_given(restore_threads):
    start_runtime("cpu", "off", threads=3).close()
    assert torch.get_num_threads() == 3
