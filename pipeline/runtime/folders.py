"""Folders a command writes: one writer at a time (`FolderLock`), and the one rule for whether a
command may write a folder at all: new, empty or ours (`claim_folder`, `folder_state`).

See "Reliability rules" in docs/design.md.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
    try:
        data = json.loads((Path(path) / marker).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(key in data for key in keys)


def marker_owner(marker: str, keys: tuple[str, ...]) -> Callable[[Path], str]:
    """The ownership test of a folder whose mark is `marker` holding `keys` (`is_our_folder`), worded
    for `folder_state`: "" when the folder is ours, else "no MARKER with KEY, KEY"."""

    def why_not_ours(path: Path) -> str:
        return "" if is_our_folder(path, marker, keys) else f"no {marker} with {', '.join(keys)}"

    return why_not_ours


def folder_state(
    path,
    why_not_ours: Callable[[Path], str],
    what: str,
    flag: str = "--out",
    hint: str = "",
    check_lock: bool = True,
) -> str:
    """The one rule for a folder a command writes: "new" (absent), "empty" (a lone lock file counts as
    empty) or "ours"; anything else is refused. Reads only: nothing is created or changed.

    Args:
        path: the folder.
        why_not_ours: for a non-empty folder, "" when it is one this command wrote, else what it lacks
            or holds instead (worded to follow "not one of our <what> folders (").
        what: the folder kind, e.g. "run", "feature cache", "demo".
        flag: how the user gave the folder, for the message.
        hint: appended to the refusal's advice (claim_folder's "or --resume with ...").
        check_lock: refuse a folder another command is writing here (`refuse_locked`); False for a
            caller that takes the lock next and words that refusal itself.
    Raises:
        ValueError naming the folder and saying to pick a new or empty one, for a file or a dangling
        symbolic link in its place, a folder another command is writing (rank 0 only: under torchrun
        the other ranks run beside rank 0's lock), and a folder of other files.
    """
    path = Path(path)
    refuse_dangling_link(path, flag)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder; choose a new or empty folder")
    if not path.exists():
        return "new"
    if check_lock and int(os.environ.get("RANK", "0")) == 0:
        refuse_locked(path, flag)
    if not any(entry.name != LOCK_NAME for entry in path.iterdir()):
        return "empty"
    why = why_not_ours(path)
    if why == "":
        return "ours"
    raise ValueError(
        f"{flag} {path} is not empty and is not one of our {what} folders ({why}); nothing in it was "
        f"touched — choose a new or empty folder{hint}"
    )


def claim_folder(
    path,
    marker: str,
    keys: tuple[str, ...],
    resume: bool | None,
    what: str = "run",
    flag: str = "--out",
    finished: str | None = None,
) -> FolderClaim:
    """Check that a command may write the folder `path` (`folder_state`); nothing is created or changed.

    Ours means `path/marker` is a JSON object with every key of `keys` (e.g. a run's config.json with
    model, train, label_names, data_source). A folder another command is writing is refused at once
    (`refuse_locked`); `FolderClaim.create()` then takes the lock itself.
    Args:
        resume: True/False for a command with --resume (ours is refused without it, since the run
            would be overwritten); None for a command that always continues its own folder.
        what, flag: how the message names the folder kind and the command's option.
        finished: the file a finished folder holds (a run's results.json): a refusal of one of ours
            without it says the folder is unfinished.
    Raises:
        ValueError as `folder_state` does, and for one of ours without --resume.
    """
    path = Path(path)
    hint = f", or --resume with a {what} folder this tool wrote" if resume is not None else ""
    state = folder_state(path, marker_owner(marker, keys), what, flag, hint)
    if state == "ours" and resume is False:
        if finished is not None and not (path / finished).is_file():
            raise ValueError(
                f"{path} holds an unfinished {what} ({marker} but no {finished}: it was stopped before "
                f"the end); pass --resume to continue it or choose another {flag}"
            )
        raise ValueError(
            f"{path} already holds a {what} ({marker}); pass --resume to continue it or choose another {flag}"
        )
    return FolderClaim(path, state, flag)


def refuse_dangling_link(path, flag: str = "--out") -> None:
    """Refuse an output path that is a symbolic link to nothing: creating it would fail half-way."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ValueError(
            f"{flag} {path} is a symbolic link to {os.readlink(path)}, which does not exist; create "
            f"its target, remove the link, or choose another {flag}"
        )
