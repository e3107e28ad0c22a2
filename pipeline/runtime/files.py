"""How a command writes files: atomic replacement, fsync, and the one output guard.

`write_atomic` is the one way a JSON or text artifact is replaced (manifest, run config, results);
`refuse_inputs_as_output` keeps every command from writing over one of its inputs or over a file of
a folder another mner command wrote.
"""

from __future__ import annotations

import os
from pathlib import Path

from mner.runtime.folders import LOCK_NAME, refuse_dangling_link


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
