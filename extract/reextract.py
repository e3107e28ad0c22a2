"""Stage one again, for posts a finished run has never seen: the extraction a cache recorded, rerun.

`mner predict` tags new posts with a multimodal run; their images must become tokens through the very
extractor the run's cache was made with. Stage two never imports stage one, so the CLI hands this
function to `mner.train.report.predict.predict` (its `extract` argument).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mner.extract.config import CLIP_PRESETS, ExtractConfig
from mner.extract.run import extract_features


def extract_from_record(recorded: dict, origin: str, **overrides) -> Path:
    """Run `extract_features` with the settings a cache recorded, `overrides` replacing some.

    Args:
        recorded: a cache's recorded extraction config (manifest "config"); keys that are not
            ExtractConfig fields (derived values such as fingerprint_parts) are ignored.
        origin: who asks, for the error ("run runs/x").
        overrides: ExtractConfig fields to replace: data, out, splits, overwrite, device.
    Returns:
        the new cache folder.
    Raises:
        ValueError when a weight file the recorded config names does not exist here.
    """
    for name in ("clip", "detector_ckpt"):
        value = recorded.get(name)
        if value and value not in CLIP_PRESETS and not Path(value).expanduser().exists():
            raise ValueError(
                f"{origin} was trained on tokens from {name} {value}, which does not exist here; "
                "predict re-extracts the images and needs the same local weights"
            )
    fields = {field.name for field in dataclasses.fields(ExtractConfig)}
    settings = {name: value for name, value in recorded.items() if name in fields}
    settings.update(overrides)
    return extract_features(ExtractConfig(**settings))
