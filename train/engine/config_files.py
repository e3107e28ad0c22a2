"""Stage-two configs read from TOML: a run's settings come from four layers, later ones winning:

    configs/train/base.toml                 every field, with a comment each
    a model file (configs/models/<model.name>.toml)   the keys a seed's model changes
    an experiment file (configs/experiments/no_align.toml, ...)   only the keys it changes
    --set model.qfnet_layers=1 ...          command-line overrides

The model file is the one `model.name` names, wherever that is said: `--model NAME`
(load_run_config's `model`), an experiment file or `--set model.name=...` (the last one wins).
`load_run_config` merges them and returns validated `ModelConfig` and `TrainConfig` objects;
`merge_layers` / `override_layers` / `parse_override` are the one layering rule, which the classifier's
`[classifier]` table (classifier_config.py) and the ablations' `--set` use too.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path

from mner import configs
from mner.train.engine.config import MODELS_DIR, Config, ModelConfig, TrainConfig, check_model_name

# The TOML tables a config file may hold, and the config each one builds.
SECTIONS = {"model": ModelConfig, "train": TrainConfig}


def base_config_path() -> Path:
    """configs/train/base.toml: the commented base every run starts from."""
    return configs.path("train", "base.toml")


def model_file(name: str) -> Path:
    """configs/models/<name>.toml; ValueError listing the models for an unknown name."""
    check_model_name(name)
    return configs.path(MODELS_DIR, f"{name}.toml")


def describe_model(name: str) -> tuple[str, str]:
    """(seed, what it adds): the first two comment lines of the model's file, "# " and an optional
    "seed:" / "adds:" label stripped. ValueError naming the file when it has fewer than two."""
    path = model_file(name)
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    if len(lines) < 2:
        raise ValueError(
            f"{path}: the first two comment lines must say the seed the model follows and what it adds"
        )
    seed, adds = (_strip_label(text, label) for text, label in zip(lines, ("seed", "adds")))
    return seed, adds


def model_setting(name: str, section: str, key: str):
    """What configs/models/<name>.toml sets `section.key` to; None when the file leaves it to the base or
    there is no such model file (a name recorded by a run of a model since removed)."""
    try:
        path = model_file(name)
    except ValueError:
        return None
    return configs.load_toml(path).get(section, {}).get(key)


def _strip_label(text: str, label: str) -> str:
    """ "seed: 000 AFNER" -> "000 AFNER" (label "seed"); text without the label as it is."""
    head, colon, rest = text.partition(":")
    return rest.strip() if colon and head.strip().lower() == label else text


def load_run_config(
    base_toml: str | Path | None = None,
    config_file: str | Path | Sequence[str | Path] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    model: str | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Merge the base TOML, a model file, experiment diffs and `--set` overrides into validated configs.

    Args:
        base_toml: the base file; None means configs/train/base.toml.
        config_file: optional diffs over the base (only the keys they set), e.g.
            configs/experiments/no_align.toml; one path or a list, applied in order.
        overrides: "section.key=value" strings; value is a TOML literal (1, 0.5, true, "x") or a
            bare string (`model.text_encoder=/models/bert`).
        model: a model name (`--model`): its configs/models/<name>.toml is applied right after the base.
            An experiment file or override that sets model.name picks the file instead (last wins).
    Returns:
        (ModelConfig, TrainConfig); ModelConfig.name is the model whose file was applied.
    Raises:
        ValueError naming the file (or the override) and the key for an unknown table or key, a
        malformed override, a value of the wrong type or out of range; listing the models for an
        unknown model name.
    """
    base = Path(base_toml) if base_toml is not None else base_config_path()
    if config_file is None:
        diffs = []
    elif isinstance(config_file, (str, Path)):
        diffs = [Path(config_file)]
    else:
        diffs = [Path(path) for path in config_file]
    layers = [(configs.load_toml(path), str(path)) for path in [base, *diffs]] + override_layers(overrides)
    # The model file sits between the base and the diffs, but any layer may name it: find the name first.
    name = model
    for i, (data, _) in enumerate(layers):
        said = data.get("model", {}).get("name") if isinstance(data.get("model"), dict) else None
        if said is not None and (i > 0 or model is None):
            name = said
    if name is None:
        name = ModelConfig.name
    if not isinstance(name, str):
        raise ValueError(f"model.name must be a string, got {name!r}")
    path = model_file(name)
    layers.insert(1, (configs.load_toml(path), str(path)))
    merged = merge_layers(SECTIONS, layers)
    said = layers[1][0].get("model", {}).get("name", name)
    if said != name:
        raise ValueError(f"{path}: model.name is {said!r}, but this file is the model {name!r}; drop the key")
    merged["model"]["name"] = name
    _text_only_reads_no_vision_blocks(merged["model"], layers)
    return ModelConfig(**merged["model"]), TrainConfig(**merged["train"])


def _text_only_reads_no_vision_blocks(model: dict, layers: list[tuple[dict, str]]) -> None:
    """A model file's vision blocks (MANGO's last 2) belong to the image, which model.text_only = true
    never reads (as it reads none of the file's other image settings): the file's value gives way to 0,
    so `--model mango --text-only` and the text_only ablation arm of MANGO are text-only runs. A value set
    after the file (an experiment, --set) stays, and ModelConfig refuses it beside text_only."""
    key = "vision_trainable_blocks"
    after_the_file = any(key in data.get("model", {}) for data, _ in layers[2:])
    if model.get("text_only") and not after_the_file and key in layers[1][0].get("model", {}):
        model[key] = 0


def merge_layers(sections: dict[str, type[Config]], layers: list[tuple[dict, str]]) -> dict[str, dict]:
    """{section: {key: value}} of TOML-shaped `layers` ((data, where it came from), later ones
    winning), refusing a key outside a table, a section not in `sections` and a key its config lacks."""
    merged: dict[str, dict] = {section: {} for section in sections}
    expected = ", ".join(f"[{s}]" for s in sections)
    for data, source in layers:
        for section, table in data.items():
            if not isinstance(table, dict):
                raise ValueError(
                    f"{source}: key {section!r} is outside a table; put it under {expected.replace(', ', ' or ')}"
                )
            if section not in sections:
                raise ValueError(f"{source}: unknown section [{section}]; expected {expected}")
            sections[section].check_keys(table, source)
            merged[section].update(table)
    return merged


def override_layers(overrides) -> list[tuple[dict, str]]:
    """`--set section.key=value` overrides as layers for `merge_layers`."""
    layers = []
    for text in overrides:
        section, key, value = parse_override(text)
        layers.append(({section: {key: value}}, f"--set {text}"))
    return layers


def parse_override(text: str) -> tuple[str, str, object]:
    """'model.qfnet_layers=1' -> ("model", "qfnet_layers", 1)."""
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not section or not key:
        raise ValueError(f"--set {text}: expected section.key=value, e.g. model.qfnet_layers=1")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        # Not a TOML literal: take it as a bare string (paths, names) rather than make users quote.
        value = raw
    return section, key, value
