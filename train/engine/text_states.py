"""The stage-two side of the text-state cache (cache/text_states.py): what the states depend on, and
computing them with the model's frozen bottom.

With model.text_frozen_layers = N the embeddings and the bottom N encoder layers never change, so
their output for a post depends only on (encoder files, tokenizer, max_length, N, the post). It is
computed once per split file and read by every epoch (train_from_cache) and by evaluate on the same
split; the model's top layers run over it (MNERModel.encode_text reads batch["text_states"]).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import transformers

from mner.cache.checksums import file_sha256
from mner.cache.conll import Split
from mner.cache.text_states import (
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


def text_state_parts(encoder_dir: Path, tokenizer, max_length: int, frozen: int, split: Split) -> dict:
    """What the frozen states of `split` depend on; its canonical JSON's sha256 is the fingerprint.

    The encoder and tokenizer by the sha256 of their files (not the folder's path: a preset
    materialised again elsewhere is the same encoder), max_length, N, the split file by name and
    sha256, and the library versions that compute the layers.
    """
    encoder_dir = Path(encoder_dir)
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
        "max_length": max_length,
        "frozen_layers": frozen,
        "data_file": {"name": split.path.name, "sha256": file_sha256(split.path), "posts": len(split.posts)},
        "dtype": "float32",
        "versions": {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__},
    }


def prepare_text_states(
    encoder: torch.nn.Module,
    frozen: int,
    split: Split,
    tokenizer,
    labels: list[str],
    max_length: int,
    encoder_dir: Path,
    root,
    runtime: Runtime,
) -> TextStates:
    """The split's text-state cache under `root` (text_cache_root), built first when it is not there.

    Under torchrun rank 0 builds it while the others wait at a barrier. Returns it opened (checked).
    """
    parts = text_state_parts(encoder_dir, tokenizer, max_length, frozen, split)
    folder, _ = text_state_folder(root, parts)
    if runtime.is_main and not is_text_state_folder(folder):
        log.info("computing the frozen text states of %s once into %s", split.path, folder)
        rows = compute_text_states(encoder, frozen, split, tokenizer, labels, max_length, runtime.device)
        write_text_states(folder, parts, rows, encoder.config.hidden_size)
    runtime.barrier()
    states = open_text_states(folder, parts)
    log.info("%s: frozen text states read from %s", split.name, folder)
    return states


def find_text_states(
    encoder_dir: Path, tokenizer, max_length: int, frozen: int, split: Split, root
) -> TextStates | None:
    """The split's text-state cache when one was built (evaluate reads it), else None."""
    parts = text_state_parts(encoder_dir, tokenizer, max_length, frozen, split)
    folder, _ = text_state_folder(root, parts)
    return open_text_states(folder, parts) if is_text_state_folder(folder) else None


def compute_text_states(
    encoder: torch.nn.Module,
    frozen: int,
    split: Split,
    tokenizer,
    labels: list[str],
    max_length: int,
    device: torch.device,
):
    """Yield (key, input_ids (S_i,), states (S_i, D) float32) for each post of `split`, in file order.

    The posts are tokenised by the training collate itself, so the sub-words are those of its batches;
    the frozen modules run in eval mode, float32, without gradient (train.text.text_prefix).
    """
    for module in frozen_modules(encoder, frozen):
        assert not module.training, "the frozen bottom of the text encoder must be in eval mode"
    collate = Collate(tokenizer, labels, max_length, with_visual=False)
    posts = PostDataset(split.posts, path=split.path)
    for start in range(0, len(posts), _BUILD_BATCH):
        items = [posts[i] for i in range(start, min(start + _BUILD_BATCH, len(posts)))]
        batch = collate(items)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        states = text_prefix(encoder, frozen, ids, mask).cpu().numpy()  # (B, S, D)
        real = batch["attention_mask"].bool().numpy()  # (B, S)
        for b, item in enumerate(items):
            yield item["key"], batch["input_ids"][b].numpy()[real[b]].astype(np.int32), states[b][real[b]]


def check_text_cache_root(root, inputs: list[tuple[str, str | Path | None]]) -> Path:
    """The text-state root, refused (ValueError naming both) when it lies inside one of the command's
    input or output folders (the image cache, the data, the run): it is never written there uninvited."""
    chosen = text_cache_root(root).resolve()
    for what, folder in inputs:
        if folder is None:
            continue
        folder = Path(folder).expanduser().resolve()
        if chosen == folder or chosen.is_relative_to(folder):
            raise ValueError(
                f"--text-cache {chosen} is inside {what} {folder}; text-state caches are kept apart from "
                "it, so choose a folder outside it"
            )
    return chosen
