"""configs/presets.py: the presets are written whole by whichever process gets there first."""

from __future__ import annotations

import hashlib

import pytest
import transformers
from transformers import BertConfig, BertModel

from mner.configs.presets import save_model
from mner.extract.clip import load_clip, materialise_clip_preset
from mner.train.zoo.text import load_encoder, resolve_text_encoder


def test_save_model_writes_the_bytes_save_pretrained_writes(tmp_path):
    model = BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2))
    model.save_pretrained(tmp_path / "hf")
    (tmp_path / "ours").mkdir()
    save_model(model, tmp_path / "ours")
    for name in ("config.json", "model.safetensors"):
        digest = [
            hashlib.sha256((tmp_path / side / name).read_bytes()).hexdigest() for side in ("hf", "ours")
        ]
        assert digest[0] == digest[1], name


@pytest.fixture
def not_rank_zero(monkeypatch, tmp_path):
    """A process that transformers takes for torch.distributed rank 1: its save_pretrained writes nothing."""
    monkeypatch.setattr(transformers.PreTrainedModel, "should_save_on_this_rank", lambda self, main: False)
    monkeypatch.setenv("MNER_PRESET_DIR", str(tmp_path / "presets"))
    probe = BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2))
    probe.save_pretrained(tmp_path / "probe")
    assert not (tmp_path / "probe" / "model.safetensors").exists()  # what rank 1 would get from it


def test_a_preset_first_written_off_rank_zero_is_whole(not_rank_zero, tmp_path):
    # tiny-bert (the text side) and demo-clip (the image side), each loaded as training and extraction do
    encoder = load_encoder(resolve_text_encoder("tiny-bert"))
    assert encoder.config.num_hidden_layers > 0
    folder = materialise_clip_preset("demo-clip")
    assert folder.parent == tmp_path / "presets" and (folder / "model.safetensors").exists()
    assert load_clip(str(folder), "cpu").num_patches == 17
