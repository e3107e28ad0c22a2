"""Stage one: images -> tokens.

`config.ExtractConfig` says what to extract, `images.load_image` decodes safely, `models` loads CLIP and
the Faster R-CNN (or the tiny presets), and `run.extract_features(cfg) -> Path` writes the cache
through `cache/`.
"""
