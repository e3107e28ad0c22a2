"""The tagging task's preparation for the shared training loop (train/engine/loop.py `fit`): read the data,
check it against the label set and the cache, write config.json, build the model, the text-state
caches and the loaders, and return the `Fitting`.

Labels come from the train split, token shapes and the fingerprint from the cache manifest, so a run
can only be built from what is on disk.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import DistributedSampler

from mner.runtime import FolderClaim, Runtime
from mner.train.engine.config import RunConfig
from mner.train.engine.data import make_loader
from mner.train.engine.decode import count_truncated, decode_and_score
from mner.train.engine.loop import Fitting
from mner.train.engine.run_files import CONFIG_FILE, make_record, precision_name, write_json
from mner.train.engine.runs import (
    build_model,
    check_cache_keys,
    check_tags,
    open_cache,
    prepare_folder,
    record_vision_blocks,
    report_images,
    vision_blocks_of,
)
from mner.train.engine.text_states import (
    TextStateBuild,
    check_text_cache_root,
    prepare_text_states,
    tagging_posts,
)
from mner.train.zoo.registry import TASKS
from mner.train.zoo.text import check_max_length, load_tokenizer, resolve_text_encoder

log = logging.getLogger(__name__)


def prepare_tagging(cfg: RunConfig, runtime: Runtime, claim: FolderClaim) -> tuple[Fitting, Path | None]:
    """The tagging task's data, model and loaders; creates the folder and writes config.json."""
    run_dir = claim.path
    task = TASKS.get(cfg.model.task)
    # Before the data is read: a budget past the encoder's positions fails only inside its forward.
    encoder_dir = resolve_text_encoder(cfg.model.text_encoder)
    check_max_length(encoder_dir, cfg.model.max_length, "model.max_length")
    source = cfg.data.resolve()
    splits, labels = read_splits(source, task)
    reader = open_cache(cfg.cache_dir, cfg.model.text_only, cfg.train.cache_in_memory)
    if reader is not None:
        check_cache_keys(list(splits.values()), reader)
    # Before the folder is made: a cache without the vision state would only leave a half-made run.
    vision = vision_blocks_of(cfg.model, reader, source.data_dir)
    tokenizer = load_tokenizer(encoder_dir)

    record = make_record(cfg, source, labels, encoder_dir, reader)
    record_vision_blocks(record, vision)
    record["precision"] = precision_name(runtime)  # what evaluate and predict reproduce
    checkpoint = prepare_folder(claim, cfg.resume, record, runtime)
    record["truncated_words"] = {
        name: count_truncated(split, tokenizer, labels, cfg.model.max_length)
        for name, split in splits.items()
    }
    log.log(
        logging.WARNING if any(record["truncated_words"].values()) else logging.INFO,
        "words past the encoder's %d sub-word limit (predicted O, still scored): %s",
        cfg.model.max_length,
        record["truncated_words"],
    )
    if reader is not None:
        keys = {name: [post.key for post in split.posts] for name, split in splits.items()}
        record["no_image"] = report_images(keys, reader, "no visual tokens: the text alone")
    record["orphan_i"] = {name: split.orphan_i for name, split in splits.items()}
    log.info(
        "I- tags with no B- before them (kept, counted as entity starts as conlleval does): %s",
        ", ".join(f"{name} {count}" for name, count in record["orphan_i"].items()),
    )

    model = build_model(record, encoder_dir, None if vision is None else vision[1]).to(runtime.device)
    text_states = text_states_of(cfg, model, splits, tokenizer, labels, encoder_dir, source, runtime)
    record["text_states"] = {name: str(states.folder) for name, states in text_states.items()}
    if runtime.is_main:
        # Written once the model builds, so a config the model rejects leaves no half-made run behind.
        write_json(run_dir / CONFIG_FILE, record)
    sampler = DistributedSampler(
        splits["train"].posts,
        num_replicas=runtime.world_size,
        rank=runtime.rank,
        shuffle=True,
        seed=cfg.train.seed,
    )
    train_loader = make_loader(
        splits["train"],
        reader,
        tokenizer,
        labels,
        cfg.model,
        cfg.train,
        shuffle=False,
        sampler=sampler,
        text_states=text_states.get("train"),
    )

    def score(model, name: str):
        return decode_and_score(
            model, splits[name], reader, tokenizer, labels, cfg, runtime, text_states=text_states.get(name)
        )

    fitting = Fitting(
        task=task,
        select=task.selects[0],
        settings=cfg.train,
        model=model,
        param_groups=model.param_groups(cfg.train),
        loader=train_loader,
        splits=splits,
        score=score,
        scored=tuple(name for name in ("valid", "test") if name in splits),
        sampler=sampler,
        grad_accum=cfg.train.grad_accum,
    )
    return fitting, checkpoint


def read_splits(source, task) -> tuple[dict, list[str]]:
    """({split: Split} of train, valid and test when there is one, the label names of train), every tag
    checked against them before anything is built: a tag unknown to the model would only fail after a
    full epoch."""
    splits = {name: source.read(name) for name in ("train", "valid")}
    if source.split_path("test").is_file():
        splits["test"] = source.read("test")
    labels = task.label_names(splits["train"])
    check_tags(splits, labels)
    return splits, labels


def text_states_of(cfg: RunConfig, model, splits, tokenizer, labels, encoder_dir, source, runtime) -> dict:
    """{split: its text-state cache} with model.text_frozen_layers > 0 (built once, then reused by every
    run of the same encoder, tokenizer, max_length, N and split file); {} otherwise."""
    frozen = cfg.model.text_frozen_layers
    if not frozen:
        return {}
    root = text_cache_root_of(cfg, source)
    return {
        name: prepare_text_states(
            model.encoder,
            frozen,
            tagging_posts(split, tokenizer, labels, cfg.model.max_length),
            encoder_dir,
            root,
            runtime,
        )
        for name, split in splits.items()
    }


def check_vision_state(cfg: RunConfig) -> None:
    """Refuse a cache without the vision state the run's model reads, as the run itself does
    (runs.vision_blocks_of): what an ablation checks of each arm before its first."""
    if not cfg.model.reads_vision_state or cfg.cache_dir is None:
        return  # no vision state read; a multimodal run without a cache is refused by the run itself
    with open_cache(cfg.cache_dir, cfg.model.text_only) as reader:
        vision_blocks_of(cfg.model, reader, cfg.data.resolve().data_dir, load=False)


def text_cache_root_of(cfg: RunConfig, source, out_dir=None) -> Path:
    """The run's text-state root, refused inside one of its input or output folders (`out_dir`: the
    folder that holds the run, the run folder itself by default)."""
    return check_text_cache_root(
        cfg.text_cache,
        [
            ("the feature cache", cfg.cache_dir),
            ("the data folder", source.data_dir),
            ("the image folder", source.image_dir),
            ("the run folder", cfg.out_dir if out_dir is None else out_dir),
        ],
    )


def text_state_build(cfg: RunConfig, out_dir) -> TextStateBuild | None:
    """The text-state caches a tagging run of `cfg` reads (None with model.text_frozen_layers = 0), for
    an ablation to build before its first arm; `out_dir` is the ablation folder (no cache inside it)."""
    frozen = cfg.model.text_frozen_layers
    if not frozen:
        return None
    task = TASKS.get(cfg.model.task)
    encoder_dir = resolve_text_encoder(cfg.model.text_encoder)
    source = cfg.data.resolve()
    splits, labels = read_splits(source, task)
    tokenizer = load_tokenizer(encoder_dir)
    posts = [tagging_posts(split, tokenizer, labels, cfg.model.max_length) for split in splits.values()]
    root = text_cache_root_of(cfg, source, out_dir)
    return TextStateBuild(encoder_dir, frozen, posts, root, cfg.train.device)
