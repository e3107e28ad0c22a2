"""Every auxiliary loss of registry.AUX_LOSSES: its own weight, 0 is off, and nothing else is coupled."""

import dataclasses
import re

import pytest
import torch

from mner.train.config import ModelConfig
from mner.train.registry import AUX_LOSSES
from tests.train.factories import make_batch, make_posts, tiny_model


@pytest.mark.parametrize("name", AUX_LOSSES.names)
def test_weight_is_a_non_negative_model_field(name):
    weight = AUX_LOSSES.weights[name]
    assert isinstance(getattr(ModelConfig(), weight), float)
    with pytest.raises(ValueError, match=re.escape(f"model.{weight} must be >= 0, got -1.0")):
        ModelConfig(**{weight: -1.0})


@pytest.mark.parametrize("name", AUX_LOSSES.names)
def test_weight_zero_turns_only_that_loss_off(name):
    weight = AUX_LOSSES.weights[name]
    on = tiny_model(dropout=0.0, image_dropout=0.0, **{weight: 0.5}).eval()
    off = tiny_model(dropout=0.0, image_dropout=0.0, **{weight: 0.0}).eval()
    assert name in on.aux_losses and name not in off.aux_losses
    # Same parameters (same seed, same creation order) and the same predictions: only the loss differs.
    assert on.state_dict().keys() == off.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(on.state_dict().values(), off.state_dict().values()))
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
