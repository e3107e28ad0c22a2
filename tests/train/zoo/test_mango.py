"""MANGO (train/zoo/mango.py): shapes, the masked-image rule, its losses against hand computations, warm-up."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F

import mner.train.zoo.mango as mango
from mner import configs
from mner.train.engine.config import ModelConfig
from mner.train.engine.config_files import load_run_config
from mner.train.engine.loop import train_from_cache
from mner.train.zoo.losses import LossInputs
from mner.train.zoo.mango import (
    GatedRelevanceFusion,
    MangoAlignLoss,
    MangoFusion,
    MangoNCELoss,
    MangoPreserveLoss,
    MangoSparsityLoss,
    MangoState,
    VisualResampler,
    warmup_factor,
)
from mner.train.zoo.model import MNERModel
from tests.train.factories import (
    LABELS,
    NUM_DETECTOR_CLASSES,
    make_batch,
    make_cache,
    make_posts,
    tiny_model,
    tiny_spec,
)
from tests.train.run_factories import make_data, run_config, single_thread  # noqa: F401 (autouse fixture)

LOSSES_ON = {"align_lambda": 0.2, "preserve_lambda": 0.05, "nce_lambda": 0.02, "sparsity_lambda": 0.1}


def mango_model(seed: int = 0, **changes) -> MNERModel:
    """A small MANGO (2 blocks, 4 queries) on tiny-bert, every loss on, no dropout."""
    fields = dict(fusion="mango", adaptive_gate=False, stack_layers=2, resampler_queries=4, dropout=0.0)
    return tiny_model(seed=seed, **{**fields, "alignment_loss_weight": 0.0, **LOSSES_ON, **changes})


def scramble_image(batch: dict, row: int, seed: int) -> dict:
    """A copy of batch whose post `row` has random cached tokens, switched-on token masks, masked image."""
    g = torch.Generator().manual_seed(seed)
    changed = {key: value.clone() if torch.is_tensor(value) else value for key, value in batch.items()}
    for key in ("patch_tokens", "global_embed", "region_feats", "region_scores", "region_boxes"):
        changed[key][row] = torch.rand(batch[key][row].shape, generator=g) * 100
    changed["region_labels"][row] = torch.randint(0, 91, batch["region_labels"][row].shape, generator=g)
    changed["patch_mask"][row] = True
    changed["region_mask"][row] = True
    return changed


# ------------------------------------------------------------------------------------------ shapes


def test_resampler_gives_q_tokens_and_masks_a_post_without_image():
    resampler = VisualResampler(width=8, heads=2, queries=3, dropout=0.0)
    visual = torch.randn(2, 5, 8)  # (B, V, D)
    mask = torch.tensor([[True, True, False, True, False], [False] * 5])
    tokens, token_mask = resampler(visual, mask)
    assert tokens.shape == (2, 3, 8) and token_mask.shape == (2, 3)
    assert token_mask[0].all() and not token_mask[1].any()
    assert torch.equal(tokens[1], torch.zeros(3, 8)) and tokens[0].abs().sum() > 0


@pytest.mark.parametrize("resampler", [True, False])
def test_fusion_state_shapes_and_relevance(resampler):
    model = mango_model(resampler=resampler).eval()
    batch = make_batch(make_posts(3), statuses={"img1": "missing"})
    model.decode(batch)
    state = model.fusion.state
    B, T = batch["word_mask"].shape
    D = model.encoder.config.hidden_size
    assert isinstance(state, MangoState)
    assert state.text.shape == state.fused.shape == (B, T, D) and state.relevance.shape == (B, T)
    assert ((state.relevance > 0) & (state.relevance < 1))[[0, 2]].all()
    assert torch.equal(state.relevance[1], torch.zeros(T)) and torch.equal(state.fused[1], state.text[1])
    assert len(model.fusion.blocks) == 2
    assert (model.fusion.resampler is None) == (not resampler)
    if resampler:
        assert model.fusion.resampler.queries.shape == (4, D)


def test_stack_has_stack_layers_blocks_and_the_seed_defaults():
    cfg = ModelConfig(fusion="mango", adaptive_gate=False, text_encoder="tiny-bert", qfnet_heads=2)
    fusion = MangoFusion(cfg, 32)
    assert len(fusion.blocks) == 7 and fusion.resampler.queries.shape == (8, 32)
    assert (cfg.rel_temp, cfg.nce_tau, cfg.align_warmup_epochs) == (1.0, 0.15, 5)


def test_the_gated_update_starts_at_the_originals_inits_unless_opened():
    cfg = ModelConfig(fusion="mango", adaptive_gate=False, text_encoder="tiny-bert", qfnet_heads=2)
    original = MangoFusion(cfg, 32).gated
    assert original.alpha.item() == pytest.approx(0.02) and bool((original.gate.bias == -1.5).all())
    opened = MangoFusion(
        ModelConfig(**{**cfg.to_dict(), "gate_alpha_init": 1.0, "gate_bias_init": 0.0}), 32
    ).gated
    assert opened.alpha.item() == 1.0 and bool((opened.gate.bias == 0.0).all())


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"gate_alpha_init": 1.0}, "model.gate_alpha_init sets the init of model.fusion = 'mango''s gated"),
        ({"gate_bias_init": 0.0}, "model.gate_bias_init sets the init of model.fusion = 'mango''s gated"),
        ({"fusion": "mango", "adaptive_gate": False, "gate_alpha_init": math.nan}, "must be a finite number"),
    ],
)
def test_gate_inits_are_refused_off_mango_or_not_finite(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(text_encoder="tiny-bert", **changes)


# ------------------------------------------------------------------------------ masked image rule


@pytest.mark.parametrize("resampler", [True, False])
def test_masked_image_gives_bitwise_the_image_less_output(resampler):
    """In a batch mixing posts with and without image, a masked post's emissions and tags are bitwise
    those of the same post when no post of the batch has an image, whatever its cached tokens hold."""
    model = mango_model(resampler=resampler).eval()
    batch = make_batch(make_posts(4, seed=3), statuses={"img1": "missing"})
    garbage = scramble_image(batch, 1, seed=0)
    no_images = dict(scramble_image(batch, 1, seed=1), image_mask=torch.zeros_like(batch["image_mask"]))
    with torch.no_grad():
        mixed = model._emissions(garbage, garbage["image_mask"])[0]  # (B, T, L)
        alone = model._emissions(no_images, no_images["image_mask"])[0]
        reference = model._emissions(batch, batch["image_mask"])[0]
    assert torch.equal(mixed[1], alone[1]) and torch.equal(mixed[1], reference[1])
    assert model.decode(garbage)[1] == model.decode(no_images)[1] == model.decode(batch)[1]
    # The posts that have an image do use it.
    assert not torch.equal(mixed[0], alone[0])


def test_without_regions_no_region_tensor_is_read():
    model = mango_model(use_regions=False).eval()
    batch = make_batch(make_posts(3))
    reference = model.decode(batch)
    stripped = {key: value for key, value in batch.items() if not key.startswith("region_")}
    assert model.decode(stripped) == reference
    model.train()
    assert torch.isfinite(model(stripped)["loss"])


# ---------------------------------------------------------------------------------- training


def test_loss_falls_on_a_tiny_fixed_batch():
    model = mango_model(image_dropout=0.0).train()
    batch = make_batch(make_posts(4, seed=1), statuses={"img2": "missing"})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        out = model(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(out[f"mango_{n}_loss"].item() > 0 for n in ("align", "preserve", "nce", "sparsity"))


def test_the_total_is_the_weighted_sum_of_the_terms():
    model = mango_model(seed=0, dropout=0.1, image_dropout=0.3).train()
    batch = make_batch(make_posts(4, seed=0), statuses={"img3": "missing"})
    torch.manual_seed(0)
    out = {key: value.item() for key, value in model(batch).items()}
    weights = {f"mango_{name.split('_')[0]}_loss": w for name, w in LOSSES_ON.items()}
    assert all(out[k] != 0 for k in weights if k != "mango_align_loss")
    assert out["loss"] == pytest.approx(
        out["crf_loss"] + sum(w * out[k] for k, w in weights.items()), abs=1e-5
    )


def test_same_seed_gives_identical_losses_and_gradients():
    batch = make_batch(make_posts(4, seed=2), statuses={"img0": "corrupt"})
    results = []
    for _ in range(2):
        model = mango_model(seed=5, dropout=0.1, image_dropout=0.3).train()
        torch.manual_seed(11)
        out = model(batch)
        out["loss"].backward()
        results.append(
            ({k: v.item() for k, v in out.items()}, [p.grad.clone() for p in model.fusion.parameters()])
        )
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_weights_zero_build_no_mango_loss_and_the_model_file_builds_the_originals_four():
    off = mango_model(**dict.fromkeys(LOSSES_ON, 0.0))
    assert len(off.aux_losses) == 0
    model_cfg, train_cfg = load_run_config(
        config_file=configs.path("models", "mango.toml"), overrides=["model.text_encoder=tiny-bert"]
    )
    # The README's "选择性解冻CLIP的最后2个block" at config.py's clip_lr 1e-5.
    assert (model_cfg.vision_trainable_blocks, train_cfg.lr_vision) == (2, 1e-5)
    # The blocks run on the state a cache stores before them (tests/train/engine/test_vision_training.py
    # trains the model file as it is); the losses and inits checked here read the cached tokens alone.
    cached_tokens = dataclasses.replace(model_cfg, vision_trainable_blocks=0)
    model = MNERModel(cached_tokens, LABELS, tiny_spec(), "tiny-bert", NUM_DETECTOR_CLASSES)
    assert set(model.aux_losses) == {"mango_align", "mango_preserve", "mango_nce", "mango_sparsity"}
    # liguochun0304/AFDVQF@a20bc9e config.py and model.py's GatedConcatFusion defaults
    assert (model_cfg.image_dropout, model_cfg.dropout, train_cfg.max_grad_norm) == (0.3, 0.3, 2.0)
    assert (train_cfg.lr_encoder, train_cfg.lr_fusion, train_cfg.grad_accum) == (5e-5, 3e-4, 2)
    assert (model_cfg.align_lambda, model_cfg.nce_lambda, model_cfg.preserve_lambda) == (0.2, 0.02, 0.05)
    assert (model_cfg.sparsity_lambda, model_cfg.emission_temperature, model_cfg.rel_temp) == (0.01, 2.5, 2.0)
    assert (model_cfg.use_regions, model_cfg.patch_cls, model_cfg.global_from_cls) == (False, False, True)
    assert model.fusion.gated.alpha.item() == pytest.approx(0.02)
    assert torch.all(model.fusion.gated.gate.bias == -1.5)


# ------------------------------------------------------------------------- losses by hand


def _inputs(epoch=None) -> LossInputs:
    """2 posts x 3 words x 2 dims; post 1 has no image and its last word is padding."""
    g = torch.Generator().manual_seed(3)
    text, fused = torch.randn(2, 3, 2, generator=g), torch.randn(2, 3, 2, generator=g)
    relevance = torch.tensor([[0.2, 0.9, 0.5], [0.0, 0.0, 0.0]])
    word_mask = torch.tensor([[True, True, True], [True, True, False]])
    entities = torch.tensor([[False, True, False], [True, False, False]])
    visual_mask = torch.tensor([[True, False], [False, False]])
    return LossInputs(
        words=torch.randn(2, 3, 2, generator=g),
        word_mask=word_mask,
        emissions=torch.zeros(2, 3, 5),
        visual=torch.zeros(2, 2, 2),
        visual_mask=visual_mask,
        pooled=torch.randn(2, 2, generator=g),
        entities=entities,
        fusion_state=MangoState(text, fused, relevance),
        epoch=epoch,
    )


def _cos(a, b) -> float:
    return float(sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b)))


def _cfg(**changes) -> ModelConfig:
    return ModelConfig(fusion="mango", adaptive_gate=False, **changes)


@pytest.mark.parametrize(("epoch", "factor"), [(None, 1.0), (1, 0.2), (2, 0.4), (5, 1.0), (9, 1.0)])
def test_align_loss_by_hand(epoch, factor):
    inputs = _inputs(epoch)
    s = inputs.fusion_state
    num = den = 0.0
    for b in range(2):
        for t in range(3):
            if inputs.word_mask[b, t]:
                w = float(s.relevance[b, t]) + float(inputs.entities[b, t])
                mse = sum((float(f) - float(x)) ** 2 for f, x in zip(s.fused[b, t], s.text[b, t])) / 2
                # compute_alignment_loss_v2: (1 - cos) + beta * MSE, beta = 0.3, / (sum w + 1e-6)
                num += w * (1 - _cos(s.text[b, t].tolist(), s.fused[b, t].tolist()) + 0.3 * mse)
                den += w
    got = MangoAlignLoss(_cfg(align_lambda=0.2), 2)(inputs)
    assert got.item() == pytest.approx(factor * num / (den + 1e-6), rel=1e-5)


def test_align_loss_does_not_push_the_relevance():
    inputs = _inputs()
    inputs.fusion_state.relevance.requires_grad_(True)
    inputs.fusion_state.fused.requires_grad_(True)
    MangoAlignLoss(_cfg(), 2)(inputs).backward()
    assert inputs.fusion_state.relevance.grad is None and inputs.fusion_state.fused.grad.abs().sum() > 0


def test_preserve_loss_by_hand():
    inputs = _inputs()
    s = inputs.fusion_state
    num, den = 0.0, 0
    for b in range(2):
        for t in range(3):
            if inputs.word_mask[b, t]:
                mse = sum((float(f) - float(x)) ** 2 for f, x in zip(s.fused[b, t], s.text[b, t])) / 2
                num += mse * (1 - float(s.relevance[b, t]))
                den += 1
    assert MangoPreserveLoss(_cfg(), 2)(inputs).item() == pytest.approx(num / den, rel=1e-5)


def test_sparsity_loss_is_the_mean_relevance_of_words_with_an_image():
    inputs = _inputs()
    assert MangoSparsityLoss(_cfg(), 2)(inputs).item() == pytest.approx((0.2 + 0.9 + 0.5) / 3)


def test_nce_loss_by_hand():
    g = torch.Generator().manual_seed(4)
    inputs = _inputs()
    inputs.words = torch.randn(3, 3, 2, generator=g)
    inputs.word_mask = torch.tensor([[True, True, False], [True, True, True], [True, False, False]])
    inputs.pooled = torch.randn(3, 2, generator=g)
    inputs.visual_mask = torch.tensor([[True], [False], [True]])  # post 1 has no image: not a pair
    tau = 0.15
    rows = [0, 2]
    text = [[sum(float(inputs.words[b, t, d]) for t in range(3) if inputs.word_mask[b, t])
             / int(inputs.word_mask[b].sum()) for d in range(2)] for b in rows]  # fmt: skip
    image = [inputs.pooled[b].tolist() for b in rows]
    logits = [[_cos(text[i], image[j]) / tau for j in range(2)] for i in range(2)]

    def ce(row, target):
        return -row[target] + math.log(sum(math.exp(x) for x in row))

    # the original's info_nce: text -> image only
    t2i = sum(ce(logits[i], i) for i in range(2)) / 2
    got = MangoNCELoss(_cfg(nce_tau=tau), 2)(inputs)
    assert got.item() == pytest.approx(t2i, rel=1e-5)


def test_gated_relevance_fusion_follows_the_seed_formula():
    torch.manual_seed(0)
    gated = GatedRelevanceFusion(width=4, rel_temp=0.5)
    with torch.no_grad():
        gated.alpha.fill_(0.3)
    text, context = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    fused, rel = gated(text, context, torch.tensor([True, False]))
    t, v = F.layer_norm(text, (4,)), F.layer_norm(context, (4,))  # fresh LayerNorms: weight 1, bias 0
    expected_rel = torch.sigmoid(gated.rel_head(torch.cat([t, v], -1)) / 0.5)  # (B, T, 1)
    z = torch.cat([t, v * expected_rel], -1)
    expected = text + 0.3 * torch.sigmoid(gated.gate(z)) * gated.proj(z)
    torch.testing.assert_close(fused[0], expected[0])
    torch.testing.assert_close(rel[0], expected_rel[0, :, 0])
    assert torch.equal(fused[1], text[1]) and torch.equal(rel[1], torch.zeros(3))


# ------------------------------------------------------------------------------------ warm-up


def test_warmup_factor_schedule():
    assert [warmup_factor(e, 5) for e in (1, 2, 3, 4, 5, 6)] == [0.2, 0.4, 0.6, 0.8, 1.0, 1.0]
    assert warmup_factor(None, 5) == 1.0 and warmup_factor(1, 0) == 1.0


def test_model_epoch_scales_the_alignment_loss():
    model = mango_model().eval()
    batch = make_batch(make_posts(4, seed=1))
    with torch.no_grad():
        full = model(batch)
        model.epoch = 2
        warming = model(batch)
    assert warming["mango_align_loss"].item() == pytest.approx(0.4 * full["mango_align_loss"].item())
    assert warming["mango_preserve_loss"].item() == full["mango_preserve_loss"].item()


def test_the_loop_tells_the_model_each_epoch(tmp_path, monkeypatch):
    seen = []

    def recording(epoch, warmup_epochs):
        seen.append(epoch)
        return warmup_factor(epoch, warmup_epochs)

    monkeypatch.setattr(mango, "warmup_factor", recording)
    data_dir, posts = make_data(tmp_path)
    cache_dir = make_cache(tmp_path, posts)
    cfg = run_config(
        tmp_path / "run", cache_dir, data_dir, epochs=2, fusion="mango", adaptive_gate=False, stack_layers=1,
        resampler_queries=2, align_lambda=0.2, alignment_loss_weight=0.0,
    )  # fmt: skip
    train_from_cache(cfg)
    assert seen and sorted(set(seen)) == [1, 2] and seen == sorted(seen)


# ------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"resampler_queries": 0}, "model.resampler_queries must be >= 1, got 0"),
        ({"stack_layers": 0}, "model.stack_layers must be >= 1, got 0"),
        ({"rel_temp": 0.0}, "model.rel_temp must be > 0, got 0.0"),
        ({"nce_tau": -1.0}, "model.nce_tau must be > 0, got -1.0"),
        ({"align_warmup_epochs": -1}, "model.align_warmup_epochs must be >= 0, got -1"),
        ({"preserve_lambda": -1.0}, "model.preserve_lambda must be >= 0, got -1.0"),
    ],
)
def test_bad_mango_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _cfg(**changes)


@pytest.mark.parametrize("name", ["align_lambda", "preserve_lambda", "nce_lambda", "sparsity_lambda"])
def test_a_mango_loss_off_the_mango_fusion_is_refused(name):
    message = (
        f"model.{name} > 0 weighs a loss of model.fusion = 'mango' (it reads that fusion's relevance and "
        "states), but model.fusion is 'qgf'; set it to 0"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**{name: 0.1})
