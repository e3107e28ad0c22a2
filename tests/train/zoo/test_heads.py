"""Every head of registry.HEADS: a scalar batch loss and a decode as long as each post's mask."""

import itertools
import math
import re

import pytest
import torch

from mner.train.zoo.registry import HEADS
from tests.train.factories import LABELS, tiny_config
from tests.train.zoo.test_crf import legal


@pytest.mark.parametrize("name", HEADS.names)
def test_head_contract(name):
    head = HEADS.get(name)(tiny_config(head=name), LABELS)
    torch.manual_seed(0)
    B, T, L = 3, 5, len(LABELS)
    emissions = torch.randn(B, T, L, requires_grad=True)
    mask = torch.arange(T)[None, :] < torch.tensor([5, 2, 1])[:, None]  # (B, T) prefixes
    tags = torch.randint(0, L, (B, T))
    loss = head.loss(emissions, tags, mask)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert not emissions.grad[1, 2:].any()  # masked positions get no gradient
    paths = head.decode(emissions.detach(), mask)
    assert [len(p) for p in paths] == [5, 2, 1] and all(0 <= i < L for p in paths for i in p)


def test_crf_head_is_the_crf():
    head = HEADS.get("crf")(tiny_config(), LABELS)
    emissions, mask = torch.randn(2, 4, len(LABELS)), torch.ones(2, 4, dtype=torch.bool)
    tags = torch.zeros(2, 4, dtype=torch.long)
    assert torch.equal(head.loss(emissions, tags, mask), head.nll(emissions, tags, mask).mean())
    assert [n for n, _ in head.named_parameters()] == [
        "crf.start_transitions",
        "crf.end_transitions",
        "crf.transitions",
    ]


@pytest.mark.parametrize("smoothing, temperature", [(0.0, 1.0), (0.2, 1.0), (0.1, 2.5)])
def test_softmax_head_is_smoothed_cross_entropy_by_hand(smoothing, temperature):
    """Per word: -(1 - s) log p(gold) - s/L sum_l log p(l), p = softmax(emissions / temperature);
    averaged over every word of the batch (MANGO's `(ce * mask).sum() / mask.sum()`), so a long post
    weighs by its words, not as one post. Decode without BIO constraints is the per-word argmax."""
    cfg = tiny_config(
        head="softmax", label_smoothing=smoothing, emission_temperature=temperature, bio_constraints=False
    )
    head = HEADS.get("softmax")(cfg, LABELS)
    torch.manual_seed(1)
    B, T, L = 2, 4, len(LABELS)
    emissions = torch.randn(B, T, L)
    tags = torch.randint(0, L, (B, T))
    mask = torch.tensor([[True] * 4, [True, True, False, False]])
    per_word = []
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            logits = [emissions[b, t, j].item() / temperature for j in range(L)]
            log_z = math.log(sum(math.exp(x) for x in logits))
            logp = [x - log_z for x in logits]
            per_word.append(-(1 - smoothing) * logp[tags[b, t]] - smoothing / L * sum(logp))
    assert head.loss(emissions, tags, mask).item() == pytest.approx(sum(per_word) / 6, abs=1e-5)
    assert head.decode(emissions, mask) == [
        emissions[0].argmax(-1).tolist(),
        emissions[1, :2].argmax(-1).tolist(),
    ]
    assert list(head.parameters()) == []


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"label_smoothing": 0.1}, "model.label_smoothing applies to the softmax head only, but model.head is 'crf'; leave it at 0.0"),
        ({"emission_temperature": 2.0}, "model.emission_temperature applies to the softmax head only, but model.head is 'crf'; leave it at 1.0"),
        ({"head": "softmax", "label_smoothing": 1.0}, "model.label_smoothing must be in [0, 1), got 1.0"),
        ({"head": "softmax", "emission_temperature": 0.0}, "model.emission_temperature must be > 0, got 0.0"),
    ],
)  # fmt: skip
def test_softmax_knobs_are_refused_where_they_would_do_nothing(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_config(**changes)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("seed", range(3))
def test_constrained_softmax_decode_is_the_most_probable_legal_path(seed, temperature):
    """model.bio_constraints on a softmax head: the legal path with the highest product of the per-word
    probabilities softmax(emissions / T), found here by enumerating every path."""
    head = HEADS.get("softmax")(tiny_config(head="softmax", emission_temperature=temperature), LABELS)
    torch.manual_seed(seed)
    emissions = torch.randn(3, 4, len(LABELS)) * 3  # (B, T, L)
    emissions[:, :, 2] += 2.0  # I-LOC often each word's best: its argmax path is often illegal
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    log_p = torch.log_softmax(emissions / temperature, dim=-1)
    decoded = head.decode(emissions, mask)
    for b, length in enumerate([4, 3, 1]):
        paths = [p for p in itertools.product(range(len(LABELS)), repeat=length) if legal(LABELS, p)]
        best = max(paths, key=lambda p: sum(log_p[b, t, tag].item() for t, tag in enumerate(p)))
        assert decoded[b] == list(best)
    argmax = [emissions[b, :n].argmax(-1).tolist() for b, n in enumerate([4, 3, 1])]
    assert any(not legal(LABELS, path) for path in argmax)  # the constraint had something to repair
