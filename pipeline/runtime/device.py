"""Where a process runs: device, autocast dtype, its place in a torchrun job, threads and seeds.

One set of rules for `extract-features` and `train-from-cache` (auto | cpu | mps | cuda | cuda:N;
off | auto | fp16 | bf16); see "Runtime" in docs/design.md. torch is imported inside the functions
that need it, so importing `mner.runtime` stays cheap for the cache commands.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from mner.runtime.progress import quiet_library_progress

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mner.runtime")  # one logger for the package, as its users name it

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
