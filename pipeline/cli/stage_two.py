"""The stage-two commands that train: `train-from-cache`, `train-classifier`, `models` and `ablate`."""

from __future__ import annotations

import json

import click

from mner.cache.classification import ClassDataConfig
from mner.cli.options import CONTEXT, data_config, data_options, default, user_errors
from mner.train.engine.classifier_config import (
    CLASS_HEADS,
    CLASS_WEIGHTS,
    IMAGE_FEATURES,
    MODES,
    TEXT_POOLS,
    ClassifierConfig,
    ClassifierRunConfig,
    load_classifier_config,
)
from mner.train.report.ablation_config import ABLATIONS, ALL, AblationConfig, list_experiments


def _run_config(
    cache_dir, data, model, text_encoder, config_file, overrides, text_only, epochs, seed, out, resume
):
    from mner.train.engine.config import RunConfig
    from mner.train.engine.config_files import load_run_config

    overrides = list(overrides)
    if text_encoder:
        overrides.append(f"model.text_encoder={json.dumps(text_encoder)}")
    if text_only:
        overrides.append("model.text_only=true")
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if seed is not None:
        overrides.append(f"train.seed={seed}")
    model_cfg, train_cfg = load_run_config(config_file=config_file, overrides=overrides, model=model)
    return RunConfig(
        model=model_cfg, train=train_cfg, cache_dir=cache_dir, data=data, out_dir=out, resume=resume
    )


@click.command("train-from-cache", context_settings=CONTEXT)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False),
    help="Feature cache from extract-features (not needed with --text-only).",
)
@data_options
@click.option(
    "--model",
    help="A model of `mner models` (configs/models/NAME.toml, applied over the base before --config) "
    "[default: from config, afdvqf].",
)
@click.option(
    "--text-encoder", help="minilm | tiny-bert | a local Hugging Face folder [default: from config, minilm]."
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="TOML config diff over configs/train/base.toml.",
)
@click.option("--set", "overrides", multiple=True, help="Override: section.key=value (repeatable).")
@click.option("--text-only", is_flag=True, help="Train without the image; never opens the cache.")
@click.option("--epochs", type=int, help="Number of epochs [default: from config].")
@click.option("--seed", type=int, help="Random seed [default: from config].")
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    help="torch intra-op threads; 0: the CPUs this process may use (affinity, cgroup quota). Two "
    "trainings side by side on a small machine: give each its share [default: from config, 0].",
)
@click.option(
    "--text-cache",
    type=click.Path(file_okay=False),
    help="Root folder of the text-state caches that model.text_frozen_layers > 0 computes once and "
    "reads [default: $MNER_TEXT_CACHE, else ~/.cache/mner/text-states].",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Continue a killed run from its last checkpoint.")
@user_errors
def train_from_cache_cmd(
    cache_dir,
    data_dir,
    dataset,
    data_root,
    image_dir,
    columns,
    model,
    text_encoder,
    config_file,
    overrides,
    text_only,
    epochs,
    seed,
    threads,
    text_cache,
    out,
    resume,
):
    """Stage two: train text encoder + query-guided fusion + CRF from cached tokens.

    The best epoch is chosen on dev F1; valid/test predictions and P/R/F1 go into the run folder.

    \b
    Example:
      mner train-from-cache --cache cache/tw15 --dataset twitter2015 --data-root /data \\
          --set model.qfnet_layers=1 --seed 1 --out runs/tw15_qf1
      mner train-from-cache --cache cache/tw15 --dataset twitter2015 --data-root /data \\
          --model afner --out runs/tw15_afner
    """
    data = data_config(data_dir, dataset, data_root, image_dir, columns)
    overrides = (*overrides, *([f"train.threads={threads}"] if threads is not None else []))
    cfg = _run_config(
        cache_dir, data, model, text_encoder, config_file, overrides, text_only, epochs, seed, out, resume
    )
    cfg.text_cache = text_cache
    data.resolve()  # the data folder exists: checked before torch loads
    from mner.train.engine.loop import train_from_cache

    run_dir = train_from_cache(cfg)
    click.echo(f"run written to {run_dir}")


@click.command("train-classifier", context_settings=CONTEXT)
@click.option(
    "--data-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Classification folder: MVSA train.txt (guid,tag) + data/<guid>.txt|.jpg, or train.csv / val.csv / test.csv.",
)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False),
    help="Feature cache from `extract-features --data-dir` on the same folder, with --vision-trainable-blocks 1 "
    "for the default classifier.vision_trainable_blocks = 1, which trains the ResNet's layer4 (not read with "
    "--mode text).",
)
@click.option(
    "--mode",
    type=click.Choice(MODES),
    help=f"What the head sees [default: from config, {default(ClassifierConfig, 'mode')}].",
)
@click.option(
    "--head",
    type=click.Choice(CLASS_HEADS),
    help=f"Classifier head [default: from config, {default(ClassifierConfig, 'head')}].",
)
@click.option(
    "--text-pool",
    type=click.Choice(TEXT_POOLS),
    help=f"Text feature [default: from config, {default(ClassifierConfig, 'text_pool')}].",
)
@click.option(
    "--image-feature",
    type=click.Choice(IMAGE_FEATURES),
    help="Image feature: the cached global vector or the mean patch token "
    f"[default: from config, {default(ClassifierConfig, 'image_feature')}].",
)
@click.option(
    "--text-encoder", help="minilm | tiny-bert | a local Hugging Face folder [default: from config, minilm]."
)
@click.option(
    "--class-weights",
    type=click.Choice(CLASS_WEIGHTS),
    help=f"Cross-entropy class weights [default: from config, {default(ClassifierConfig, 'class_weights')}].",
)
@click.option(
    "--epochs",
    type=int,
    help=f"Number of epochs [default: from config, {default(ClassifierConfig, 'epochs')}].",
)
@click.option(
    "--seed", type=int, help=f"Random seed [default: from config, {default(ClassifierConfig, 'seed')}]."
)
@click.option(
    "--valid-fraction",
    type=float,
    default=default(ClassDataConfig, "valid_fraction"),
    show_default=True,
    help="Share of train drawn as valid when the folder has no valid split.",
)
@click.option(
    "--split-seed",
    type=int,
    default=default(ClassDataConfig, "seed"),
    show_default=True,
    help="Seed of that draw.",
)
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="TOML file with a [classifier] table."
)
@click.option("--set", "overrides", multiple=True, help="Override: classifier.key=value (repeatable).")
@click.option(
    "--threads",
    type=click.IntRange(min=0),
    help="torch intra-op threads; 0: the CPUs this process may use (affinity, cgroup quota). Two "
    "trainings side by side on a small machine: give each its share [default: from config, 0].",
)
@click.option(
    "--text-cache",
    type=click.Path(file_okay=False),
    help="Root folder of the text-state caches that classifier.text_frozen_layers > 0 computes once and "
    "reads [default: $MNER_TEXT_CACHE, else ~/.cache/mner/text-states].",
)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run folder to write.")
@click.option("--resume", is_flag=True, help="Continue a killed run from its last checkpoint.")
@user_errors
def train_classifier_cmd(
    data_dir,
    cache_dir,
    mode,
    head,
    text_pool,
    image_feature,
    text_encoder,
    class_weights,
    epochs,
    seed,
    valid_fraction,
    split_seed,
    config_file,
    overrides,
    threads,
    text_cache,
    out,
    resume,
):
    """Sentence classification (the BertResNet seed): text, image or both, from one feature cache.

    Accuracy, macro-F1, per-class P/R/F1 and the confusion matrix of valid and test go into the run
    folder; the best epoch is chosen on valid; test_without_label.txt gets pred_test_without_label.txt
    (guid,tag in its order).

    \b
    Example:
      mner extract-features --data-dir mvsa --vision resnet50 --vision-ckpt resnet50.pth \\
          --detector none --vision-trainable-blocks 1 --out cache/mvsa
      mner train-classifier --data-dir mvsa --mode text --out runs/mvsa_text
      mner train-classifier --data-dir mvsa --cache cache/mvsa --mode both --head cnn --out runs/mvsa_cnn
      mner train-classifier --data-dir mvsa --mode text --set classifier.text_frozen_layers=4 \\
          --out runs/mvsa_top2
    """
    from mner.train.engine.classify import train_classifier

    classifier = load_classifier_config(
        config_file,
        overrides,
        mode=mode,
        head=head,
        text_pool=text_pool,
        image_feature=image_feature,
        text_encoder=text_encoder,
        class_weights=class_weights,
        epochs=epochs,
        seed=seed,
        threads=threads,
    )
    data = ClassDataConfig(data_dir, valid_fraction=valid_fraction, seed=split_seed)
    # --mode text never opens --cache (train_classifier records none)
    cfg = ClassifierRunConfig(
        data=data,
        out_dir=out,
        classifier=classifier,
        cache_dir=cache_dir,
        resume=resume,
        text_cache=text_cache,
    )
    run_dir = train_classifier(cfg)
    click.echo(f"run written to {run_dir}")


@click.command("models", context_settings=CONTEXT)
@user_errors
def models_cmd():
    """List the model zoo: each model's name, the seed it follows and what it adds.

    A model is a TOML diff over configs/train/base.toml (configs/models/NAME.toml); pass its name to
    train-from-cache --model or ablate --model / --exp model=NAME.

    \b
    Example:
      mner models
    """
    from mner.train.engine.config import model_names
    from mner.train.engine.config_files import describe_model

    rows = [(name, *describe_model(name)) for name in model_names()]
    widths = [max(len(row[i]) for row in [("name", "seed", ""), *rows]) for i in range(2)]
    for name, seed, adds in [("name", "seed", "adds"), *rows]:
        click.echo(f"{name:<{widths[0]}}  {seed:<{widths[1]}}  {adds}")


@click.command("ablate", context_settings=CONTEXT)
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False),
    help="Feature cache (reused, never re-extracted).",
)
@data_options
@click.option(
    "--exp",
    "experiments",
    multiple=True,
    help=f"{' | '.join(ABLATIONS)} | {ALL} | "
    "model=NAME (a model of `mner models`, as it is) | a config-diff TOML (repeatable; `--list` shows "
    "what each changes).",
)
@click.option(
    "--grid",
    multiple=True,
    help="A sweep axis section.key=v1,v2,... (repeatable): every combination is an arm, crossed with "
    "the --exp experiments (default: full).",
)
@click.option(
    "--list", "list_only", is_flag=True, help="Print every named experiment with its diff, and exit."
)
@click.option(
    "--model",
    help="The model every --exp but model=NAME starts from (`mner models`) [default: from config, afdvqf].",
)
@click.option(
    "--seeds",
    type=int,
    default=default(AblationConfig, "seeds"),
    show_default=True,
    help="Seeds 1..N per experiment; the only source of the seed (a --set, --grid or experiment "
    "that sets train.seed is refused).",
)
@click.option(
    "--text-encoder", help="minilm | tiny-bert | a local Hugging Face folder [default: from config, minilm]."
)
@click.option(
    "--epochs",
    type=int,
    help="Epochs per run [default: from config]; refused beside a --set, --grid or experiment that "
    "sets the epochs (without --epochs those are honoured).",
)
@click.option("--set", "overrides", multiple=True, help="Override for every run: section.key=value.")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Ablation folder (required unless --list); a re-run into it continues it only with the "
    "same settings.",
)
@click.option(
    "--bootstrap",
    type=int,
    default=default(AblationConfig, "bootstrap"),
    show_default=True,
    help="Resamples of the paired bootstrap of each experiment against the first (0: no test).",
)
@user_errors
def ablate_cmd(list_only, out, **options):
    """Run named ablations x seeds on one cache; write ablation.csv and ablation.md (mean ± std, and
    each experiment against the first by a paired bootstrap over posts: dF1, 95% CI, p).

    \b
    Example:
      mner ablate --list
      mner ablate --cache cache/tw15 --dataset twitter2015 --data-root /data \\
          --exp full --exp no_region --exp text_only --seeds 3 --out ablations/tw15
      mner ablate ... --grid model.qfnet_layers=1,2,3 --grid train.lr_fusion=1e-4,3e-4 --out sweeps/qgf
      mner ablate --cache cache/tw15 --dataset twitter2015 --data-root /data \\
          --exp model=afdvqf --exp model=afner --exp model=bert-crf --out ablations/zoo
      mner ablate --cache cache/tw15 --dataset twitter2015 --data-root /data \\
          --model afner --exp full --exp no_slot_type --out ablations/afner
      mner ablate --cache cache/mvsa --data-dir mvsa --exp mode=text --exp mode=image \\
          --exp mode=both --exp mode=both,head=cnn --out ablations/mvsa   # a classification folder
    """
    if list_only:
        click.echo(list_experiments())
        return
    if out is None:
        raise click.UsageError("Missing option '--out' (the ablation folder).")
    from mner.train.report.ablate import ablate

    click.echo(ablate(out_dir=out, **options))
