"""Sentence-level classification from the cache (the BertResNet seed):
`train_classifier(ClassifierRunConfig) -> run folder`.

The data is a classification folder (cache/classification.py: MVSA `train.txt` ... or `train.csv`
...), its images extracted once by `mner extract-features` (keys are guids; `--vision resnet50
--vision-ckpt FILE --detector none` gives the seed's ResNet avgpool vector as the global embedding).
`mode` text trains on the text alone and never opens the cache; image reads only the cache (no text
encoder); both reads the two. The model is train/classifier_model.py's.

The best epoch is chosen on the valid split (`select`: macro-F1 by default, or accuracy); its
weights are reloaded at the end to score valid and test. The run folder:

    config.json          {"task": "classification", "classifier", "data", "cache_dir", "label_names",
                          "encoder_dir", "cache" (fingerprint, spec; null in text mode), "data_report",
                          "data_files" (sha256 of each split file: evaluate refuses a folder changed
                          since, runs.check_data_files), "no_image" (posts per split without a usable
                          image), "truncated_posts"}
    model.safetensors    the best epoch's weights
    metrics.jsonl        one line per epoch: train loss, valid accuracy / macro-F1, best, seconds
    results.json         {"best_epoch", "epochs_run", <split>: classification_scores} for valid, test
    pred_<split>.csv     guid,gold,pred per post of valid / test, in file order
    pred_<split>.txt     the seed's submission file (guid,tag in the input's order) of an unlabelled split:
                          pred_test_without_label.txt (MVSA), pred_test.txt (an unlabelled test.csv)

The training loop is the one both tasks share (train/loop.py `fit`), with its checkpoint/: the folder
must be new, empty, or (with --resume) one of ours, a run that fails before its first epoch removes
what it created, a killed one continues with --resume, and torchrun trains on every rank. A
non-finite loss stops training naming the epoch and step.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from mner import configs
from mner.cache.classification import (
    UNLABELLED_SPLIT,
    ClassData,
    ClassDataConfig,
    ClassSplit,
    read_classification,
    read_split_file,
    split_files,
    write_predictions,
)
from mner.cache.manifest import extract_command
from mner.cache.reader import CacheReader
from mner.cache.spec import TokenSpec
from mner.cache.verify import image_size_mismatches
from mner.runtime import (
    DEVICE_PATTERN,
    claim_folder,
    is_our_folder,
    refuse_inputs_as_output,
    start_runtime,
    to_device,
)
from mner.train import scores
from mner.train.checkpoint import load_weights
from mner.train.classifier_model import (
    CLASS_HEADS,
    IMAGE_FEATURES,
    MODES,
    TEXT_POOLS,
    ClassifierHead,
    SentenceClassifier,
    reads_tokens,
)
from mner.train.config import Config, merge_layers, override_layers
from mner.train.data import unknown_label
from mner.train.loop import Fitting, run_training
from mner.train.model import decayed_parameters
from mner.train.runs import (
    CONFIG_FILE,
    RESULTS_FILE,
    WEIGHTS_FILE,
    check_data_files,
    data_files_record,
    is_recorded_folder,
    new_eval_folder,
    prepare_folder,
    read_record,
    report_images,
    warn_if_unfinished,
    write_json,
)
from mner.train.scores import write_pred_csv
from mner.train.tasks import SENTENCE_CLASSIFICATION
from mner.train.text import check_max_length, load_encoder, load_tokenizer, resolve_text_encoder

log = logging.getLogger(__name__)

TASK = SENTENCE_CLASSIFICATION.name  # config.json "task" of a classifier run
CLASS_RECORD_KEYS = ("task", "classifier", "label_names", "data")
CLASS_WEIGHTS = ("none", "balanced")
SELECT = SENTENCE_CLASSIFICATION.selects
# The settings a resume may change: how a run is carried out, not what it trains (as config.RUNTIME_SETTINGS).
CLASS_RUNTIME_SETTINGS = frozenset(
    {"classifier.epochs", "classifier.patience", "classifier.device", "classifier.threads"}
)
_SHOWN_GUIDS = 5  # guids named in a warning about many posts


@dataclass
class ClassifierConfig(Config):
    """The classifier and its optimisation; the TOML table [classifier], `--set classifier.KEY=VALUE`."""

    SECTION = "classifier"

    mode: str = "both"  # text | image | both: what the head sees (text never opens the cache)
    head: str = "mlp"  # mlp | cnn | attention | xattn (train/classifier_model.py)
    text_encoder: str = "minilm"  # "minilm", "tiny-bert" or a local Hugging Face folder
    text_pool: str = "cls"  # cls ([CLS] state, the seed's) | mean (over real sub-words)
    image_feature: str = (
        "global"  # global (the cached global vector) | patches (their mean); xattn reads patches
    )
    max_length: int = 128  # sub-words per post; longer texts are cut (counted in config.json)
    hidden_size: int = 512  # the seed's hidden size of mlp_both (mlp, attention heads)
    attention_heads: int = 4  # heads of the xattn layer
    dropout: float = 0.1
    class_weights: str = "none"  # none | balanced (n / (labels * count) per label, from train)
    select: str = "macro_f1"  # macro_f1 | accuracy: the valid score that picks the best epoch
    epochs: int = 5
    batch_size: int = 16
    lr_encoder: float = 2e-5  # AdamW learning rate of the text encoder
    lr_head: float = 1e-3  # of the head
    weight_decay: float = 0.01  # on weight matrices only (train.model's rule)
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    patience: int = 3  # stop after this many epochs without a better valid score
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int = 0  # torch intra-op threads; 0: the CPUs this process may use (mner.runtime.set_threads)

    def __post_init__(self):
        self._check_types()
        for name, known in (
            ("mode", MODES),
            ("head", CLASS_HEADS),
            ("text_pool", TEXT_POOLS),
            ("image_feature", IMAGE_FEATURES),
            ("class_weights", CLASS_WEIGHTS),
            ("select", SELECT),
        ):
            if getattr(self, name) not in known:
                raise ValueError(
                    f"classifier.{name} must be one of {', '.join(known)}; got {getattr(self, name)!r}"
                )
        for name in ("max_length", "hidden_size", "attention_heads", "epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"classifier.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr_encoder", "lr_head", "max_grad_norm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"classifier.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1 or not 0 <= self.warmup_ratio < 1:
            raise ValueError("classifier.dropout and classifier.warmup_ratio must be in [0, 1)")
        for name in ("weight_decay", "seed", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"classifier.{name} must be >= 0, got {getattr(self, name)}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ValueError(f"classifier.device must be auto, cpu, mps, cuda or cuda:N; got {self.device!r}")


@dataclass
class ClassifierRunConfig:
    """Everything one classifier run needs; recorded in its config.json."""

    data: ClassDataConfig  # the classification folder
    out_dir: str  # the run folder to create (new or empty)
    classifier: ClassifierConfig = dataclasses.field(default_factory=ClassifierConfig)
    cache_dir: str | None = None  # the feature cache; required unless classifier.mode is text (then unused)
    resume: bool = False  # continue a run of ours from its checkpoint/

    def __post_init__(self):
        if not isinstance(self.data, ClassDataConfig):
            raise ValueError(f"data must be a ClassDataConfig, got {self.data!r}")
        if not self.out_dir:
            raise ValueError("out_dir must name the run folder, got ''")
        if self.classifier.mode != "text" and self.cache_dir is None:
            raise ValueError(
                f"mode {self.classifier.mode} reads images from a feature cache: pass --cache DIR "
                "(from `mner extract-features --data-dir` on this folder), or --mode text"
            )

    def to_dict(self) -> dict:
        return {
            "data": self.data.to_dict(),
            "out_dir": self.out_dir,
            "classifier": self.classifier.to_dict(),
            "cache_dir": self.cache_dir,
            "resume": self.resume,
        }


def load_classifier_config(
    config_file: str | Path | None = None, overrides=(), **settings
) -> ClassifierConfig:
    """A ClassifierConfig from an optional TOML file (table [classifier]), then `--set classifier.KEY=VALUE`
    overrides, then `settings` (the CLI's options; None values are skipped), later ones winning.

    Raises ValueError naming the file or the override for an unknown table or key, a bad value.
    """
    layers = [(configs.load_toml(Path(config_file)), str(config_file))] if config_file is not None else []
    layers += override_layers(overrides)
    layers.append(({"classifier": {k: v for k, v in settings.items() if v is not None}}, "the options"))
    return ClassifierConfig(**merge_layers({"classifier": ClassifierConfig}, layers)["classifier"])


def is_classifier_run(path) -> bool:
    """Whether `path` is a classifier run folder (config.json with task "classification")."""
    return is_our_folder(path, CONFIG_FILE, CLASS_RECORD_KEYS)


# ------------------------------------------------------------------------------------------ data


class _Posts(torch.utils.data.Dataset):
    """The examples of one split with their image features (read lazily from the cache)."""

    def __init__(
        self, split: ClassSplit, reader: CacheReader | None, label_ids: dict, tokens: bool, patches: bool
    ):
        self.examples = split.examples
        self.reader, self.label_ids, self.tokens, self.patches = reader, label_ids, tokens, patches

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        item = {"text": example.text, "label": self.label_ids.get(example.label, -100)}
        if self.reader is not None:
            record = self.reader.get(example.guid)
            if self.tokens:
                image = record.patch_tokens  # (P, Dp)
            elif self.patches:
                image = record.patch_tokens.astype(np.float32).mean(0)  # (Dp,)
            else:
                image = record.global_embed  # (Dg,)
            item.update(
                image=torch.from_numpy(np.asarray(image, dtype=np.float32)), has_image=record.status == "ok"
            )
        return item


def collate_posts(tokenizer, max_length: int):
    """The classifier's collate: labels (B,), the tokenised texts (B, S), the image features."""

    def collate(items: list[dict]) -> dict:
        batch = {"labels": torch.tensor([item["label"] for item in items])}
        if tokenizer is not None:
            encoded = tokenizer(
                [item["text"] for item in items],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            batch.update(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])  # (B, S)
        if "image" in items[0]:
            batch["image"] = torch.stack([item["image"] for item in items])  # (B, Di) or (B, P, Dp)
            batch["has_image"] = torch.tensor([item["has_image"] for item in items])  # (B,)
        return batch

    return collate


def post_loader(
    split, reader, labels: list[str], tokenizer, cfg: ClassifierConfig, shuffle: bool, seed: int, sampler=None
):
    """Batches of `split` for the classifier of `cfg` (label ids from the run's label list), shuffled
    by a generator seeded with `seed`, or drawn by `sampler` (a rank's DistributedSampler)."""
    label_ids = {label: i for i, label in enumerate(labels)}
    tokens = reads_tokens(cfg.head, cfg.mode)
    posts = _Posts(split, reader, label_ids, tokens, cfg.image_feature == "patches")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        posts,
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        sampler=sampler,
        generator=generator,
        collate_fn=collate_posts(tokenizer, cfg.max_length),
    )


# ------------------------------------------------------------------------------------------ entry


def train_classifier(cfg: ClassifierRunConfig) -> Path:
    """Train one sentence classifier and write its run folder (see the module docstring), through the
    training loop both tasks share (train/loop.py `fit`).

    Raises:
        ValueError when the folder is neither new, empty nor (with resume) one of ours, the data is
        malformed (DatasetError, `file:line`), the cache lacks a post's guid (it was extracted from other
        data), a resumed folder was made with other settings (but CLASS_RUNTIME_SETTINGS), the loss
        becomes non-finite (naming epoch and step), or a setting is out of range.
    """
    claim = claim_folder(
        cfg.out_dir, CONFIG_FILE, CLASS_RECORD_KEYS, cfg.resume, what="classifier run", finished=RESULTS_FILE
    )
    c = cfg.classifier
    if c.mode != "image":  # before the data is read: a budget past the positions fails only in the forward
        check_max_length(resolve_text_encoder(c.text_encoder), c.max_length, "classifier.max_length")
    return run_training(
        claim,
        c.seed,
        start=lambda: start_runtime(c.device, "off", hint="--set classifier.device=cpu", threads=c.threads),
        prepare=lambda runtime, resources: _prepare(cfg, runtime, claim, resources),
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
            _check_guids_cached(split, reader, hint)
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
    labels = SENTENCE_CLASSIFICATION.label_names(data.labels)
    encoder_dir = resolve_text_encoder(c.text_encoder) if c.mode != "image" else None
    weights = _class_weights(data.splits["train"], labels) if c.class_weights == "balanced" else None
    model, tokenizer = build_classifier(c, len(labels), encoder_dir, reader.spec if reader else None, weights)
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
            "spec": dataclasses.asdict(reader.spec),
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
    if any(record["truncated_posts"].values()):
        log.warning("posts longer than %d sub-words (cut): %s", c.max_length, record["truncated_posts"])
    checkpoint = prepare_folder(
        claim, cfg.resume, record, runtime, SENTENCE_CLASSIFICATION.resume_keys, CLASS_RUNTIME_SETTINGS
    )
    if runtime.is_main:
        write_json(claim.path / CONFIG_FILE, record)

    # One process: the loader shuffles with its own generator (checkpointed); under torchrun each rank
    # reads its DistributedSampler shard.
    sampler = None
    if runtime.world_size > 1:
        sampler = DistributedSampler(
            _Posts(data.splits["train"], None, {}, False, False),
            num_replicas=runtime.world_size,
            rank=runtime.rank,
            shuffle=True,
            seed=c.seed,
        )
    train_loader = post_loader(
        data.splits["train"], reader, labels, tokenizer, c, sampler is None, c.seed, sampler
    )

    def score(model, name: str):
        return _score(model, data.splits[name], reader, tokenizer, c, runtime, labels)

    def finish(model) -> None:
        for name, split in data.splits.items():
            if not split.labelled:  # test_without_label.txt, or a test.csv whose tags are all empty / null
                predicted = _predict(model, split, reader, tokenizer, c, runtime, labels)
                write_predictions(claim.path / submission_file(name), split.examples, predicted)

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
        results={"select": c.select},
        finish=finish,
    )
    return fitting, checkpoint


def build_classifier(
    c: ClassifierConfig, num_labels: int, encoder_dir, spec: TokenSpec | None, class_weights=None
) -> tuple[SentenceClassifier, object]:
    """(the classifier of config `c`, its tokenizer or None in image mode), sized by the cache's `spec`
    (None in text mode); the encoder starts from `encoder_dir`'s weights."""
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
    return SentenceClassifier(encoder, head, c.text_pool, class_weights), tokenizer


def submission_file(split: str) -> str:
    """The seed's submission file (guid,tag in the input's order) of an unlabelled split."""
    return f"pred_{split}.txt"


SUBMISSION_FILE = submission_file(UNLABELLED_SPLIT)  # the MVSA layout's test_without_label.txt


def param_groups(model: SentenceClassifier, c: ClassifierConfig) -> list[dict]:
    """AdamW groups: encoder at lr_encoder, head at lr_head; weight decay on weight matrices only."""
    decayed = decayed_parameters(model)
    groups = []
    for part, lr in (("encoder.", c.lr_encoder), ("head.", c.lr_head)):
        params = [p for name, p in model.named_parameters() if name.startswith(part) and p.requires_grad]
        for chosen, decay in (
            ([p for p in params if id(p) in decayed], c.weight_decay),
            ([p for p in params if id(p) not in decayed], 0.0),
        ):
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": decay})
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
def _predict(model, split, reader, tokenizer, c, runtime, labels) -> list[str]:
    """The predicted label of every example of `split`, in file order."""
    model.eval()
    predicted = []
    for batch in post_loader(split, reader, labels, tokenizer, c, False, c.seed):
        logits = model(to_device({k: v for k, v in batch.items() if k != "labels"}, runtime.device))["logits"]
        predicted.extend(labels[i] for i in logits.argmax(1).tolist())
    return predicted


def _score(model, split, reader, tokenizer, c, runtime, labels) -> tuple[list[str], dict]:
    predicted = _predict(model, split, reader, tokenizer, c, runtime, labels)
    return predicted, SENTENCE_CLASSIFICATION.score([e.label for e in split.examples], predicted, labels)


def read_pred_csv(path: Path) -> list[list[str]]:
    """The [guid, gold, pred] rows of a pred_<split>.csv, in file order (train.scores.read_pred_csv)."""
    return scores.read_pred_csv(path)


# ------------------------------------------------------------------------------------------ reuse


def load_classifier_run(
    run_dir, device: str = "auto"
) -> tuple[dict, ClassifierConfig, SentenceClassifier, object, object]:
    """(config.json, its classifier config, the best model in eval mode on the device, its tokenizer or
    None, the runtime) of a
    classifier run; ValueError when the folder is not one or its weights file is missing or damaged."""
    run_dir = Path(run_dir)
    if not is_classifier_run(run_dir):
        raise ValueError(f"{run_dir} is not a classifier run folder (no config.json with task {TASK!r})")
    record = read_record(run_dir)
    c = ClassifierConfig.from_dict(record["classifier"], str(run_dir / CONFIG_FILE))
    spec = TokenSpec.from_dict(record["cache"]["spec"]) if record["cache"] else None
    model, tokenizer = build_classifier(c, len(record["label_names"]), record["encoder_dir"], spec)
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{run_dir}: no {WEIGHTS_FILE}; the run did not finish an epoch — train it again")
    load_weights(model, weights, "cpu", "the file is damaged — train the run again")
    runtime = start_runtime(device, "off", hint="--device cpu")
    return record, c, model.to(runtime.device).eval(), tokenizer, runtime


def _run_cache(record: dict, cache_dir, run_dir, same_keys: bool) -> CacheReader | None:
    """The cache a classifier run reads (None in text mode): `cache_dir` or the run's. With `same_keys`
    its fingerprint must be the run's; else (new posts) its extractor (models and token spec) must be."""
    if record["cache"] is None:
        return None
    reader = CacheReader(cache_dir or record["cache_dir"])
    trained = record["cache"]
    if same_keys and reader.fingerprint != trained["fingerprint"]:
        reader.close()
        raise ValueError(
            f"the cache at {reader.cache_dir} has fingerprint {reader.fingerprint[:12]}, but {run_dir} was trained "
            f"on {trained['fingerprint'][:12]} (other images or another extractor); pass the run's cache "
            f"({record['cache_dir']}) with --cache"
        )
    differs = [
        what
        for what, found, recorded in (
            ("models", reader.models, trained["models"]),
            ("token spec", dataclasses.asdict(reader.spec), trained["spec"]),
        )
        if found != recorded
    ]
    if differs:
        reader.close()
        raise ValueError(
            f"the cache at {reader.cache_dir} was extracted with another {' and '.join(differs)} than {run_dir}'s "
            f"cache; extract it with the settings recorded in {record['cache_dir']}/manifest.json"
        )
    return reader


def _check_guids_cached(split: ClassSplit, reader: CacheReader | None, hint: str) -> None:
    absent = [e for e in split.examples if reader is not None and e.guid not in reader]
    if absent:
        raise ValueError(
            f"{split.path}:{absent[0].line}: guid {absent[0].guid!r} is not in the cache at {reader.cache_dir} "
            f"({len(absent)} of {len(split.examples)} posts are absent); {hint}"
        )


def evaluate_classifier(run_dir, split: str = "test", cache_dir=None, data_dir=None, device: str = "auto"):
    """Score a classifier run's best model on a labelled split of its data folder (or `data_dir`).

    Writes RUN/eval/<split>-<UTC time>/results.json and pred.csv (guid,gold,pred), never the
    training-time files. Returns (classification_scores, that folder). Raises ValueError for a split
    that is absent or unlabelled, or a cache that is not the one the run was trained on.
    """
    run_dir = Path(run_dir)
    record, c, model, tokenizer, runtime = load_classifier_run(run_dir, device)
    warn_if_unfinished(run_dir)
    stored = dict(record["data"])
    if is_recorded_folder(stored["data_dir"], data_dir):
        check_data_files(record, split_files(stored["data_dir"]), run_dir)
    if data_dir is not None:
        stored["data_dir"] = str(data_dir)
    data = read_classification(ClassDataConfig(**stored))
    if split not in data.splits or not data.splits[split].labelled:
        labelled = [name for name, s in data.splits.items() if s.labelled]
        raise ValueError(
            f"{stored['data_dir']} has no labelled {split} split (labelled: {', '.join(labelled)}); "
            "use `mner predict` for unlabelled posts"
        )
    for example in data.splits[split].examples:
        if example.label not in record["label_names"]:
            raise unknown_label(
                data.splits[split].path,
                example.line,
                f"guid {example.guid!r}",
                example.label,
                record["label_names"],
            )
    reader = _run_cache(record, cache_dir, run_dir, same_keys=True)
    try:
        _check_guids_cached(data.splits[split], reader, "pass the run's cache with --cache")
        predicted, scores = _score(
            model, data.splits[split], reader, tokenizer, c, runtime, record["label_names"]
        )
    finally:
        if reader is not None:
            reader.close()
        runtime.close()
    out = new_eval_folder(run_dir, split)
    write_json(out / RESULTS_FILE, {split: scores})
    write_pred_csv(out / "pred.csv", data.splits[split], predicted)
    return scores, out


def predict_classifier(run_dir, input_file, out_file, cache_dir=None, device: str = "auto") -> Path:
    """Label the posts of `input_file` (a split file of a classification folder, read_split_file) with a
    classifier run; writes `out_file`, the seed's submission format (guid,tag in the input's order).

    Their images come from `cache_dir` (else the run's cache), which must hold every guid and have been
    extracted with the run's extractor; text mode reads no cache. Raises ValueError otherwise, or when
    `out_file` would overwrite the input or a file of the run.
    """
    run_dir = Path(run_dir)
    refuse_inputs_as_output(
        out_file, "--out", files=[("the input", input_file)], folders=[("the run", run_dir)]
    )
    split = read_split_file(input_file)
    record, c, model, tokenizer, runtime = load_classifier_run(run_dir, device)
    reader = _run_cache(record, cache_dir, run_dir, same_keys=False)
    try:
        if reader is not None:
            command = extract_command(reader.config, Path(input_file).parent)
            _check_guids_cached(
                split,
                reader,
                f"extract them with the run's extractor: `{command}`, and pass NEW_CACHE with --cache",
            )
        predicted = _predict(model, split, reader, tokenizer, c, runtime, record["label_names"])
    finally:
        if reader is not None:
            reader.close()
        runtime.close()
    return write_predictions(out_file, split.examples, predicted)
