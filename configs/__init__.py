"""The TOML configs shipped with the package, and the helpers that find and read them.

`datasets/<name>.toml` describes where a named dataset lives under `--data-root`; `train/base.toml` is
the commented training base and `experiments/<name>.toml` are small diffs over it.
"""

import tomllib
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def path(*parts: str) -> Path:
    """Path of a file under the config folder: `path("datasets", "twitter2015.toml")`."""
    return CONFIG_DIR.joinpath(*parts)


def load_toml(path: str | Path) -> dict:
    """Read a TOML file into a dict; a missing or malformed file raises ValueError naming it."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{file}: config file not found")
    try:
        with file.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{file}: invalid TOML: {e}") from None


def dataset_names() -> list[str]:
    """Names that `--dataset` accepts: one per `datasets/<name>.toml`, sorted."""
    return sorted(p.stem for p in path("datasets").glob("*.toml"))
