"""train.checkpoint: exact save/load of the training state, and a kill at any step of the swap
still resumes (from the old checkpoint or the new one) without losing metrics.jsonl."""

from __future__ import annotations

import json
import logging
import os
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import get_linear_schedule_with_warmup

import mner.train.engine.checkpoint as checkpoint
from mner.train.engine.checkpoint import Progress, find_checkpoint, load_checkpoint, save_checkpoint
from mner.train.engine.loop import train_from_cache
from tests.train.factories import make_cache
from tests.train.run_factories import (  # noqa: F401 (single_thread: autouse fixture)
    make_data,
    run_config,
    single_thread,
)


def _state(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = get_linear_schedule_with_warmup(optimizer, 1, 10)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return model, optimizer, scheduler, scaler


def _draws():
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_save_then_load_restores_weights_optimiser_counters_and_rngs(tmp_path):
    model, optimizer, scheduler, scaler = _state(0)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    progress = Progress(epoch=3, best_f1=0.5, best_epoch=2, bad_epochs=1)
    save_checkpoint(
        tmp_path / "checkpoint", model, optimizer, scheduler, scaler, progress, torch.device("cpu")
    )
    expected = _draws()

    other, other_opt, other_sched, other_scaler = _state(1)
    restored = load_checkpoint(tmp_path / "checkpoint", other, other_opt, other_sched, other_scaler)
    assert restored == progress
    assert _draws() == expected
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    assert other_sched.state_dict() == scheduler.state_dict()
    assert torch.equal(
        other_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_find_checkpoint_trusts_the_folder_then_old_never_tmp(tmp_path):
    folder = tmp_path / "checkpoint"
    assert find_checkpoint(folder) is None
    (tmp_path / "checkpoint.tmp").mkdir()
    (tmp_path / "checkpoint.tmp" / checkpoint.STATE_FILE).write_bytes(b"may be half written")
    assert find_checkpoint(folder) is None
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / checkpoint.STATE_FILE).write_bytes(b"")
    assert find_checkpoint(folder) == tmp_path / "checkpoint.old"
    folder.mkdir()
    (folder / checkpoint.STATE_FILE).write_bytes(b"")
    assert find_checkpoint(folder) == folder


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing catches it, the run stops where it is."""


def _kill_while_writing(monkeypatch, run_dir):
    """The second checkpoint's weights are being written (checkpoint.tmp/ is half made)."""
    real, calls = checkpoint.save_model, []

    def save_model(model, path):
        if "checkpoint.tmp" in str(path):  # the run's best weights go through save_model too
            calls.append(path)
        if len(calls) == 2:
            raise _Killed
        real(model, path)

    monkeypatch.setattr(checkpoint, "save_model", save_model)


def _kill_between_renames(monkeypatch, run_dir):
    """checkpoint/ has become checkpoint.old/, checkpoint.tmp/ is not yet checkpoint/."""
    real = os.replace

    def replace(src, dst):
        if os.path.basename(src) == "checkpoint.tmp" and (run_dir / "checkpoint.old").exists():
            raise _Killed
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def _kill_after_the_swap(monkeypatch, run_dir):
    """The new checkpoint/ is in place, the previous one still lies in checkpoint.old/."""
    real = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if os.path.basename(path) == "checkpoint.old" and os.path.exists(path):
            raise _Killed
        real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", rmtree)


@pytest.mark.parametrize(
    ("kill", "resumed_from", "resumed_after"),
    [
        (_kill_while_writing, "checkpoint", 1),
        (_kill_between_renames, "checkpoint.old", 1),
        (_kill_after_the_swap, "checkpoint", 2),
    ],
)
@pytest.mark.slow
def test_a_kill_during_the_second_save_resumes_and_keeps_metrics(
    tmp_path, monkeypatch, caplog, kill, resumed_from, resumed_after
):
    data_dir, posts = make_data(tmp_path)
    cache_dir = make_cache(tmp_path, posts)
    straight = train_from_cache(run_config(tmp_path / "straight", cache_dir, data_dir, epochs=3))

    run_dir = tmp_path / "killed"
    with monkeypatch.context() as patch:
        kill(patch, run_dir)
        with pytest.raises(_Killed):
            train_from_cache(run_config(run_dir, cache_dir, data_dir, epochs=3))
    before = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in before] == [1, 2]

    with caplog.at_level(logging.INFO, logger="mner.train.engine.loop"):
        train_from_cache(run_config(run_dir, cache_dir, data_dir, epochs=3, resume=True))
    assert f"from {resumed_from} after epoch {resumed_after} " in caplog.text
    after = (run_dir / "metrics.jsonl").read_text().splitlines()
    # The epochs in the checkpoint keep their lines as written (wall-clock seconds included), the rest are redone.
    assert after[:resumed_after] == before[:resumed_after]

    def without_seconds(lines):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert without_seconds(after) == without_seconds((straight / "metrics.jsonl").read_text().splitlines())
    assert json.loads((run_dir / "results.json").read_text()) == json.loads(
        (straight / "results.json").read_text()
    )
    for name in ("model.safetensors", "checkpoint/model.safetensors"):
        x, y = load_file(straight / name), load_file(run_dir / name)
        assert all(torch.equal(x[key], y[key]) for key in x), name
    assert not (run_dir / "checkpoint.old").exists() and not (run_dir / "checkpoint.tmp").exists()


@pytest.mark.parametrize("name", ["state.pt", "model.safetensors"])
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_checkpoint_file_is_one_line_naming_it(tmp_path, name, damage):
    model, optimizer, scheduler, scaler = _state(0)
    folder = tmp_path / "checkpoint"
    save_checkpoint(folder, model, optimizer, scheduler, scaler, Progress(epoch=1), torch.device("cpu"))
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if damage == "truncated" else b"")
    with pytest.raises(ValueError) as raised:
        load_checkpoint(folder, *_state(1))
    message = str(raised.value)
    assert message.startswith(f"{path} cannot be loaded (")
    assert "\n" not in message and f"delete {folder} and run again with --resume" in message
    if damage == "empty":
        assert message.startswith(f"{path} cannot be loaded (empty file)")


NO_SPACE_SAFETENSORS = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
)
NO_SPACE_TORCH = "[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file data/0: file write failed"


def test_a_full_disk_while_saving_weights_is_an_enospc_oserror_and_the_old_file_stays(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"the best epoch so far")

    def full(model, filename):
        open(filename, "wb").write(b"half")  # noqa: SIM115 - what a failing writer leaves
        raise SafetensorError(NO_SPACE_SAFETENSORS)

    monkeypatch.setattr(checkpoint, "save_model", full)
    with pytest.raises(OSError) as raised:
        checkpoint.save_weights(torch.nn.Linear(2, 2), path)
    assert (raised.value.errno, raised.value.filename) == (28, str(path) + ".tmp")
    assert path.read_bytes() == b"the best epoch so far" and sorted(os.listdir(tmp_path)) == [path.name]


def test_a_full_disk_while_saving_the_checkpoint_state_is_an_enospc_oserror(tmp_path, monkeypatch):
    def full(state, filename):
        raise RuntimeError(NO_SPACE_TORCH)  # torch's zip writer says nothing of the disk

    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    model, optimizer, scheduler, scaler = _state(0)
    with pytest.raises(OSError) as raised:
        save_checkpoint(
            tmp_path / "checkpoint", model, optimizer, scheduler, scaler, Progress(), torch.device("cpu")
        )
    assert raised.value.errno == 28 and raised.value.filename.endswith("state.pt")
    assert find_checkpoint(tmp_path / "checkpoint") is None  # nothing half-written is ever found


def test_another_write_failure_keeps_its_own_words(tmp_path, monkeypatch):
    monkeypatch.setattr(
        checkpoint.torch, "save", lambda state, filename: (_ for _ in ()).throw(RuntimeError("bad"))
    )
    monkeypatch.setattr(
        checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 0, 10 << 20)
    )
    with pytest.raises(OSError, match="bad") as raised:
        with checkpoint.writing(tmp_path / "x"):
            checkpoint.torch.save({}, tmp_path / "x")
    assert raised.value.errno == 5
