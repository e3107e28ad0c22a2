"""Every head of registry.HEADS: per-post loss shape and a decode as long as each post's mask."""

import pytest
import torch

from mner.train.registry import HEADS
from tests.train.factories import LABELS, tiny_config


@pytest.mark.parametrize("name", HEADS.names)
def test_head_contract(name):
    head = HEADS.get(name)(tiny_config(head=name), LABELS)
    torch.manual_seed(0)
    B, T, L = 3, 5, len(LABELS)
    emissions = torch.randn(B, T, L, requires_grad=True)
    mask = torch.arange(T)[None, :] < torch.tensor([5, 2, 1])[:, None]  # (B, T) prefixes
    tags = torch.randint(0, L, (B, T))
    loss = head.loss(emissions, tags, mask)
    assert loss.shape == (B,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert not emissions.grad[1, 2:].any()  # masked positions get no gradient
    paths = head.decode(emissions.detach(), mask)
    assert [len(p) for p in paths] == [5, 2, 1] and all(0 <= i < L for p in paths for i in p)


def test_crf_head_is_the_crf():
    head = HEADS.get("crf")(tiny_config(), LABELS)
    emissions, mask = torch.randn(2, 4, len(LABELS)), torch.ones(2, 4, dtype=torch.bool)
    tags = torch.zeros(2, 4, dtype=torch.long)
    assert torch.equal(head.loss(emissions, tags, mask), head.nll(emissions, tags, mask))
    assert [n for n, _ in head.named_parameters()] == [
        "crf.start_transitions",
        "crf.end_transitions",
        "crf.transitions",
    ]
