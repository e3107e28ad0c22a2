"""Plumbing both stages share, in one place: where a process runs and how it writes files.

- `device.py`: `Runtime` (this process's device, autocast dtype and place in a torchrun job),
  `resolve_device` / `resolve_amp` / `resolve_runtime` / `start_runtime`, `usable_cpus` /
  `set_threads`, `seed_everything`, `to_device`.
- `files.py`: `write_atomic` (the one way a JSON or text file is replaced), `fsync_file` /
  `fsync_dir`, and `refuse_inputs_as_output` (the one output guard).
- `folders.py`: `FolderLock` (one writer per folder) and `claim_folder` / `folder_state` (the one
  rule for a folder a command writes: new, empty or ours).
- `progress.py`: `ProgressLog`, `quiet_library_progress`.

Callers import these names from `mner.runtime`. torch is imported inside the functions that need
it: `cache/` writes its manifest through `write_atomic`, and the cache commands (`mner cache
inspect/verify/show`) should not pay for loading torch.
"""

from mner.runtime.device import (
    AMP_MODES,
    DEVICE_PATTERN,
    Runtime,
    cgroup_cpu_quota,
    resolve_amp,
    resolve_device,
    resolve_runtime,
    seed_everything,
    set_threads,
    start_runtime,
    to_device,
    usable_cpus,
)
from mner.runtime.files import fsync_dir, fsync_file, refuse_inputs_as_output, write_atomic
from mner.runtime.folders import (
    LOCK_NAME,
    FolderClaim,
    FolderLock,
    claim_folder,
    folder_state,
    is_our_folder,
    lock_folder,
    marker_owner,
    refuse_dangling_link,
    refuse_locked,
)
from mner.runtime.progress import PROGRESS_INTERVAL_S, ProgressLog, quiet_library_progress

__all__ = [
    "AMP_MODES",
    "DEVICE_PATTERN",
    "LOCK_NAME",
    "PROGRESS_INTERVAL_S",
    "FolderClaim",
    "FolderLock",
    "ProgressLog",
    "Runtime",
    "cgroup_cpu_quota",
    "claim_folder",
    "folder_state",
    "fsync_dir",
    "fsync_file",
    "is_our_folder",
    "lock_folder",
    "marker_owner",
    "quiet_library_progress",
    "refuse_dangling_link",
    "refuse_inputs_as_output",
    "refuse_locked",
    "resolve_amp",
    "resolve_device",
    "resolve_runtime",
    "seed_everything",
    "set_threads",
    "start_runtime",
    "to_device",
    "usable_cpus",
    "write_atomic",
]
