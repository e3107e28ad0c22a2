"""The rules both ablations (tagging: ablation_config.py, classification: class_ablation.py) apply
to their arms before any run, and the record a re-run must match (RESOLVED)."""

from __future__ import annotations

import json
import re
from pathlib import Path

# The key of ablation.json holding the resolved settings a re-run into the folder must match.
RESOLVED = "resolved"


def resolved_record(seeds: list[int], cache_dir: str | None, data: dict, arms: dict[str, dict]) -> dict:
    """ablation.json's RESOLVED part: seeds, the cache (absolute), the data and each arm's settings."""
    cache = str(Path(cache_dir).resolve()) if cache_dir is not None else None
    return {"seeds": list(seeds), "cache_dir": cache, "data": data, "arms": arms}


def arm_folder(name: str) -> str:
    """The folder of the arm `name` in its ablation folder: one path part whatever the name holds (a
    grid value or a classifier diff may be a path, as text_encoder=../enc), so no arm writes outside."""
    folder = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    return "_" * len(folder) if set(folder) <= {"."} else folder


def refuse_repeated_arms(names: list[str]) -> None:
    """Runs are stored by arm name: refuse a name given twice, or two names that share a folder."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"experiments {repeated} are given more than once (runs are stored by name)")
    folders: dict[str, str] = {}
    for name in names:
        other = folders.setdefault(arm_folder(name), name)
        if other != name:
            raise ValueError(
                f"experiments {other!r} and {name!r} would share the folder {arm_folder(name)} "
                "(a character outside letters, digits and ._=,+- is written _); give one of them otherwise"
            )


def refuse_identical_arms(settings: dict[str, dict]) -> None:
    """Refuse two arms (name -> the settings its model and training read) that would train the same
    thing: a no-op arm (a weight of a loss the model does not have) or a value written twice."""
    seen: dict[str, str] = {}
    for name, used in settings.items():
        key = json.dumps(used, sort_keys=True)
        if key in seen:
            raise ValueError(
                f"experiments {seen[key]!r} and {name!r} would train the same model the same way (they "
                "differ only in settings the model does not use, or in how a value is written); drop one"
            )
        seen[key] = name


def refuse_seed_and_epochs(keys: list[tuple[str, str]], seed_key: str, epochs_key: str, epochs) -> None:
    """An ablation gives every run its seed (--seeds) and may give every run its epochs (--epochs);
    a setting of either key elsewhere (`keys`: where, section.key) would be overridden in silence."""
    for where, key in keys:
        if key == seed_key:
            raise ValueError(
                f"{where} sets {seed_key}, but the seed comes from --seeds (run k of every arm has "
                "seed k, and each would be overridden); drop it and choose the seeds with --seeds"
            )
        if key == epochs_key and epochs is not None:
            raise ValueError(f"{where} sets {epochs_key}, and so does --epochs {epochs}; drop one of them")
