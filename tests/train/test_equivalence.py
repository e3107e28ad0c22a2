"""Each zoo model's forward and loss terms against the original's, written here as short literal references.

A reference takes the same weights as the model under test (copied from it), reads the same batch and
computes emissions and every loss term as the original code does; the two must agree to 1e-5, and the
model's total loss must equal the weighted sum of the reference's terms. The originals:

- the CRF seeds (AFNER / AFDVQF, liguochun0304/AFDVQF@034b93f model/base_model.py:216):
  ner_loss = -torchcrf.CRF(emissions, labels, mask, reduction="mean"), emissions = classifier(states);
- the softmax head (MANGO's README, "实体分类损失"): ce = cross_entropy(emissions / T, reduction="none"),
  loss = (ce * mask).sum() / mask.sum(), a token mean;
- the BiLSTM (MANGO, liguochun0304/AFDVQF@d3b9439 model.py, "（可选）BiLSTM pack"): pack_padded_sequence
  of the states by post length, a bidirectional nn.LSTM, pad_packed_sequence.

Words are read at their first sub-word (the cache labels words, not sub-words): the reference gathers
the encoder's last hidden state there, as the model does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchcrf
from torch import nn

from tests.train.factories import LABELS, make_batch, make_posts, tiny_model

TOL = 1e-5


def word_states(model, batch) -> torch.Tensor:
    """The reference's text side: the encoder's last hidden state at each word's first sub-word."""
    states = model.encoder(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    return torch.stack([states[b, batch["first_subword"][b]] for b in range(states.shape[0])])  # (B, T, D)


def reference_crf_loss(model, emissions, tags, mask) -> torch.Tensor:
    """-torchcrf.CRF(emissions, labels, mask, reduction="mean") with the model's transitions."""
    crf = torchcrf.CRF(len(LABELS), batch_first=True)
    crf.load_state_dict(model.crf.crf.state_dict())
    return -crf(emissions, tags, mask=mask, reduction="mean")


def targets(batch):
    """Gold label ids (B, T) under word_mask (padding: "O", id 0, which the mask hides) and the mask."""
    mask = batch["word_mask"]
    return batch["labels"].where(mask, LABELS.index("O")), mask


@pytest.fixture
def batch():
    return make_batch(make_posts(4, seed=3), with_visual=False)


def test_bert_crf_is_linear_emissions_and_torchcrfs_mean_nll(batch):
    model = tiny_model(seed=1, text_only=True, dropout=0.0).eval()
    words = word_states(model, batch)
    emissions = F.linear(words, model.emission.weight, model.emission.bias)  # the original's classifier
    tags, mask = targets(batch)
    expected = reference_crf_loss(model, emissions, tags, mask)
    out = model(batch)
    torch.testing.assert_close(model._emissions(batch, None)[0], emissions, atol=TOL, rtol=0)
    assert out["crf_loss"].item() == pytest.approx(expected.item(), abs=TOL)
    assert out["loss"].item() == pytest.approx(expected.item(), abs=TOL)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_bert_softmax_is_the_token_mean_cross_entropy(batch, temperature):
    model = tiny_model(seed=2, text_only=True, head="softmax", dropout=0.0, emission_temperature=temperature)
    model.eval()
    emissions = model.emission(word_states(model, batch))  # (B, T, L)
    tags, mask = targets(batch)
    B, T, L = emissions.shape
    ce = F.cross_entropy((emissions / temperature).view(-1, L), tags.view(-1), reduction="none").view(B, T)
    expected = (ce * mask.float()).sum() / mask.float().sum()
    out = model(batch)
    assert out["softmax_loss"].item() == pytest.approx(expected.item(), abs=TOL)
    assert out["loss"].item() == pytest.approx(expected.item(), abs=TOL)
    # the token mean, not a per-post sum: a post twice as long does not weigh twice as much per word
    per_post_sum = (ce * mask.float()).sum(dim=1).mean()
    assert abs(out["loss"].item() - per_post_sum.item()) > 1e-3


def test_bert_bilstm_crf_is_a_packed_bidirectional_lstm_then_the_crf(batch):
    model = tiny_model(seed=3, text_only=True, bilstm=True, lstm_hidden=8, dropout=0.0).eval()
    lstm = nn.LSTM(model.encoder.config.hidden_size, 8, batch_first=True, bidirectional=True)
    lstm.load_state_dict(model.bilstm.state_dict())
    words = word_states(model, batch)
    tags, mask = targets(batch)
    lengths = mask.sum(dim=1).cpu()
    packed = nn.utils.rnn.pack_padded_sequence(words, lengths, batch_first=True, enforce_sorted=False)
    out, _ = lstm(packed)
    states, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=words.shape[1])
    emissions = model.emission(states)
    expected = reference_crf_loss(model, emissions, tags, mask)
    torch.testing.assert_close(model._emissions(batch, None)[0], emissions, atol=TOL, rtol=0)
    assert model(batch)["loss"].item() == pytest.approx(expected.item(), abs=TOL)


def test_decode_is_the_crfs_viterbi_without_constraints(batch):
    # With BIO constraints off the project's Viterbi is torchcrf's decode (the originals' crf.decode).
    model = tiny_model(seed=4, text_only=True, dropout=0.0, bio_constraints=False).eval()
    emissions = model._emissions(batch, None)[0]
    crf = torchcrf.CRF(len(LABELS), batch_first=True)
    crf.load_state_dict(model.crf.crf.state_dict())
    assert model.decode(batch) == crf.decode(emissions, mask=batch["word_mask"])
