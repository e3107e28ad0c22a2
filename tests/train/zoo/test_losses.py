"""Every auxiliary loss of registry.AUX_LOSSES: its own weight, 0 is off, and nothing else is coupled."""

import dataclasses
import math
import re

import pytest
import torch

from mner.train.engine.config import ModelConfig
from mner.train.zoo.losses import AlignmentLoss, LossInputs
from mner.train.zoo.registry import AUX_LOSSES
from tests.train.factories import make_batch, make_posts, tiny_model


@pytest.mark.parametrize("name", AUX_LOSSES.names)
def test_weight_is_a_non_negative_model_field(name):
    weight = AUX_LOSSES.weights[name]
    assert isinstance(getattr(ModelConfig(), weight), float)
    with pytest.raises(ValueError, match=re.escape(f"model.{weight} must be >= 0, got -1.0")):
        ModelConfig(**{weight: -1.0})


def model_for(name: str) -> dict:
    """Config changes for a model that can carry loss `name`: MANGO's losses read the mango fusion."""
    mango = {"fusion": "mango", "adaptive_gate": False, "stack_layers": 1, "alignment_loss_weight": 0.0}
    return mango if name.startswith("mango_") else {}


@pytest.mark.parametrize("name", AUX_LOSSES.names)
def test_weight_zero_turns_only_that_loss_off(name):
    weight = AUX_LOSSES.weights[name]
    others = {w: 0.0 for n, w in AUX_LOSSES.weights.items() if n != name}  # only this loss can be on
    on = tiny_model(dropout=0.0, image_dropout=0.0, **{**others, **model_for(name), weight: 0.5}).eval()
    off = tiny_model(dropout=0.0, image_dropout=0.0, **{**others, **model_for(name), weight: 0.0}).eval()
    assert name in on.aux_losses and name not in off.aux_losses
    # Same parameters (same seed, same creation order) and the same predictions: only the loss differs
    # (a loss may own parameters, such as slot_type's classifier; they are built last).
    model_keys = [key for key in on.state_dict() if not key.startswith("aux_losses.")]
    assert model_keys == [key for key in off.state_dict() if not key.startswith("aux_losses.")]
    assert all(torch.equal(on.state_dict()[key], off.state_dict()[key]) for key in model_keys)
    assert not any(key.startswith(f"aux_losses.{name}.") for key in off.state_dict())
    batch = make_batch(make_posts(5, seed=2))
    assert on.decode(batch) == off.decode(batch)
    with torch.no_grad():
        out_on, out_off = on(batch), off(batch)
    head_key = next(key for key in out_on if key not in ("loss", *(f"{n}_loss" for n in AUX_LOSSES.names)))
    assert torch.equal(out_on[head_key], out_off[head_key])
    assert out_off[f"{name}_loss"].item() == 0.0 and out_on[f"{name}_loss"].item() > 0
    assert out_off["loss"].item() == pytest.approx(sum(out_off[k].item() for k in out_off if k != "loss"))
    assert out_on["loss"].item() == pytest.approx(
        out_on[head_key].item() + 0.5 * out_on[f"{name}_loss"].item()
    )


@pytest.mark.parametrize("name", AUX_LOSSES.names)
def test_losses_that_need_an_image_are_off_for_a_text_only_model(name):
    model = tiny_model(text_only=True)
    loss = AUX_LOSSES.get(name)
    assert (name in model.aux_losses) == (not loss.needs_image)
    out = model(make_batch(make_posts(3), with_visual=False))
    assert set(out) >= {f"{n}_loss" for n in AUX_LOSSES.names}


def test_every_weight_field_is_named_once():
    weights = list(AUX_LOSSES.weights.values())
    assert len(set(weights)) == len(weights)
    assert set(weights) <= {f.name for f in dataclasses.fields(ModelConfig)}


# ------------------------------------------------------------------------------- alignment under DDP


def _union_inputs() -> tuple[LossInputs, list[slice]]:
    """6 posts of a union batch, split over 2 ranks as 3 + 3; post 4 has no image, so the ranks hold
    3 and 2 image pairs (uneven, as a real batch can be)."""
    generator = torch.Generator().manual_seed(7)
    words = torch.randn(6, 5, 8, generator=generator)  # (B, T, D)
    visual = torch.randn(6, 4, 8, generator=generator)  # (B, V, D)
    word_mask = torch.ones(6, 5, dtype=torch.bool)
    word_mask[1, 3:] = False
    visual_mask = torch.ones(6, 4, dtype=torch.bool)
    visual_mask[4] = False
    emissions = torch.zeros(6, 5, 3)
    return LossInputs(words, word_mask, emissions, visual, visual_mask), [slice(0, 3), slice(3, 6)]


def _rank_of_the_gathered_loss(rank: int, world: int, store: str, results: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        union, parts = _union_inputs()
        part = parts[rank]
        words = union.words[part].clone().requires_grad_(True)
        visual = union.visual[part].clone().requires_grad_(True)
        mine = LossInputs(
            words, union.word_mask[part], union.emissions[part], visual, union.visual_mask[part]
        )
        loss = AlignmentLoss(ModelConfig(alignment_pooling="mean"), 8).train()(mine)
        loss.backward()
        torch.save({"loss": loss.detach(), "words": words.grad, "visual": visual.grad}, f"{results}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_alignment_loss_gathers_the_negatives_of_every_rank(tmp_path):
    """2 gloo processes, 3 posts each: every rank's loss is the 1-process loss on the 6-post union, and each
    rank's gradient (times 1/world, DDP's averaging) is the union's gradient for its own posts."""
    world = 2
    results = str(tmp_path / "result")
    torch.multiprocessing.spawn(
        _rank_of_the_gathered_loss, args=(world, str(tmp_path / "store"), results), nprocs=world, join=True
    )
    union, parts = _union_inputs()
    words, visual = union.words.clone().requires_grad_(True), union.visual.clone().requires_grad_(True)
    inputs = LossInputs(words, union.word_mask, union.emissions, visual, union.visual_mask)
    reference = AlignmentLoss(ModelConfig(alignment_pooling="mean"), 8).train()(inputs)
    reference.backward()
    local_only = []
    for rank, part in enumerate(parts):
        got = torch.load(f"{results}.{rank}")
        torch.testing.assert_close(got["loss"], reference.detach())
        torch.testing.assert_close(got["words"] / world, words.grad[part])
        torch.testing.assert_close(got["visual"] / world, visual.grad[part])
        local = LossInputs(*(getattr(union, name)[part] for name in ("words", "word_mask", "emissions")),
                           union.visual[part], union.visual_mask[part])  # fmt: skip
        local_only.append(AlignmentLoss(ModelConfig(alignment_pooling="mean"), 8)(local).item())
    # The per-rank loss without gathering differs: the test can tell the two apart.
    assert all(abs(value - reference.item()) > 1e-3 for value in local_only)


# -------------------------------------------------------------------------------- slot type presence


def test_slot_type_loss_by_hand():
    """Types LOC, PER with 2 slots each: logit_e = w . mean(slots of e) + b; BCE against presence."""
    from mner.train.zoo.losses import SlotTypeLoss, type_presence

    torch.manual_seed(3)
    loss = SlotTypeLoss(ModelConfig(slots_per_type=2), width=3)
    slots = torch.randn(2, 4, 3)  # (B, Q = 2 types x 2 slots, D)
    # Post 0: B-LOC I-LOC O; post 1: O B-PER and a masked B-LOC (id 1) that must not count.
    tags = torch.tensor([[1, 2, 0], [0, 3, 1]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    presence = type_presence(tags, mask, torch.tensor([-1, 0, 0, 1, 1]), 2)
    assert presence.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    w, b = loss.classifier.weight[0].detach(), loss.classifier.bias.item()
    total = 0.0
    for post in range(2):
        for t in range(2):
            z = (w @ slots[post, 2 * t : 2 * t + 2].mean(0)).item() + b
            p = 1 / (1 + math.exp(-z))
            y = presence[post, t].item()
            total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
    inputs = LossInputs(None, None, None, None, None, slots=slots, type_presence=presence)
    assert loss(inputs).item() == pytest.approx(total / 4, abs=1e-6)


def test_slot_type_loss_reads_the_fusions_final_slots_and_needs_them():
    model = tiny_model(slot_type_loss_weight=1.0, image_dropout=0.0, dropout=0.0).eval()
    batch = make_batch(make_posts(4, seed=1))
    with torch.no_grad():
        out = model(batch)
    slots = model.fusion.final_slots
    assert slots.shape == (4, 2 * 2, model.encoder.config.hidden_size)  # (B, E * slots_per_type, D)
    tags, mask = model.task.targets(batch, model.outside)
    from mner.train.zoo.losses import type_presence

    presence = type_presence(tags, mask, torch.tensor(model._label_type), 2)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        model.aux_losses["slot_type"].logits(slots), presence
    )
    assert out["slot_type_loss"].item() == pytest.approx(expected.item(), abs=1e-6)
    message = (
        "model.slot_type_loss_weight > 0 needs a fusion with query slots (qgf), but model.fusion is 'gated'; "
        "set model.slot_type_loss_weight = 0"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_model(fusion="gated", adaptive_gate=False, slot_type_loss_weight=0.1)
