"""What the commands share: the error net, the data and inference options, and `default`, which reads
an option's default from the config dataclass field behind it (the one place it is written).

Every module imported here is torch-free: `mner --help` and the cache commands never load torch.
"""

from __future__ import annotations

import dataclasses
import errno
import functools

import click

from mner import configs
from mner.cache.datasets import DataConfig
from mner.runtime import AMP_MODES, SettingError
from mner.train.engine.run_files import LONG_POSTS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
# The split a command reads when none is given.
SPLIT = "test"


def default(config: type, name: str):
    """The default of the field `name` of the config dataclass `config`."""
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def user_errors(fn):
    """Turn a ValueError from a stage (bad input, refused cache) into a clean click error: no traceback,
    and the settings a SettingError names spelled as this command's flags (`--data-dir`, not `data_dir`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SettingError as err:
            raise click.ClickException(err.worded(flags(click.get_current_context().command))) from err
        except (ValueError, FileNotFoundError) as err:
            raise click.ClickException(str(err)) from err
        except OSError as err:
            raise click.ClickException(os_error(err)) from err

    return wrapper


def flags(command: click.Command) -> dict[str, str]:
    """Each long option of `command` by the name of the setting it fills: {"data_dir": "--data-dir"}."""
    return {
        param.name: param.opts[0]
        for param in command.params
        if isinstance(param, click.Option) and param.name and param.opts[0].startswith("--")
    }


def os_error(err: OSError) -> str:
    """One line for a file the command could not write or read (full disk, no permission, immutable)."""
    # A failed rename names both files; the second is the one being replaced (an immutable target).
    name = err.filename2 or err.filename
    where = f" {name}" if name else ""
    if err.errno == errno.ENOSPC:
        return (
            f"no space left on the device of{where}: free some space and run the same command again "
            "(what was finished is kept; a training run continues with --resume)"
        )
    return f"cannot write or read{where}: {err.strerror or err}; check its permissions and attributes (chattr -i)"


def data_options(fn):
    """--data-dir DIR | --dataset NAME --data-root DIR, shared by every command that reads a data folder."""
    fn = click.option(
        "--columns",
        metavar="WORD,TAG",
        help="Columns (from 0) of the token and its tag in files with more than two per line, e.g. 0,3 "
        "for CoNLL-2003 [default: exactly token<TAB>tag].",
    )(fn)
    fn = click.option(
        "--image-dir",
        type=click.Path(file_okay=False),
        help="Image folder (default: DATA_DIR/images or DATA_DIR/<name>_images).",
    )(fn)
    fn = click.option(
        "--data-root", type=click.Path(file_okay=False), help="Folder holding the named --dataset."
    )(fn)
    fn = click.option(
        "--dataset", help=f"A dataset named in configs/datasets ({', '.join(configs.dataset_names())})."
    )(fn)
    fn = click.option(
        "--data-dir",
        type=click.Path(file_okay=False),
        help="Folder with train.txt, valid.txt, test.txt and an image folder.",
    )(fn)
    return fn


def data_config(data_dir, dataset, data_root, image_dir, columns=None) -> DataConfig:
    """The DataConfig of data_options' values."""
    return DataConfig(
        data_dir=data_dir, dataset=dataset, data_root=data_root, image_dir=image_dir, columns=columns
    )


def amp_option(fn):
    """--amp for the commands that run a trained model (evaluate, predict)."""
    return click.option(
        "--amp",
        type=click.Choice(AMP_MODES),
        default=None,
        help="Autocast on a GPU [default: the precision the run was trained in].",
    )(fn)


def long_posts_option(fn):
    """--long-posts, for the commands that tag posts with a trained run (evaluate, predict)."""
    return click.option(
        "--long-posts",
        type=click.Choice(LONG_POSTS),
        default=LONG_POSTS[0],
        show_default=True,
        help="Posts longer than the encoder's max_length sub-words: predict the words past it O "
        "(truncate, as training scores), or tag every word by overlapping windows (window).",
    )(fn)
