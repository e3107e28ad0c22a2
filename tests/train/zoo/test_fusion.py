"""Fusion registry, output shapes, and the rule that a masked image contributes exactly nothing."""

import re

import pytest
import torch
from torch import nn

from mner.train.zoo.fusion import AdaptiveWeights, QueryGuidedFusion, build_fusion, masked_attention
from mner.train.zoo.registry import FUSIONS
from tests.train.factories import make_batch, make_posts, tiny_config, tiny_model

# The fusions that read visual tokens. "two_tower" (IFAformer) reads the cache's state through its own
# vision tower instead: tests/train/zoo/test_two_tower.py and the zoo's invariants (test_zoo.py) cover it.
TOKEN_FUSIONS = [name for name in FUSIONS.names if name != "two_tower"]


def with_fusion(name: str, **changes) -> dict:
    """Config changes for fusion `name`: the adaptive gate stays on where there is one (QGF)."""
    return {"fusion": name, "adaptive_gate": name == "qgf", **changes}


def fused(model, batch) -> torch.Tensor:
    """The fusion output (B, T, D) of a batch, through the model's public pieces."""
    words = model.encode_text(batch)
    visual, visual_mask = model.encode_visual(batch)
    if getattr(model.fusion, "single_stream", False):  # IFAformer: it fuses inside the text encoder
        return model.fusion.encode(model.encoder, batch, words, visual, visual_mask)
    pooled = (
        model.visual.encode_global(batch, batch["image_mask"])
        if model.visual.global_proj is not None
        else None
    )
    return model.fusion(words, batch["word_mask"], visual, visual_mask, pooled)


def scramble_image(batch: dict, row: int, seed: int) -> dict:
    """A copy of batch whose post `row` has different random cached tokens (its masks unchanged)."""
    g = torch.Generator().manual_seed(seed)
    changed = dict(batch)
    for key in ("patch_tokens", "global_embed", "region_feats", "region_scores", "region_boxes"):
        changed[key] = batch[key].clone()
        changed[key][row] = torch.rand(batch[key][row].shape, generator=g) * 100
    changed["region_labels"] = batch["region_labels"].clone()
    changed["region_labels"][row] = torch.randint(0, 91, batch["region_labels"][row].shape, generator=g)
    return changed


@pytest.mark.parametrize("name", FUSIONS.names)
def test_every_entry_builds_its_registered_class(name):
    fusion = build_fusion(tiny_config(**with_fusion(name)), 32, ["LOC", "PER"])
    assert type(fusion) is FUSIONS.get(name) and isinstance(type(fusion).uses_pooled, bool)


@pytest.mark.parametrize("name", TOKEN_FUSIONS)
def test_output_shape(name):
    model = tiny_model(**with_fusion(name)).eval()
    batch = make_batch(make_posts(3), statuses={"img1": "missing"})
    out = fused(model, batch)
    B, T = batch["word_mask"].shape
    assert out.shape == (B, T, model.encoder.config.hidden_size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TOKEN_FUSIONS)
def test_masked_image_contributes_exactly_nothing(name):
    """The post's output does not move when its masked image's tokens change (bitwise)."""
    model = tiny_model(**with_fusion(name)).eval()
    posts = make_posts(4, seed=3)
    batch = make_batch(posts, statuses={"img1": "missing"})
    # The cached tokens of a missing image are zero; give it garbage instead, twice, and with its
    # patch/region masks switched on: only image_mask says the image must be ignored.
    batch["patch_mask"][1] = True
    batch["region_mask"][1] = True
    first, second = scramble_image(batch, 1, seed=0), scramble_image(batch, 1, seed=1)
    with torch.no_grad():
        reference, a, b = fused(model, batch), fused(model, first), fused(model, second)
        assert torch.equal(a[1], reference[1]) and torch.equal(b[1], reference[1])
        # A post whose image IS used does change when its tokens change.
        assert not torch.equal(fused(model, scramble_image(batch, 0, seed=2))[0], reference[0])
        # And the whole model agrees: same emissions-driven decode and same loss for the masked post.
        assert model.decode(first)[1] == model.decode(second)[1]


@pytest.mark.parametrize("name", TOKEN_FUSIONS)
def test_masked_image_gets_no_gradient(name):
    model = tiny_model(**with_fusion(name, dropout=0.0, image_dropout=0.0)).train()
    batch = make_batch(make_posts(3), statuses={"img0": "corrupt"})
    for key in ("patch_tokens", "global_embed", "region_feats"):
        batch[key].requires_grad_(True)
    model(batch)["loss"].backward()
    for key in ("patch_tokens", "global_embed", "region_feats"):
        grad = batch[key].grad
        assert grad is None or (not grad[0].any() and torch.isfinite(grad).all()), key


def test_masked_attention_of_an_all_masked_row_is_zero_with_finite_gradients():
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    query = torch.randn(2, 3, 8, requires_grad=True)
    keys = torch.randn(2, 4, 8, requires_grad=True)
    key_mask = torch.tensor([[True, False, True, False], [False, False, False, False]])
    out = masked_attention(attention, query, keys, key_mask)
    assert torch.equal(out[1], torch.zeros(3, 8)) and out[0].abs().sum() > 0
    out.sum().backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(keys.grad).all()
    assert not keys.grad[1].any()


def test_adaptive_gate_switch():
    types = ["LOC", "PER"]
    off = build_fusion(tiny_config(adaptive_gate=False), 32, types)
    assert off.gate is None and off.adaptive_weights is None
    weights = build_fusion(tiny_config(adaptive_gate=True), 32, types)
    assert isinstance(weights.adaptive_weights, AdaptiveWeights) and weights.gate is None
    gated = build_fusion(tiny_config(adaptive_gate=True, adaptive_fusion="gate"), 32, types)
    assert isinstance(gated, QueryGuidedFusion) and isinstance(gated.gate, nn.Linear)
    assert gated.adaptive_weights is None


def afdvqf_adaptive_fusion(text_weight, vision_weight, enhanced_text, vis_feat, vis_mask):
    """The original's adaptive fusion, literally: AFDVQF.forward's `vision_global = _masked_mean(vis_feat,
    vis_mask)` then AdaptiveFusionLayer.forward (liguochun0304/AFDVQF@034b93f, model/base_model.py and
    model/query_guided_fusion.py)."""
    m = vis_mask.to(dtype=vis_feat.dtype)
    denom = m.sum(dim=1, keepdim=True).clamp(min=1.0)
    vision_global = (vis_feat * m.unsqueeze(-1)).sum(dim=1) / denom
    return text_weight * enhanced_text + vision_weight * vision_global.unsqueeze(1)


def test_adaptive_weights_are_afdvqfs_adaptive_fusion_layer():
    model = tiny_model(dropout=0.0).eval()  # the afdvqf defaults: adaptive_fusion = "weights"
    with torch.no_grad():
        model.fusion.adaptive_weights.text_weight.fill_(0.7)
        model.fusion.adaptive_weights.vision_weight.fill_(-1.3)
    batch = make_batch(make_posts(3, seed=4), statuses={"img1": "missing"})
    with torch.no_grad():
        words = model.encode_text(batch)  # (B, T, D)
        visual, visual_mask = model.encode_visual(batch)  # (B, V, D), (B, V)
        out = model.fusion(words, batch["word_mask"], visual, visual_mask)
        slots = model.fusion.slots.expand(3, -1, -1)
        qgf = words
        for layer in model.fusion.layers:
            slots, qgf = layer(slots, qgf, batch["word_mask"], visual, visual_mask)
        reference = afdvqf_adaptive_fusion(
            torch.tensor([0.7]), torch.tensor([-1.3]), qgf, visual, visual_mask.long()
        )
    assert visual_mask[[0, 2]].any(dim=1).all() and not visual_mask[1].any()
    torch.testing.assert_close(out[[0, 2]], reference[[0, 2]], rtol=0, atol=1e-5)
    # The post without an image keeps QGF's states: the original skips the layer without images.
    assert torch.equal(out[1], qgf[1])
    assert not torch.allclose(out[0], qgf[0], atol=1e-3)


def test_adaptive_fusion_other_than_weights_needs_the_switch():
    message = (
        "model.adaptive_fusion = 'gate' chooses the adaptive fusion, but model.adaptive_gate is false; "
        "set model.adaptive_gate = true or leave it at 'weights'"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_config(adaptive_gate=False, adaptive_fusion="gate")
    with pytest.raises(
        ValueError, match=re.escape("model.adaptive_fusion must be one of 'weights', 'gate', got 'sum'")
    ):
        tiny_config(adaptive_fusion="sum")


def test_qgf_has_slots_per_type_and_layers():
    fusion = build_fusion(tiny_config(slots_per_type=3, qfnet_layers=2), 32, ["LOC", "ORG", "PER"])
    assert fusion.slots.shape == (9, 32) and len(fusion.layers) == 2
    assert len(build_fusion(tiny_config(**with_fusion("gated", qfnet_layers=3)), 32, ["X"]).layers) == 3


def test_gated_fusion_leaves_image_less_words_untouched():
    model = tiny_model(**with_fusion("gated")).eval()
    batch = make_batch(make_posts(3), statuses={"img2": "missing"})
    with torch.no_grad():
        words = model.encode_text(batch)
        out = fused(model, batch)
    assert torch.equal(out[2], words[2]) and not torch.equal(out[0], words[0])


def test_qgf_slots_are_the_type_prompt_plus_an_offset_per_slot():
    model = tiny_model(slots_per_type=3).eval()
    fusion = model.fusion
    assert fusion.type_queries.shape == (2, 32) and fusion.slots.shape == (6, 32)
    queries = fusion.queries()
    for slot in range(6):  # slots 0-2 are LOC's, 3-5 PER's (types sorted)
        expected = fusion.type_queries[slot // 3] + fusion.slots[slot]
        assert torch.equal(queries[slot], expected)
    untyped = tiny_model(slots_per_type=3, typed_queries=False).fusion
    assert untyped.type_queries is None and torch.equal(untyped.queries(), untyped.slots)


def test_qgf_words_never_read_the_slots():
    """In the originals the query branch is computed and dropped: the slots cannot move a prediction."""
    model = tiny_model().eval()
    batch = make_batch(make_posts(3, seed=2))
    with torch.no_grad():
        before = fused(model, batch)
        model.fusion.slots.add_(torch.randn_like(model.fusion.slots))
        model.fusion.type_queries.mul_(-3.0)
        assert torch.equal(fused(model, batch), before)
        assert not torch.equal(model.fusion.final_slots, torch.zeros_like(model.fusion.final_slots))


@pytest.mark.parametrize("name", ["qgf", "gated"])
def test_dropout_acts_on_the_encoder_states_for_qgf_and_on_the_fused_states_otherwise(name):
    model = tiny_model(**with_fusion(name, dropout=0.5)).train()
    batch = make_batch(make_posts(2))
    shapes = []
    model.dropout.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    model(batch)
    B, S = batch["input_ids"].shape
    T = batch["word_mask"].shape[1]
    # QGF's originals drop out the encoder's sub-word states, then feed the fused states undropped.
    assert shapes == ([(B, S, 32)] if name == "qgf" else [(B, T, 32)])
