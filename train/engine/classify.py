"""Sentence-level classification from the cache (the BertResNet seed):
`train_classifier(ClassifierRunConfig) -> run folder`.

The data is a classification folder (cache/classification.py: MVSA `train.txt` ... or `train.csv`
...), its images extracted once by `mner extract-features` (keys are guids; `--vision resnet50
--vision-ckpt FILE --detector none` gives the seed's ResNet avgpool vector as the global embedding).
`mode` text trains on the text alone and never opens the cache; image reads only the cache (no text
encoder); both reads the two. The model is train/zoo/classifier_model.py's.

With image_norm "standard" (the default) the image feature is standardised with the train split's
per-dimension statistics (classifier_data.image_statistics), held in the model's buffers.

With classifier.vision_trainable_blocks = k > 0 (the default 1: layer4 of a ResNet cache) the cache must
store the state before the last k vision blocks (`extract-features --vision-trainable-blocks k`; refused
otherwise by runs.trainable_vision_blocks, the rule tagging applies): the batches carry it, the blocks
train at classifier.lr_vision, and config.json's "cache" holds their config ("vision_blocks") so that
evaluate and predict rebuild them; their trained weights are in model.safetensors.

The best epoch is chosen on the valid split (`select`: macro-F1 by default, or accuracy); its
weights are reloaded at the end to score valid and test. The run folder:

    config.json          {"task": "classification", "classifier", "data", "cache_dir", "label_names",
                          "encoder_dir", "cache" (fingerprint, spec; null in text mode), "data_report",
                          "data_files" (sha256 of each split file, and "data/" of the MVSA texts:
                          evaluate refuses a folder changed since, runs.check_data_files), "no_image" (posts per split without a usable
                          image), "truncated_posts", "text_cache", "text_states" ({split: the
                          text-state cache read with classifier.text_frozen_layers > 0; {} without)}
    model.safetensors    the best epoch's weights
    metrics.jsonl        one line per epoch: train loss, valid accuracy / macro-F1, best, seconds
    results.json         {"best_epoch", "epochs_run", <split>: classification_scores} for valid, test
    pred_<split>.csv     guid,gold,pred per post of valid / test, in file order
    pred_<split>.txt     the seed's submission file (guid,tag in the input's order) of an unlabelled split:
                          pred_test_without_label.txt (MVSA), pred_test.txt (an unlabelled test.csv)
    pred_test.seed.csv   for a test.csv, labelled or not: that file with its tag column filled in, the
                          seed notebook's output form (cache.classification.write_seed_form)

The training loop is the one both tasks share (train/engine/loop.py `fit`), with its checkpoint/: the folder
must be new, empty, or (with --resume) one of ours, a run that fails before its first epoch removes
what it created, a killed one continues with --resume, and torchrun trains on every rank. A
non-finite loss stops training naming the epoch and step. `mner evaluate` and `mner predict` of a
classifier run are train/report/evaluate.py's and train/report/predict.py's, through `load_classifier_run`.

The classification task's preparation for the shared loop and the reloading of a run, as
train/engine/tagging.py is tagging's; its batches are train/engine/classifier_data.py's (as data.py is
tagging's), its settings train/engine/classifier_config.py's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from mner.cache.classification import (
    UNLABELLED_SPLIT,
    ClassData,
    ClassSplit,
    read_classification,
    seed_form_file,
    split_files,
    write_predictions,
    write_seed_form,
)
from mner.cache.reader import CacheReader
from mner.cache.spec import TokenSpec
from mner.cache.verify import image_size_mismatches
from mner.runtime import start_runtime, to_device
from mner.train.engine.classifier_config import ClassifierConfig, ClassifierRunConfig
from mner.train.engine.classifier_data import (
    ClassPosts,
    image_statistics,
    post_loader,
    text_states_of,
)
from mner.train.engine.loop import Fitting, run_training
from mner.train.engine.run_files import (
    CONFIG_FILE,
    check_fingerprint,
    claim_run_folder,
    data_files_record,
    extractor_differences,
    load_run,
    write_json,
)
from mner.train.engine.runs import (
    load_run_model,
    prepare_folder,
    record_vision_blocks,
    report_images,
    trainable_vision_blocks,
)
from mner.train.engine.tasks import SENTENCE_CLASSIFICATION
from mner.train.zoo.classifier_model import (
    ClassifierHead,
    SentenceClassifier,
    reads_tokens,
)
from mner.train.zoo.text import check_max_length, load_encoder, load_tokenizer, resolve_text_encoder
from mner.train.zoo.vision_blocks import build_vision_blocks

log = logging.getLogger(__name__)

TASK = SENTENCE_CLASSIFICATION.name  # config.json "task" of a classifier run
# The settings a resume may change: how a run is carried out, not what it trains (as config.RUNTIME_SETTINGS).
CLASS_RUNTIME_SETTINGS = frozenset(
    {"classifier.epochs", "classifier.patience", "classifier.device", "classifier.threads"}
)
_SHOWN_GUIDS = 5  # guids named in a warning about many posts


# ------------------------------------------------------------------------------------------ entry


def train_classifier(cfg: ClassifierRunConfig) -> Path:
    """Train one sentence classifier and write its run folder (see the module docstring), through the
    training loop both tasks share (train/engine/loop.py `fit`).

    Raises:
        ValueError when the folder is neither new, empty nor (with resume) one of ours, the data is
        malformed (DatasetError, `file:line`), the cache lacks a post's guid (it was extracted from other
        data), a resumed folder was made with other settings (but CLASS_RUNTIME_SETTINGS), the loss
        becomes non-finite (naming epoch and step), or a setting is out of range.
    """
    claim = claim_run_folder(cfg.out_dir, cfg.resume, SENTENCE_CLASSIFICATION)
    c = cfg.classifier
    if c.mode != "image":  # before the data is read: a budget past the positions fails only in the forward
        check_max_length(resolve_text_encoder(c.text_encoder), c.max_length, "classifier.max_length")
    return run_training(
        claim,
        c.seed,
        start=lambda: start_runtime(c.device, "off", hint="--set classifier.device=cpu", threads=c.threads),
        prepare=lambda runtime, resources: _prepare(cfg, runtime, claim, resources),
    )


def check_vision_state(cfg: ClassifierRunConfig) -> None:
    """Refuse a cache without the vision state the run's trained blocks start from, as the run itself
    does (runs.trainable_vision_blocks): what an ablation checks of each arm before its first."""
    c = cfg.classifier
    if not c.trained_blocks or cfg.cache_dir is None:
        return  # no blocks train; a both / image run without a cache is refused by the run itself
    with CacheReader(cfg.cache_dir) as reader:
        trainable_vision_blocks(
            c.trained_blocks, reader, cfg.data.data_dir, "classifier.vision_trainable_blocks", load=False
        )


def _open_cache(cfg: ClassifierRunConfig, data: ClassData) -> CacheReader | None:
    """The cache (None in text mode, never opened), refused when it lacks a post's guid."""
    if cfg.classifier.mode == "text":
        return None
    reader = CacheReader(cfg.cache_dir)
    hint = (
        "the cache was extracted from other data — run `mner extract-features --data-dir "
        f"{cfg.data.data_dir}`"
    )
    try:
        for split in data.splits.values():
            check_guids_cached(split, reader, hint)
    except ValueError:
        reader.close()
        raise
    paths = {e.guid: e.image for split in data.splits.values() for e in split.examples}
    differing = image_size_mismatches(reader.cache_dir, paths)
    if differing:
        log.warning(
            "%d of %d images have another size than %s recorded (%s%s): they changed, or moved between "
            "posts, since extraction, so those posts train on other images' tokens; check with `mner cache "
            "verify %s --data-dir %s --images` and re-extract",
            len(differing),
            len(paths),
            reader.cache_dir,
            ", ".join(differing[:_SHOWN_GUIDS]),
            " ..." if len(differing) > _SHOWN_GUIDS else "",
            reader.cache_dir,
            cfg.data.data_dir,
        )
    return reader


def _prepare(cfg: ClassifierRunConfig, runtime, claim, resources) -> tuple[Fitting, Path | None]:
    """The classification task's data, model and loaders; creates the folder and writes config.json."""
    c = cfg.classifier
    data = read_classification(cfg.data)
    reader = _open_cache(cfg, data)
    if reader is not None:
        resources.callback(reader.close)
    # Before the folder is made: a cache without the vision state would only leave a half-made run.
    vision = trainable_vision_blocks(
        c.trained_blocks, reader, cfg.data.data_dir, "classifier.vision_trainable_blocks"
    )
    labels = SENTENCE_CLASSIFICATION.label_names(data.labels)
    encoder_dir = resolve_text_encoder(c.text_encoder) if c.mode != "image" else None
    weights = _class_weights(data.splits["train"], labels) if c.class_weights == "balanced" else None
    model, tokenizer = build_classifier(
        c, len(labels), encoder_dir, reader.spec if reader else None, weights, *(vision or (None, None))
    )
    if model.standardises:
        # From the cached, frozen features also when vision blocks train: their output at the first step
        # is those features (to float16 rounding), so the first step sees the frozen model's input, and
        # the statistics stay fixed, a part of the model like its weights (SentenceClassifier).
        model.set_image_statistics(*image_statistics(data.splits["train"], reader, c))
    model = model.to(runtime.device)

    scored = [name for name in ("valid", "test") if name in data.splits and data.splits[name].labelled]
    record = {
        "task": TASK,
        **cfg.to_dict(),
        # absolute, so that evaluate and predict find them from any working folder
        "data": {**cfg.data.to_dict(), "data_dir": str(Path(cfg.data.data_dir).expanduser().resolve())},
        "cache_dir": str(Path(cfg.cache_dir).expanduser().resolve()) if reader is not None else None,
        "label_names": labels,
        "encoder_dir": str(encoder_dir) if encoder_dir is not None else None,
        "cache": None
        if reader is None
        else {
            "fingerprint": reader.fingerprint,
            "spec": reader.spec.to_dict(),  # the manifest's form, as extractor_differences compares it
            "models": reader.models,
        },
        "data_report": {
            "layout": data.report.layout,
            "fallbacks": data.report.fallbacks,
            "split_made": data.report.split_made,
            "sizes": {name: len(split.examples) for name, split in data.splits.items()},
            "train_labels": data.splits["train"].label_counts(),
        },
        "data_files": data_files_record(split_files(cfg.data.data_dir)),
        "no_image": {}
        if reader is None
        else report_images(
            {name: [e.guid for e in split.examples] for name, split in data.splits.items()},
            reader,
            "a zero image vector" if c.mode == "image" else "the text alone",
            image_only=c.mode == "image",
        ),
        "truncated_posts": _truncated(data, tokenizer, c.max_length),
        "class_weights": None if weights is None else dict(zip(labels, weights.tolist())),
    }
    record_vision_blocks(record, vision)
    if any(record["truncated_posts"].values()):
        log.warning("posts longer than %d sub-words (cut): %s", c.max_length, record["truncated_posts"])
    checkpoint = prepare_folder(
        claim, cfg.resume, record, runtime, SENTENCE_CLASSIFICATION.resume_keys, CLASS_RUNTIME_SETTINGS
    )
    text_states = text_states_of(cfg, model, data, tokenizer, encoder_dir, runtime)
    record["text_states"] = {name: str(states.folder) for name, states in text_states.items()}
    if runtime.is_main:
        write_json(claim.path / CONFIG_FILE, record)

    # One process: the loader shuffles with its own generator (checkpointed); under torchrun each rank
    # reads its DistributedSampler shard.
    sampler = None
    if runtime.world_size > 1:
        sampler = DistributedSampler(
            ClassPosts(data.splits["train"], None, {}, False, False),
            num_replicas=runtime.world_size,
            rank=runtime.rank,
            shuffle=True,
            seed=c.seed,
        )
    train_loader = post_loader(
        data.splits["train"],
        reader,
        labels,
        tokenizer,
        c,
        sampler is None,
        c.seed,
        sampler,
        text_states.get("train"),
    )

    def score(model, name: str):
        return score_split(
            model, data.splits[name], reader, tokenizer, c, runtime, labels, text_states.get(name)
        )

    def finish(model) -> None:
        for name, split in data.splits.items():
            seed_form = name == "test" and has_seed_form(split)
            if split.labelled and not seed_form:
                continue
            predicted = predict_split(
                model, split, reader, tokenizer, c, runtime, labels, text_states.get(name)
            )
            if not split.labelled:  # test_without_label.txt, or a test.csv whose tags are all empty / null
                write_predictions(claim.path / submission_file(name), split.examples, predicted)
            if seed_form:
                write_seed_form(seed_form_file(claim.path / submission_file(name)), split.path, predicted)

    fitting = Fitting(
        task=SENTENCE_CLASSIFICATION,
        select=c.select,
        settings=c,
        model=model,
        param_groups=param_groups(model, c),
        loader=train_loader,
        splits=data.splits,
        score=score,
        scored=tuple(scored),
        sampler=sampler,
        generator=train_loader.generator,
        schedule=c.schedule,
        results={"select": c.select},
        finish=finish,
    )
    return fitting, checkpoint


def build_classifier(
    c: ClassifierConfig,
    num_labels: int,
    encoder_dir,
    spec: TokenSpec | None,
    class_weights=None,
    vision_blocks: dict | None = None,
    vision_weights: dict | None = None,
) -> tuple[SentenceClassifier, object]:
    """(the classifier of config `c`, its tokenizer or None in image mode), sized by the cache's `spec`
    (None in text mode); the encoder starts from `encoder_dir`'s weights. With c.trained_blocks > 0 the
    vision blocks are built from their config `vision_blocks` (the cache's) with `vision_weights` (the
    cache's, to start training) or freshly initialised (for a run's model.safetensors)."""
    encoder = tokenizer = None
    if c.mode != "image":
        tokenizer, encoder = load_tokenizer(encoder_dir), load_encoder(encoder_dir)
    text_dim = encoder.config.hidden_size if encoder is not None else 0
    image_dim = 0
    if spec is not None:
        tokens = c.image_feature == "patches" or reads_tokens(c.head, c.mode)
        image_dim = spec.patch_dim if tokens else spec.global_dim
    head = ClassifierHead(
        c.head, c.mode, text_dim, image_dim, num_labels, c.hidden_size, c.dropout, c.attention_heads
    )
    blocks = None
    if c.trained_blocks and spec is not None:
        assert vision_blocks is not None, "trainable_vision_blocks gives the config of the blocks"
        reads_global = c.image_feature == "global" and not reads_tokens(c.head, c.mode)
        blocks = build_vision_blocks(vision_blocks, vision_weights, c.trained_blocks, reads_global)
    model = SentenceClassifier(
        encoder,
        head,
        c.text_pool,
        class_weights,
        c.image_norm,
        image_dim,
        vision_blocks=blocks,
        image_feature=c.image_feature,
        vision_batchnorm=c.vision_batchnorm,
        frozen_layers=c.text_frozen_layers,
        encoder_name=c.text_encoder,
    )
    return model, tokenizer


def submission_file(split: str) -> str:
    """The seed's submission file (guid,tag in the input's order) of an unlabelled split."""
    return f"pred_{split}.txt"


SUBMISSION_FILE = submission_file(UNLABELLED_SPLIT)  # the MVSA layout's test_without_label.txt


def has_seed_form(split: ClassSplit) -> bool:
    """Whether `split` was read from a csv file of its own (test.csv, val.csv; not a valid split drawn
    from train.csv), so its predictions are also written in the seed's form (write_seed_form)."""
    return split.path.suffix.lower() == ".csv" and split.path.stem in ("test", "val")


def param_groups(model: SentenceClassifier, c: ClassifierConfig) -> list[dict]:
    """AdamW groups: encoder at lr_encoder, head at lr_head, the trainable vision blocks at lr_vision,
    weight decay on every parameter (biases, LayerNorm and the ResNet's BatchNorm too), as the BertResNet
    notebook's AdamW(model.parameters(), weight_decay=0.01) over its text encoder and ResNet (cell 39)."""
    groups = []
    for part, lr in (("encoder.", c.lr_encoder), ("head.", c.lr_head), ("vision_blocks.", c.lr_vision)):
        params = [p for name, p in model.named_parameters() if name.startswith(part) and p.requires_grad]
        if params:
            groups.append({"params": params, "lr": lr, "weight_decay": c.weight_decay})
    return groups


def _class_weights(train: ClassSplit, labels: list[str]) -> torch.Tensor:
    """n / (L * count) per label (scikit-learn's "balanced"): (L,) float32."""
    counts = train.label_counts()
    n = sum(counts.values())
    return torch.tensor([n / (len(labels) * counts[label]) for label in labels], dtype=torch.float32)


def _truncated(data: ClassData, tokenizer, max_length: int) -> dict:
    if tokenizer is None:
        return {}
    return {
        name: sum(len(ids) > max_length for ids in tokenizer([e.text for e in split.examples])["input_ids"])
        for name, split in data.splits.items()
    }


@torch.no_grad()
def predict_split(model, split, reader, tokenizer, c, runtime, labels, text_states=None) -> list[str]:
    """The predicted label of every example of `split`, in file order; with classifier.text_frozen_layers
    > 0 the frozen bottom's states are read from `text_states` (the split's cache) or computed here."""
    model.eval()
    predicted = []
    for batch in post_loader(split, reader, labels, tokenizer, c, False, c.seed, text_states=text_states):
        logits = model(to_device({k: v for k, v in batch.items() if k != "labels"}, runtime.device))["logits"]
        predicted.extend(labels[i] for i in logits.argmax(1).tolist())
    return predicted


def score_split(
    model, split, reader, tokenizer, c, runtime, labels, text_states=None
) -> tuple[list[str], dict]:
    predicted = predict_split(model, split, reader, tokenizer, c, runtime, labels, text_states)
    return predicted, SENTENCE_CLASSIFICATION.score([e.label for e in split.examples], predicted, labels)


def rebuild_classifier(record: dict) -> tuple[SentenceClassifier, object]:
    """(a fresh classifier as a run record describes it, its tokenizer or None): the classification
    task's `rebuild` (runs.load_run_model loads the best weights into it)."""
    c = classifier_settings(record, CONFIG_FILE)
    spec = TokenSpec.from_dict(record["cache"]["spec"]) if record["cache"] else None
    vision = record["cache"].get("vision_blocks") if record["cache"] else None
    return build_classifier(c, len(record["label_names"]), record["encoder_dir"], spec, None, vision)


def classifier_settings(record: dict, source: str) -> ClassifierConfig:
    """The ClassifierConfig a run record holds. A run recorded before vision_trainable_blocks existed read
    the cached image vector: its missing key means 0, not today's default."""
    return ClassifierConfig.from_dict({"vision_trainable_blocks": 0, **record["classifier"]}, source)


def load_classifier_run(run_dir, device: str):
    """For evaluate and predict: (the classifier run in `run_dir`, its classifier config, its best model, its tokenizer, the
    runtime); ValueError when the folder is not a classifier run."""
    run = load_run(run_dir)
    if run.task is not SENTENCE_CLASSIFICATION:
        raise ValueError(f"{run_dir} is a {run.task.kind} of task {run.task.name}, not a classifier run")
    runtime = start_runtime(device, "off", hint="--device cpu")
    try:
        model, tokenizer = load_run_model(run.path, run.record, runtime)
    except BaseException:
        runtime.close()
        raise
    c = classifier_settings(run.record, str(run.path / CONFIG_FILE))
    return run, c, model, tokenizer, runtime


def open_run_cache(run, cache_dir, same_keys: bool) -> CacheReader | None:
    """The cache a classifier run reads (None in text mode): `cache_dir` or the run's. With `same_keys`
    it must be the run's cache (runs.check_fingerprint); else (new posts) made by the run's extractor."""
    record = run.record
    if record["cache"] is None:
        return None
    # a record that spelt the spec with every field (empty vision-state fields included) compares as the
    # manifest's form
    spec = TokenSpec.from_dict(record["cache"]["spec"]).to_dict()
    record = {**record, "cache": {**record["cache"], "spec": spec}}
    reader = CacheReader(cache_dir or record["cache_dir"])
    try:
        if same_keys:
            check_fingerprint(reader, record, run.path)
        else:
            differs = extractor_differences(reader, record)
            if differs:
                raise ValueError(
                    f"the cache at {reader.cache_dir} was extracted otherwise than {run.path}'s cache; "
                    f"differs: {'; '.join(differs)}; extract it with the settings recorded in "
                    f"{record['cache_dir']}/manifest.json"
                )
    except ValueError:
        reader.close()
        raise
    return reader


def check_guids_cached(split: ClassSplit, reader: CacheReader | None, hint: str) -> None:
    absent = [e for e in split.examples if reader is not None and e.guid not in reader]
    if absent:
        raise ValueError(
            f"{split.path}:{absent[0].line}: guid {absent[0].guid!r} is not in the cache at {reader.cache_dir} "
            f"({len(absent)} of {len(split.examples)} posts are absent); {hint}"
        )
