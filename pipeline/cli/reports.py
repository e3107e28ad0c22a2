"""The commands that read trained runs: `evaluate`, `predict`, `results` and `cases`."""

from __future__ import annotations

import click

from mner.cache.datasets import SPLITS
from mner.cli.options import CONTEXT, SPLIT, amp_option, default, long_posts_option, user_errors
from mner.train.report import significance
from mner.train.report.cases import CasesConfig


@click.command("evaluate", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--split", default=SPLIT, show_default=True, help=" | ".join(SPLITS))
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), help="Cache [default: the run's].")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data folder [default: the run's].")
@amp_option
@long_posts_option
@click.option(
    "--text-cache",
    type=click.Path(file_okay=False),
    help="Root of the text-state caches a run with model.text_frozen_layers > 0 reads, when one holds "
    "this split [default: the run's, else $MNER_TEXT_CACHE, else ~/.cache/mner/text-states].",
)
@user_errors
def evaluate_cmd(run_dir, **options):
    """Score a run on a split (conlleval semantics); writes RUN_DIR/eval/<split>-<UTC time>/results.json
    and pred.conll, leaving the training-time results.json and pred_<split>.conll as they are.

    Refuses a cache whose fingerprint differs from the one the run was trained on.

    \b
    Example:
      mner evaluate runs/tw15_qf1 --split test
    """
    from mner.train.report.evaluate import evaluate

    click.echo(evaluate(run_dir=run_dir, **options))


@click.command("predict", context_settings=CONTEXT)
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--input", "input_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--image-dir", type=click.Path(file_okay=False), help="Images of the new posts.")
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False),
    help="Classifier runs: the cache holding the input's images [default: the run's].",
)
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False))
@amp_option
@long_posts_option
@user_errors
def predict_cmd(run_dir, **options):
    """Tag new posts (IMGID-CoNLL, tags optional); writes CoNLL and JSON spans.

    A multimodal run re-extracts the new images with the extractor recorded in the run (same local weights).
    A classifier run (train-classifier) labels the posts of a split file of a classification folder
    (guid,tag lines, tags may be null) and writes guid,tag in the input's order; their images come from
    --cache (else the run's cache).

    \b
    Example:
      mner predict runs/tw15_qf1 --input new.txt --image-dir new_images --out new.pred.conll
      mner predict runs/mvsa_both --input mvsa/test_without_label.txt --out submission.txt
    """
    from mner.train.report.predict import predict_posts

    out = predict_posts(run_dir=run_dir, **options, extract=_extract_images)
    click.echo(f"predictions written to {out}")


def _extract_images(*args, **kwargs):
    """Stage one for predict's new images (mner.extract.reextract), imported only when a run needs it."""
    from mner.extract.reextract import extract_from_record

    return extract_from_record(*args, **kwargs)


@click.command("results", context_settings=CONTEXT)
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--split", default=SPLIT, show_default=True, help=" | ".join(SPLITS))
@click.option(
    "--bootstrap",
    type=int,
    default=significance.DEFAULT_RESAMPLES,
    show_default=True,
    help="Resamples of the paired bootstrap against the first run (0: no test).",
)
@click.option("--bootstrap-seed", type=int, default=0, show_default=True, help="Seed of the resampling.")
@click.option(
    "--plot",
    type=click.Path(file_okay=False),
    help="Also write PNGs here: learning curves and per-type F1 of tagging runs (a run still training: "
    "its epochs so far), and for an ablation folder its arms with error bars (micro F1; accuracy and "
    "macro F1 of a classifier ablation). Needs matplotlib: pip install 'mner-cache[plot]'.",
)
@user_errors
def results_cmd(bootstrap, **options):
    """Print a table of micro P/R/F1 (percent) for one or more run folders.

    Reads each run's training-time results.json (not `mner evaluate`'s eval/ folders); a run without
    one gets a row whose status says why, e.g. "unfinished (epoch 2/10)". With two or more runs each
    is compared with the first by a paired bootstrap over the posts of pred_<split>.conll: dF1 in
    percentage points, its 95% CI and a two-sided p-value.

    \b
    Example:
      mner results runs/text_only runs/full --split test
      mner results runs/text_only runs/full --bootstrap 10000 --bootstrap-seed 1
      mner results runs/text_only runs/full ablations/tw15 --plot figures/
    """
    from mner.train.report.results import results

    if bootstrap < 0:
        raise click.BadParameter(f"must be >= 0 (0: no test), got {bootstrap}", param_hint="--bootstrap")
    report = results(bootstrap=bootstrap, **options)
    if report:
        click.echo(report)


@click.command("cases", context_settings=CONTEXT)
@click.argument("run_a", type=click.Path(exists=True, file_okay=False))
@click.argument("run_b", type=click.Path(exists=True, file_okay=False))
@click.option("--split", default=default(CasesConfig, "split"), show_default=True, help=" | ".join(SPLITS))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for index.html, the PNGs and cases.json (new, empty, or an earlier cases folder).",
)
@click.option(
    "--limit",
    type=int,
    default=default(CasesConfig, "limit"),
    show_default=True,
    help="Posts shown, best ranked first (0: every post that differs).",
)
@click.option(
    "--ids", multiple=True, help="Show the post with this image key instead of the ranking (repeatable)."
)
@click.option(
    "--image-dir",
    type=click.Path(file_okay=False),
    help="Raw images to draw on (under the cached regions, or alone when neither run has a cache) "
    "[default: the image folder RUN_B was trained with].",
)
@user_errors
def cases_cmd(out, ids, **options):
    """Write an HTML page of the posts where RUN_B's predictions differ from RUN_A's.

    Posts are ranked by the gold spans B fixes minus those it breaks. Each shows the image with its
    cached regions (from either run's cache; a placeholder that says why when there is none), and
    the gold, A and B spans by type with wrong spans struck through. Prints the counts of spans
    fixed, broken and changed in type, and of posts that differ.

    \b
    Example:
      mner cases demo_out/runs/text_only demo_out/runs/afdvqf --out demo_out/cases
      mner cases runs/text runs/full --split valid --ids 1015799 --ids 1017446 --out cases/picked
    """
    from mner.train.report.cases import case_study

    click.echo(case_study(CasesConfig(out_dir=out, ids=list(ids), **options)))
