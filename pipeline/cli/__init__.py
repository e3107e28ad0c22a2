"""The `mner` command line: each command parses its options, calls one stage entry function and prints
what it returns.

The commands live by stage: stage_one.py (demo-data, extract-features, cache inspect/show/verify),
stage_two.py (train-from-cache, train-classifier, models, ablate), reports.py (evaluate, predict,
results, cases); options.py holds what they share. An option's default and choices are read from the
config dataclass and registry behind it, all torch-free; a stage's model code is imported inside its
command, so `mner --help` is quick and a cache command never loads torch.
"""

from __future__ import annotations

import logging

import click

from mner.cli import reports, stage_one, stage_two
from mner.cli.options import CONTEXT


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="mner-cache")
def main():
    """Two-stage multimodal NER: extract image tokens once into a cache, then train from the cache.

    \b
    Example (the embedded demo, untrained tiny vision models):
      mner demo-data --out demo_out/data
      mner extract-features --data-dir demo_out/data --clip tiny-clip --detector tiny-frcnn --out demo_out/cache
      mner train-from-cache --cache demo_out/cache --data-dir demo_out/data --out demo_out/runs/full
      mner evaluate demo_out/runs/full --split test
    """
    # The stages report progress (skipped shards, epochs, reused data, summaries) through logging.
    logging.basicConfig(level=logging.INFO, format="%(message)s")


for command in (
    stage_one.demo_data_cmd,
    stage_one.extract_features_cmd,
    stage_one.cache,
    stage_two.train_from_cache_cmd,
    stage_two.train_classifier_cmd,
    stage_two.models_cmd,
    stage_two.ablate_cmd,
    reports.evaluate_cmd,
    reports.predict_cmd,
    reports.results_cmd,
    reports.cases_cmd,
):
    main.add_command(command)
