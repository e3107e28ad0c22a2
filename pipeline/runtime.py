"""Plumbing both stages share, in one place: where a process runs and how it writes files.

- `Runtime`: this process's device, autocast dtype and place in a torchrun job.
- `resolve_device` / `resolve_amp` / `resolve_runtime`: one set of rules for `extract-features`
  and `train-from-cache` (auto | cpu | mps | cuda | cuda:N; off | auto | fp16 | bf16).
- `start_runtime`: the same, joining the torchrun process group when WORLD_SIZE > 1;
  `Runtime.close()` leaves it again.
- `usable_cpus` / `set_threads`: torch's intra-op threads from the CPUs this process may use.
- `seed_everything`, `to_device`.
- `ProgressLog`: a long loop's progress, a tqdm bar on a terminal and plain log lines otherwise;
  `quiet_library_progress` silences the bars transformers and the HF hub draw while loading weights.
- `write_atomic`: the one way a JSON or text file is replaced (manifest, run config, results).

torch is imported inside the functions that need it: `cache/` writes its manifest through
`write_atomic`, and the cache commands (`mner cache inspect/verify/show`) should not pay for
loading torch.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Device names both stages accept.
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # fullmatch
# Mixed-precision modes resolve_amp knows; "auto" is bf16 where the GPU supports it, else fp16. Training
# offers them all; extraction all but "auto" (its fingerprint records the mode as given).
AMP_MODES = ("auto", "off", "fp16", "bf16")


@dataclass
class Runtime:
    """Where this process runs: device, autocast dtype and its place in a torchrun job."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype on CUDA; None: full precision
    rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this process created the torchrun process group, so close() destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """torch.autocast with this runtime's dtype, or a no-op context in full precision."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Destroy the process group `start_runtime` created (nothing otherwise)."""
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owns_group = False


def resolve_device(
    name: str, local_rank: int = 0, world_size: int = 1, hint: str = "--device cpu"
) -> torch.device:
    """The torch device of this process.

    Args:
        name: "auto" (cuda:<local_rank> when CUDA is available, else cpu), "cpu", "mps", "cuda"
            (cuda:<local_rank>) or "cuda:N". Under torchrun (world_size > 1) every rank takes its
            own GPU, cuda:<local_rank>, even when "cuda:N" names one (logged when it differs).
        local_rank, world_size: this process's place on its node (torchrun's LOCAL_RANK, WORLD_SIZE).
        hint: how the user asks for the CPU instead, for the error message.
    Raises:
        ValueError for a name outside the list, or a device torch does not see.
    """
    import torch

    if not DEVICE_PATTERN.fullmatch(name):
        raise ValueError(f"device must be auto, cpu, mps, cuda or cuda:N; got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device 'mps' asked for, but torch sees no MPS device; use {hint}")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device; use {hint}")
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    if world_size > 1 and device.index != local_rank:
        log.warning(
            "device %s asked for under torchrun: rank with LOCAL_RANK %d uses its own GPU, cuda:%d",
            name,
            local_rank,
            local_rank,
        )
        device = torch.device(f"cuda:{local_rank}")
    count = torch.cuda.device_count()
    if device.index >= count:
        raise ValueError(f"device {device} asked for, but torch sees {count} CUDA device(s); use {hint}")
    return device


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: None off CUDA or for "off"; "auto" is bf16 where supported, else fp16."""
    import torch

    if amp not in AMP_MODES:
        raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}; got {amp!r}")
    if device.type != "cuda" or amp == "off":
        return None
    bf16 = amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported())
    return torch.bfloat16 if bf16 else torch.float16


def resolve_runtime(
    device: str, amp: str, local_rank: int = 0, world_size: int = 1, hint: str = "--device cpu"
) -> Runtime:
    """Device and autocast dtype of a single process (no process group); see `resolve_device`."""
    resolved = resolve_device(device, local_rank, world_size, hint)
    return Runtime(device=resolved, amp_dtype=resolve_amp(amp, resolved))


def start_runtime(
    device: str, amp: str, hint: str = "--device cpu", timeout: timedelta | None = None, threads: int = 0
) -> Runtime:
    """The runtime of this process; joins the torchrun process group when WORLD_SIZE > 1.

    NCCL on CUDA, gloo otherwise. `timeout`: the process group's (None: torch's default). `threads`:
    torch's intra-op threads (0: `set_threads`' share of the usable CPUs). Call `close()` on the result
    when done: it destroys the group if this call created it.
    """
    import torch
    import torch.distributed as dist

    quiet_library_progress()
    set_threads(threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    runtime = resolve_runtime(device, amp, local_rank, world_size, hint)
    if world_size > 1:
        cuda = runtime.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(runtime.device)  # before the group: NCCL binds to the current device
        if not dist.is_initialized():
            options = {} if timeout is None else {"timeout": timeout}
            dist.init_process_group("nccl" if cuda else "gloo", **options)
            runtime.owns_group = True
        runtime.rank, runtime.world_size = dist.get_rank(), dist.get_world_size()
    return runtime


def usable_cpus(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup's CPU quota, whole CPUs.

    torch (and OpenMP) size their thread pools from the machine's cores; in a container, a batch job
    or under `taskset` that over-subscribes the CPUs this process actually gets, and every op of two
    such trainings side by side waits on the other's threads.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc_cgroup, root)
    return max(1, min(cpus, quota)) if quota is not None else cpus


def cgroup_cpu_quota(proc_cgroup: Path, root: Path) -> int | None:
    """The tightest CPU quota (quota / period, rounded up) on this process's cgroup path, None if none.

    cgroup v2: `cpu.max` ("max 100000" or "150000 100000") in the process's group and each parent;
    cgroup v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us` (-1: none) in the cpu controller's group.
    """
    import math

    try:
        lines = proc_cgroup.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, group = line.split(":", 2)
        group = group.strip("/")
        if controllers == "":  # v2
            folders = [root / group, *(root / group).parents] if group else [root]
            for folder in folders:
                if not folder.is_relative_to(root):
                    break
                text = _read_small(folder / "cpu.max").split()
                if len(text) == 2 and text[0] != "max":
                    quotas.append(math.ceil(int(text[0]) / int(text[1])))
        elif "cpu" in controllers.split(","):  # v1
            for base in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                quota, period = (
                    _read_small(base / group / name) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us")
                )
                if quota.lstrip("-").isdigit() and period.isdigit() and int(quota) > 0 and int(period) > 0:
                    quotas.append(math.ceil(int(quota) / int(period)))
                    break
    return min(quotas) if quotas else None


def _read_small(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        return ""


def set_threads(threads: int = 0) -> int:
    """Set torch's intra-op threads and log how many, beside the CPUs they were chosen from.

    Args:
        threads: the count to use; 0: the CPUs this process may use (`usable_cpus`), shared evenly by
            the torchrun ranks of this machine (LOCAL_WORLD_SIZE), and never more than torch's own
            setting (OMP_NUM_THREADS, or an earlier torch.set_num_threads, is kept when lower).
    Returns:
        the number set.
    """
    import torch

    usable = usable_cpus()
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    chosen = threads or min(torch.get_num_threads(), max(1, usable // ranks))
    torch.set_num_threads(chosen)
    if chosen > usable:
        log.warning(
            "torch threads: %d asked, more than the %d CPU(s) this process may use; the threads will wait "
            "for each other (several times slower: benchmarks/bench_threads.py)",
            chosen,
            usable,
        )
    log.info(
        "torch threads: %d (%s; this process may use %d CPU(s) of the machine's %d)",
        chosen,
        "as asked" if threads else "the usable CPUs" + (f" / {ranks} local ranks" if ranks > 1 else ""),
        usable,
        os.cpu_count() or 1,
    )
    return chosen


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels.

    warn_only: a kernel with no deterministic version warns instead of failing the run.
    """
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # cuBLAS needs this workspace setting for deterministic matmuls; it must be set before CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def to_device(batch: dict, device: torch.device) -> dict:
    """Move every tensor of a batch to `device` (non-tensor values pass through)."""
    import torch

    return {
        key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
        for key, value in batch.items()
    }


def write_atomic(path, text: str) -> Path:
    """Replace the file `path` by `text` (UTF-8) so that a reader, or a kill at any instant, finds
    the old file or the new one, never a part.

    The text goes to `<name>.tmp` beside it (same filesystem), is flushed and fsynced, renamed over
    `path` (os.replace is atomic), and the folder is fsynced so the rename survives a power cut too
    (skipped where a folder cannot be opened, as on Windows). Returns `path` as a Path.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk or an immutable target leaves the old file alone
        raise
    fsync_dir(path.parent)
    return path


def fsync_file(path) -> None:
    """Flush a written file's data to disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path) -> None:
    """Make renames inside folder `path` durable (a folder entry lives in the folder's inode)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


def refuse_inputs_as_output(out, flag: str, files=(), folders=()) -> None:
    """The one output guard: refuse a file path that would overwrite one of the command's inputs, or a
    file of a folder an mner command wrote.

    Args:
        out: the file the command is about to write.
        flag: how the user gave it ("--out", "--png"), for the message.
        files: (what, path) pairs of input files: `out` may not be the same file, however it is spelled
            (relative, through `..` or a symlink, or a hard link: compared with `os.path.samefile`).
        folders: (what, path) pairs of input folders (a run, a cache, a data folder, its image folder):
            `out` may not be the folder itself nor a file or folder that already exists inside it (nor a
            hard link to one); a new file there is fine.
    Any folder above `out` that holds an mner lock file (a run, cache, ablation, cases or plot folder)
    counts as an input folder too, so no command overwrites another's results.json or manifest.json.
    Raises:
        ValueError naming the flag, the output and the input it would overwrite.
    """
    out = Path(out)
    refuse_dangling_link(out, flag)
    target = out.expanduser().resolve()
    for what, path in files:
        path = Path(path)
        if _same_path(out, path):
            raise ValueError(
                f"{flag} {out} is {what} {path}: writing it would overwrite an input of this command; "
                "choose another path"
            )
    written = [("the mner folder", folder) for folder in target.parents if (folder / LOCK_NAME).is_file()]
    for what, path in (*folders, *written):
        path = Path(path)
        folder = path.expanduser().resolve()
        if target == folder or (target.is_relative_to(folder) and os.path.lexists(target)):
            raise ValueError(
                f"{flag} {out} is in {what} {path}, an input of this command, and would replace what is "
                "there; choose a path outside it (or a new file name)"
                if (what, path) in folders
                else f"{flag} {out} is a file of {path}, a folder an mner command wrote, and would replace "
                "it; choose a path outside it (or a new file name)"
            )
        linked = _hard_link_into(target, folder)
        if linked is not None:
            raise ValueError(
                f"{flag} {out} is a hard link to {linked} in {what} {path}: writing it would overwrite an "
                "input of this command; choose another path"
            )


def _hard_link_into(target: Path, folder: Path) -> Path | None:
    """The file inside `folder` that the existing file `target` is a hard link of; None when it is not
    one (only a file with several links is looked for, so the walk is rare)."""
    try:
        stat = target.stat()
    except OSError:
        return None
    if stat.st_nlink < 2 or not folder.is_dir():
        return None
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                other = os.stat(os.path.join(root, name), follow_symlinks=False)
            except OSError:
                continue
            if (other.st_dev, other.st_ino) == (stat.st_dev, stat.st_ino):
                return Path(root) / name
    return None


def _same_path(a: Path, b: Path) -> bool:
    """Whether a and b name the same file (symlinks and hard links included)."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.expanduser().resolve() == b.expanduser().resolve()


# ------------------------------------------------------------------------------------------ locks

# The lock file of a folder a command writes; it stays after the command ends and is never a sign of
# a live writer (only a held lock is).
LOCK_NAME = "mner.lock"
# Lock files (resolved paths) this process holds: POSIX record locks never conflict within one
# process, so a second claim in the same process is refused from here. Paths only, never the locks,
# so that a lock nobody refers to any more is released by its finaliser.
_HELD: dict[str, str] = {}  # resolved lock file -> "pid command" of its holder here


class FolderLock:
    """An exclusive POSIX record lock (fcntl.lockf) on FOLDER/mner.lock while one command writes it.

    A record lock belongs to the process, not to the open file: forked children (DataLoader workers)
    do not inherit it, and the kernel drops it when its process ends in any way (kill -9 included).
    So a dead writer, or its orphaned workers still exiting, never blocks the next run. A flock would
    be inherited by every worker forked while it is held.

    Beware: closing any descriptor of the lock file in the holding process drops its lock, so this
    process never opens a lock file it holds (`_HELD` is checked first).
    """

    def __init__(self, folder, command: str | None = None, flag: str = "--out"):
        folder = Path(folder)
        self.path = folder / LOCK_NAME
        self.key = os.path.realpath(self.path)
        self.fd: int | None = None
        command = command or _command_name()
        if self.key in _HELD:
            raise ValueError(_held_message(folder, _HELD[self.key], flag))
        try:
            fd = _open_lock_file(self.path)
        except OSError as err:
            raise ValueError(
                f"{folder} cannot be written ({err.strerror}): `{command}` writes its files there; make "
                f"the folder writable, or give another {flag} folder"
            ) from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise ValueError(_held_message(folder, holder, flag)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {command}\n".encode(), 0)
        self.fd = fd
        _HELD[self.key] = f"{os.getpid()} {command}"

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is not None:
            _HELD.pop(self.key, None)
            fd, self.fd = self.fd, None
            try:
                fcntl.lockf(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __del__(self):
        self.release()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release()


def lock_folder(folder, command: str | None = None, flag: str = "--out") -> FolderLock:
    """Take `folder`'s write lock, or raise ValueError at once naming the command and pid that hold it.

    `command`: how the holder is named to a second writer (default: the running click command,
    e.g. "mner train-from-cache"). Release it with `.release()` or a `with` block.
    """
    return FolderLock(folder, command, flag)


def refuse_locked(folder, flag: str = "--out") -> None:
    """Raise the refusal `lock_folder` would if another writer holds `folder`; takes nothing, writes
    nothing (a folder without a lock file, or one that cannot be opened, passes)."""
    path = Path(folder) / LOCK_NAME
    if os.path.realpath(path) in _HELD:
        raise ValueError(_held_message(Path(folder), _HELD[os.path.realpath(path)], flag))
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            raise ValueError(_held_message(Path(folder), holder, flag)) from None
        fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _open_lock_file(path: Path) -> int:
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path.parent))
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


def _held_message(folder: Path, holder: str, flag: str) -> str:
    """ "FOLDER is being written by another `mner extract-features` (pid N); ..." from a lock file's
    "pid command" line."""
    pid, _, command = holder.partition(" ")
    who = f"`{command}` (pid {pid})" if pid.isdigit() and command else f"mner command ({holder or 'unknown'})"
    return f"{folder} is being written by another {who}; wait for it to finish, or give another {flag} folder"


def _command_name() -> str:
    """The running CLI command ("mner train-from-cache"); "mner" outside one."""
    try:
        import click
    except ImportError:  # pragma: no cover - click is a dependency
        return "mner"
    context = click.get_current_context(silent=True)
    return context.command_path if context is not None else "mner"


# ------------------------------------------------------------------------------- output folders


@dataclass
class FolderClaim:
    """An output folder a command may write: `state` says what it was when claimed.

    "new" (absent), "empty", or "ours" (it holds our marker file). `create()` makes it and takes its
    write lock (`FolderLock`), so a second writer is refused; `unlock()` gives the lock back when the
    command is done. `release()` removes what this command created, never anything that was there
    before (the folders `create()` made for a "new" one, the contents of an "empty" one, nothing of
    "ours"), and unlocks. A claim that never got the lock removes nothing: another writer owns the folder.
    """

    path: Path
    state: str
    flag: str = "--out"
    _created: Path | None = None  # the topmost folder create() made
    _lock: FolderLock | None = None

    def create(self) -> Path:
        """Make the folder (when new) and lock it; ValueError when another command writes it."""
        if self._lock is not None:
            return self.path
        if not self.path.is_dir():
            top = self.path
            while not top.parent.exists():
                top = top.parent
            self.path.mkdir(parents=True, exist_ok=True)
            self._created = self._created or top
        try:
            self._lock = lock_folder(self.path, flag=self.flag)
        except ValueError:
            self._created = None  # another writer's folder now: never removed by this claim
            raise
        if self.state != "ours" and any(entry.name != LOCK_NAME for entry in self.path.iterdir()):
            # Filled between the claim and the lock by a writer that has finished since.
            self.unlock()
            self._created = None
            raise ValueError(
                f"{self.flag} {self.path} was written by another command while this one started; "
                f"nothing in it was touched — choose another {self.flag}"
            )
        return self.path

    def unlock(self) -> None:
        """Give the folder's write lock back (nothing when not held)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def release(self) -> None:
        import shutil

        if self._lock is None:
            return
        try:
            if self.state == "ours":
                return
            if self._created is not None:
                shutil.rmtree(self._created, ignore_errors=True)
                self._created = None
            elif self.state == "empty" and self.path.is_dir():
                for entry in self.path.iterdir():
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:  # the lock file too: the folder is left as empty as it was found
                        entry.unlink(missing_ok=True)
        finally:
            self.unlock()


def is_our_folder(path, marker: str, keys: tuple[str, ...]) -> bool:
    """Whether `path/marker` is a JSON object holding every one of `keys` (what this tool writes)."""
    import json

    try:
        data = json.loads((Path(path) / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(key in data for key in keys)


def claim_folder(
    path,
    marker: str,
    keys: tuple[str, ...],
    resume: bool | None,
    what: str = "run",
    flag: str = "--out",
    finished: str | None = None,
) -> FolderClaim:
    """Check that a command may write the folder `path`; nothing is created or changed here.

    A folder may be written when it is absent, empty (a lone lock file counts as empty), or ours:
    `path/marker` is a JSON object with every key of `keys` (e.g. a run's config.json with model,
    train, label_names, data_source). A folder another command is writing is refused at once
    (`refuse_locked`); `FolderClaim.create()` then takes the lock itself.
    Args:
        resume: True/False for a command with --resume (ours is refused without it, since the run
            would be overwritten); None for a command that always continues its own folder.
        what, flag: how the message names the folder kind and the command's option.
        finished: the file a finished folder holds (a run's results.json): a refusal of one of ours
            without it says the folder is unfinished.
    Raises:
        ValueError naming the folder, and saying to pick a new or empty one (or --resume), for a
        file or a dangling symbolic link in its place, a folder of other files, one another command
        is writing, or one of ours without --resume.
    """
    path = Path(path)
    refuse_dangling_link(path, flag)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder; choose a new or empty folder")
    if not path.exists():
        return FolderClaim(path, "new", flag)
    if int(os.environ.get("RANK", "0")) == 0:  # only rank 0 of a torchrun job takes the lock
        refuse_locked(path, flag)
    if not any(entry.name != LOCK_NAME for entry in path.iterdir()):
        return FolderClaim(path, "empty", flag)
    if is_our_folder(path, marker, keys):
        if resume is False:
            if finished is not None and not (path / finished).is_file():
                raise ValueError(
                    f"{path} holds an unfinished {what} ({marker} but no {finished}: it was stopped before "
                    f"the end); pass --resume to continue it or choose another {flag}"
                )
            raise ValueError(
                f"{path} already holds a {what} ({marker}); pass --resume to continue it or choose another {flag}"
            )
        return FolderClaim(path, "ours", flag)
    resume_hint = f", or --resume with a {what} folder this tool wrote" if resume is not None else ""
    raise ValueError(
        f"{flag} {path} is not empty and is not one of our {what} folders (no {marker} with "
        f"{', '.join(keys)}); nothing in it was touched — choose a new or empty folder{resume_hint}"
    )


def refuse_dangling_link(path, flag: str = "--out") -> None:
    """Refuse an output path that is a symbolic link to nothing: creating it would fail half-way."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ValueError(
            f"{flag} {path} is a symbolic link to {os.readlink(path)}, which does not exist; create "
            f"its target, remove the link, or choose another {flag}"
        )


# Seconds between two progress lines when stderr is not a terminal (a log file, a batch job's output).
PROGRESS_INTERVAL_S = 10.0


class ProgressLog:
    """Progress of a loop of `total` steps, for a person at a terminal or a log file read later.

    On a terminal (stderr is a tty) a tqdm bar, redrawn in place. Otherwise plain lines through logging
    (`desc: done/total unit (pct%), rate unit/s, ETA h:mm:ss[, postfix]`), never a `\r`: one every
    `interval` seconds (default PROGRESS_INTERVAL_S) and, with `every`, one each `every` steps; and one
    at the end. `enabled=False` (ranks other than 0) shows nothing. Use as a context manager.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "it",
        enabled: bool = True,
        interval: float | None = None,
        every: int | None = None,
        stream=None,
    ):
        from tqdm import tqdm

        stream = sys.stderr if stream is None else stream
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.interval = PROGRESS_INTERVAL_S if interval is None else interval
        self.enabled = enabled
        self.terminal = enabled and stream.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, file=stream, disable=not self.terminal)
        self.done, self.postfix, self.closed = 0, {}, False
        self.started = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.bar.update(n)
        before, self.done = self.done, self.done + n
        if not self.enabled or self.terminal:
            return
        now = time.monotonic()
        step_due = bool(self.every) and before // self.every != self.done // self.every
        if step_due or now - self.last >= self.interval:
            self.last = now
            log.info(self.line(now))

    def set_postfix(self, **values) -> None:
        """Values shown after the counts (e.g. loss=0.1234), on the bar and in the following lines."""
        self.postfix = values
        self.bar.set_postfix(values, refresh=False)

    def line(self, now: float | None = None) -> str:
        """The plain progress line for the current count."""
        elapsed = max((time.monotonic() if now is None else now) - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        eta = "?" if left == float("inf") else str(timedelta(seconds=round(left)))
        percent = 100.0 * self.done / self.total if self.total else 100.0
        text = (
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), "
            f"{rate:.1f} {self.unit}/s, ETA {eta}"
        )
        extra = ", ".join(f"{name}={value}" for name, value in self.postfix.items())
        return f"{text}, {extra}" if extra else text

    def close(self) -> None:
        self.bar.close()
        if self.enabled and not self.terminal and not self.closed:
            log.info(self.line())
        self.closed = True

    def __enter__(self) -> ProgressLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def quiet_library_progress() -> None:
    """Silence the progress bars transformers ("Loading weights") and huggingface_hub draw: a stage
    reports its own progress, and those bars fill a log file with `\r` lines."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency of both stages
        return
    hf_logging.disable_progress_bar()
