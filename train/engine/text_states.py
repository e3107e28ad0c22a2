"""The stage-two side of the text-state cache (cache/text_states.py): what the states depend on, and
computing them with the model's frozen bottom, for both tasks.

With model.text_frozen_layers = N (classifier.text_frozen_layers for a classifier) the embeddings and
the bottom N encoder layers never change, so their output for a post depends only on (encoder files,
tokenizer, max_length, N, the post). It is computed once per split and read by every epoch
(train_from_cache, train_classifier), by evaluate on the same split, and by every arm and seed of an
ablation, which builds the caches before its first arm (`build_text_states`); the model's top layers
run over it (zoo/text.py `subword_states` reads batch["text_states"]).

A task hands its split over as `TextPosts`: the keys, the training dataset and collate (so the cached
sub-words are those of its batches) and what identifies the posts' texts (`data_file`): a tagging split
by its file's sha256, a classification split by the sha256 of its guids and texts (an MVSA text lives
in a file of its own, and a valid split may be drawn from train.txt).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

from mner.cache.checksums import file_sha256
from mner.cache.conll import Split
from mner.cache.text_states import (
    ROOT_VARIABLE,
    TEXT_STATES_SCHEMA,
    TextStates,
    is_text_state_folder,
    open_text_states,
    text_cache_root,
    text_state_folder,
    write_text_states,
)
from mner.runtime import Runtime
from mner.train.engine.data import Collate, PostDataset
from mner.train.zoo.text import frozen_modules, text_prefix

log = logging.getLogger(__name__)

# Files of an encoder folder that make its weights and architecture, and those that make its tokenizer.
_ENCODER_SUFFIXES = (".safetensors", ".bin")
_ENCODER_FILES = ("config.json",)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "added_tokens.json",
)
# Posts per encoder pass while the cache is built.
_BUILD_BATCH = 32


@dataclass(frozen=True)
class TextPosts:
    """One split's posts as the text-state cache sees them (rows in this order)."""

    name: str  # the split: "train", "valid", ...
    path: Path  # the file it was read from (logged)
    keys: list[str]  # each post's key (image key, guid): TextStates.get checks it
    data_file: dict  # what identifies the posts' texts; hashed into the fingerprint
    items: Sequence[dict]  # the task's training dataset items, indexable in row order
    collate: Callable[[list[dict]], dict]  # the task's training collate: "input_ids", "attention_mask" (B, S)
    tokenizer: object
    max_length: int


def tagging_posts(split: Split, tokenizer, labels: list[str], max_length: int) -> TextPosts:
    """A tagging split: its posts tokenised by the training collate (train/engine/data.py), identified
    by the split file's name and sha256."""
    return TextPosts(
        name=split.name,
        path=split.path,
        keys=[post.key for post in split.posts],
        data_file={"name": split.path.name, "sha256": file_sha256(split.path), "posts": len(split.posts)},
        items=PostDataset(split.posts, path=split.path),
        collate=Collate(tokenizer, labels, max_length, with_visual=False),
        tokenizer=tokenizer,
        max_length=max_length,
    )


def texts_part(path: Path, split: str, keys: Sequence[str], texts: Sequence[str]) -> dict:
    """`TextPosts.data_file` of posts whose texts are not the bytes of one file (a classification
    split): the sha256 of the canonical JSON of their [key, text] pairs, in row order."""
    pairs = json.dumps([[key, text] for key, text in zip(keys, texts, strict=True)], ensure_ascii=False)
    return {
        "name": Path(path).name,
        "split": split,
        "sha256": hashlib.sha256(pairs.encode("utf-8")).hexdigest(),
        "hashed": "keys and texts",
        "posts": len(keys),
    }


def text_state_parts(encoder_dir: Path, frozen: int, posts: TextPosts) -> dict:
    """What the frozen states of `posts` depend on; its canonical JSON's sha256 is the fingerprint.

    The encoder and tokenizer by the sha256 of their files (not the folder's path: a preset
    materialised again elsewhere is the same encoder), max_length, N, the posts' texts
    (`TextPosts.data_file`), and the library versions that compute the layers.
    """
    encoder_dir = Path(encoder_dir)
    tokenizer = posts.tokenizer
    files = sorted(p for p in encoder_dir.iterdir() if p.is_file())
    weights = {
        p.name: file_sha256(p) for p in files if p.suffix in _ENCODER_SUFFIXES or p.name in _ENCODER_FILES
    }
    vocab = {p.name: file_sha256(p) for p in files if p.name in _TOKENIZER_FILES}
    return {
        "schema_version": TEXT_STATES_SCHEMA,
        "encoder": {"name": encoder_dir.name, "sha256": weights},
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "sha256": vocab,
            "add_prefix_space": bool(getattr(tokenizer, "add_prefix_space", False)),
        },
        "max_length": posts.max_length,
        "frozen_layers": frozen,
        "data_file": posts.data_file,
        "dtype": "float32",
        "versions": {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__},
    }


def ensure_text_states(
    encoder: torch.nn.Module | Callable[[], torch.nn.Module],
    frozen: int,
    posts: TextPosts,
    encoder_dir: Path,
    root,
    device: torch.device,
) -> tuple[Path, dict, float | None]:
    """Build the text-state cache of `posts` under `root` (text_cache_root) unless it is there.

    `encoder` is the model's encoder, or a function that loads it (called only when a build is due).
    Returns (its folder, its parts, the seconds the build took; None when it was there already).
    """
    parts = text_state_parts(encoder_dir, frozen, posts)
    folder, _ = text_state_folder(root, parts)
    if is_text_state_folder(folder):
        return folder, parts, None
    if not isinstance(encoder, torch.nn.Module):
        encoder = encoder()
    log.info("computing the frozen text states of %s (%s) once into %s", posts.path, posts.name, folder)
    start = time.perf_counter()
    rows = compute_text_states(encoder, frozen, posts, device)
    write_text_states(folder, parts, rows, encoder.config.hidden_size)
    seconds = time.perf_counter() - start
    log.info("built the text-state cache of %s (%s) in %.1f s: %s", posts.path, posts.name, seconds, folder)
    return folder, parts, seconds


def prepare_text_states(
    encoder: torch.nn.Module, frozen: int, posts: TextPosts, encoder_dir: Path, root, runtime: Runtime
) -> TextStates:
    """The split's text-state cache under `root` (text_cache_root), built first when it is not there.

    Under torchrun rank 0 builds it while the others wait at a barrier. Returns it opened (checked).
    """
    if runtime.is_main:
        folder, parts, _ = ensure_text_states(encoder, frozen, posts, encoder_dir, root, runtime.device)
    else:
        parts = text_state_parts(encoder_dir, frozen, posts)
        folder, _ = text_state_folder(root, parts)
    runtime.barrier()
    states = open_text_states(folder, parts)
    log.info("%s: frozen text states read from %s", posts.name, folder)
    return states


def find_text_states(encoder_dir: Path, frozen: int, posts: TextPosts, root) -> TextStates | None:
    """The split's text-state cache when one was built (evaluate reads it), else None."""
    parts = text_state_parts(encoder_dir, frozen, posts)
    folder, _ = text_state_folder(root, parts)
    return open_text_states(folder, parts) if is_text_state_folder(folder) else None


def compute_text_states(encoder: torch.nn.Module, frozen: int, posts: TextPosts, device: torch.device):
    """Yield (key, input_ids (S_i,), states (S_i, D) float32) for each post, in row order.

    The posts are tokenised by the task's training collate itself, so the sub-words are those of its
    batches; the frozen modules run in eval mode, float32, without gradient (train.text.text_prefix).
    """
    for module in frozen_modules(encoder, frozen):
        assert not module.training, "the frozen bottom of the text encoder must be in eval mode"
    for start in range(0, len(posts.keys), _BUILD_BATCH):
        rows = range(start, min(start + _BUILD_BATCH, len(posts.keys)))
        batch = posts.collate([posts.items[i] for i in rows])
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        states = text_prefix(encoder, frozen, ids, mask).cpu().numpy()  # (B, S, D)
        real = batch["attention_mask"].bool().numpy()  # (B, S)
        for b, row in enumerate(rows):
            ids_b = batch["input_ids"][b].numpy()[real[b]].astype(np.int32)  # (S_i,)
            yield posts.keys[row], ids_b, states[b][real[b]]


@dataclass(frozen=True)
class TextStateBuild:
    """The text-state caches one run will read: an ablation builds them before its first arm."""

    encoder_dir: Path
    frozen: int
    posts: list[TextPosts]
    root: Path  # check_text_cache_root's answer
    device: str  # the run's device setting (auto, cpu, cuda:N, ...)


def build_text_states(builds: Iterable[TextStateBuild]) -> list[tuple[Path, float | None]]:
    """Build every text-state cache of `builds` that is not there yet, each once (runs that share
    one, arms and seeds of an ablation, name the same folder); each encoder is loaded at most once.

    Returns (folder, seconds of its build, None when it was there already) per distinct folder.
    """
    from mner.runtime import resolve_device
    from mner.train.zoo.text import load_encoder

    done: dict[Path, float | None] = {}
    encoders: dict[tuple[Path, str], torch.nn.Module] = {}
    for build in builds:
        device = resolve_device(build.device)

        def load(build=build, device=device) -> torch.nn.Module:
            key = (build.encoder_dir, str(device))
            if key not in encoders:
                encoders[key] = load_encoder(build.encoder_dir).to(device).eval()
            return encoders[key]

        for posts in build.posts:
            folder, _, seconds = ensure_text_states(
                load, build.frozen, posts, build.encoder_dir, build.root, device
            )
            done.setdefault(folder, seconds)
    return list(done.items())


def check_text_cache_root(root, inputs: list[tuple[str, str | Path | None]]) -> Path:
    """The text-state root, refused (ValueError naming both) when it lies inside one of the command's
    input or output folders (the image cache, the data, the run): it is never written there uninvited."""
    chosen = text_cache_root(root).resolve()
    # Named as the user set it: a command without --text-cache (ablate) reads the environment.
    if root is not None:
        flag = "--text-cache"
    else:
        flag = f"${ROOT_VARIABLE}" if os.environ.get(ROOT_VARIABLE) else "the default --text-cache"
    for what, folder in inputs:
        if folder is None:
            continue
        folder = Path(folder).expanduser().resolve()
        if chosen == folder or chosen.is_relative_to(folder):
            raise ValueError(
                f"{flag} {chosen} is inside {what} {folder}; text-state caches are kept apart from "
                "it, so choose a folder outside it"
            )
    return chosen
