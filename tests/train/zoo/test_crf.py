"""CRF likelihood and Viterbi against brute-force enumeration of every tag path."""

import itertools

import pytest
import torch
import torchcrf

from mner.train.zoo.crf import CRF, allowed_transitions

BIO = ["O", "B-X", "I-X", "B-Y", "I-Y"]


def random_crf(labels, seed, bio_constraints=False) -> CRF:
    torch.manual_seed(seed)
    crf = CRF(labels, bio_constraints=bio_constraints)
    with torch.no_grad():
        for param in crf.parameters():
            param.normal_()
    return crf.requires_grad_(False)


def path_score(crf: CRF, emissions, path) -> float:
    """Unnormalised score of one path for one post: start + emissions + transitions + end."""
    c = crf.crf
    score = c.start_transitions[path[0]] + emissions[0, path[0]]
    for t in range(1, len(path)):
        score = score + c.transitions[path[t - 1], path[t]] + emissions[t, path[t]]
    return float(score + c.end_transitions[path[-1]])


def may_follow(previous: str, tag: str) -> bool:
    """BIO, written out independently of allowed_transitions: I-X only after B-X or I-X."""
    return not tag.startswith("I-") or (previous != "O" and previous[2:] == tag[2:])


def legal(labels, path) -> bool:
    tags = ["O"] + [labels[i] for i in path]  # a post starts as if after O
    return all(may_follow(a, b) for a, b in zip(tags, tags[1:]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nll_and_viterbi_match_brute_force_on_three_words_three_tags(seed):
    labels = ["O", "B-X", "I-X"]
    crf = random_crf(labels, seed)
    emissions = torch.randn(2, 3, 3)  # (B, T, L)
    mask = torch.tensor([[True, True, True], [True, True, False]])  # post 1 has 2 words
    decoded = crf.decode(emissions, mask)
    for b, length in enumerate([3, 2]):
        paths = list(itertools.product(range(3), repeat=length))
        scores = torch.tensor([path_score(crf, emissions[b], p) for p in paths], dtype=torch.float64)
        log_z = torch.logsumexp(scores, dim=0)
        for path, score in zip(paths, scores):
            tags = torch.zeros(1, 3, dtype=torch.long)
            tags[0, :length] = torch.tensor(path)
            nll = crf.nll(emissions[b : b + 1], tags, mask[b : b + 1])
            assert nll.item() == pytest.approx(float(log_z - score), abs=1e-4)
        assert decoded[b] == list(paths[int(scores.argmax())])


@pytest.mark.parametrize("seed", range(5))
def test_constrained_viterbi_is_best_legal_path(seed):
    crf = random_crf(BIO, seed, bio_constraints=True)
    emissions = torch.randn(3, 4, len(BIO)) * 3  # (B, T, L)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    decoded = crf.decode(emissions, mask)
    for b, length in enumerate([4, 3, 1]):
        paths = [p for p in itertools.product(range(len(BIO)), repeat=length) if legal(BIO, p)]
        best = max(paths, key=lambda p: path_score(crf, emissions[b], p))
        assert decoded[b] == list(best)


def test_adversarial_emissions_still_decode_legal_paths():
    crf = CRF(BIO, bio_constraints=True)
    with torch.no_grad():
        # Transitions and start scores that reward exactly the moves BIO forbids.
        allowed, start = allowed_transitions(BIO)
        crf.crf.transitions.copy_(torch.where(allowed, -50.0, 50.0))
        crf.crf.start_transitions.copy_(torch.where(start, -50.0, 50.0))
    emissions = torch.full((2, 6, len(BIO)), -1e4)
    emissions[0, :, BIO.index("I-X")] = 1e4  # every word screams I-X
    emissions[1, 0::2, BIO.index("I-Y")] = 1e4  # I-Y / I-X alternating
    emissions[1, 1::2, BIO.index("I-X")] = 1e4
    mask = torch.ones(2, 6, dtype=torch.bool)
    for path in crf.decode(emissions, mask):
        assert legal(BIO, path)
    # The same model without constraints follows the emissions into illegal paths, as torchcrf does.
    free = CRF(BIO, bio_constraints=False)
    free.load_state_dict(crf.state_dict())
    unconstrained = free.decode(emissions, mask)
    assert not any(legal(BIO, path) for path in unconstrained)
    assert unconstrained == free.crf.decode(emissions, mask)


def test_unconstrained_decode_matches_torchcrf():
    crf = random_crf(BIO, 7)
    emissions = torch.randn(4, 6, len(BIO))
    mask = torch.arange(6)[None, :] < torch.tensor([6, 3, 1, 5])[:, None]
    assert crf.decode(emissions, mask) == crf.crf.decode(emissions, mask)


def test_allowed_transitions_table():
    allowed, start = allowed_transitions(BIO)
    legal_moves = {(i, j) for i in range(5) for j in range(5) if may_follow(BIO[i], BIO[j])}
    assert {(i, j) for i in range(5) for j in range(5) if allowed[i, j]} == legal_moves
    assert start.tolist() == [True, True, False, True, False]


def test_post_without_words_decodes_to_empty_path():
    crf = CRF(BIO)
    mask = torch.tensor([[True, True], [False, False]])
    assert [len(p) for p in crf.decode(torch.randn(2, 2, len(BIO)), mask)] == [2, 0]


def test_constraints_are_not_saved_in_the_state_dict():
    state = CRF(BIO).state_dict()
    assert set(state) == {"crf.start_transitions", "crf.end_transitions", "crf.transitions"}
    assert isinstance(CRF(BIO).crf, torchcrf.CRF)
