"""MNERModel: contract shapes, text-only mode, truncation, losses, parameter groups."""

import re

import pytest
import torch
import torch.nn.functional as F

from mner.cache.conll import Post
from mner.train.engine.config import ModelConfig, TrainConfig
from mner.train.engine.metrics import entity_scores
from mner.train.engine.tasks import TOKEN_TAGGING
from mner.train.zoo.model import MNERModel
from mner.train.zoo.registry import AUX_LOSSES
from tests.train.factories import LABELS, make_batch, make_posts, tiny_model, tiny_spec, tiny_tokenizer


def test_the_total_is_the_weighted_sum_and_one_batch_overfits():
    # What each term computes is checked against the originals in test_equivalence.py.
    model = tiny_model(seed=0).train()
    batch = make_batch(make_posts(4, seed=0))
    torch.manual_seed(0)
    out = model(batch)
    assert out["align_loss"].item() > 0
    assert out["loss"].item() == pytest.approx(
        out["crf_loss"].item() + 0.1 * out["align_loss"].item(), abs=1e-5
    )
    optimizer = torch.optim.AdamW(
        model.param_groups(TrainConfig(lr_encoder=1e-3, lr_fusion=1e-3, lr_crf=1e-2))
    )
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_shapes_of_the_public_methods():
    model = tiny_model().eval()
    batch = make_batch(make_posts(3))
    B, T = batch["word_mask"].shape
    D = model.encoder.config.hidden_size
    spec = tiny_spec()
    assert model.encode_text(batch).shape == (B, T, D)
    visual, mask = model.encode_visual(batch)
    assert visual.shape == (B, spec.num_patches + spec.max_regions, D) and mask.shape == visual.shape[:2]
    paths = model.decode(batch)
    assert [len(p) for p in paths] == batch["num_words"].tolist()
    assert all(0 <= i < len(LABELS) for p in paths for i in p)
    out = model(batch)
    aux = {f"{name}_loss" for name in AUX_LOSSES.names}  # 0 for a loss that is off
    assert set(out) == {"loss", "crf_loss", *aux} and all(v.dim() == 0 for v in out.values())


def test_word_states_come_from_the_first_sub_word():
    model = tiny_model().eval()
    posts = [Post(key="a", words=("tokenization", "kaggle", "paris"), tags=("O", "O", "B-LOC"), line=1)]
    batch = make_batch(posts, with_visual=False)
    encoded = tiny_tokenizer()(list(posts[0].words), is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        states = model.encoder(**encoded).last_hidden_state[0]  # (S, D)
        words = model.encode_text(batch)[0]  # (T, D)
    firsts = [encoded.word_ids().index(w) for w in range(3)]
    assert firsts == [1, 3, 5]
    assert torch.allclose(words, states[firsts], atol=1e-6)


def test_patch_and_region_switches():
    spec = tiny_spec()
    batch = make_batch(make_posts(2))
    only_regions = tiny_model(use_patches=False).eval()
    assert not hasattr(only_regions.visual, "patch_proj")
    assert only_regions.encode_visual(batch)[0].shape[1] == spec.max_regions
    only_patches = tiny_model(use_regions=False).eval()
    assert not hasattr(only_patches.visual, "region_proj") and not hasattr(only_patches.visual, "label_embed")
    assert only_patches.encode_visual(batch)[0].shape[1] == spec.num_patches


def test_text_only_builds_no_visual_modules():
    model = tiny_model(text_only=True)
    assert model.visual is None and model.fusion is None
    names = [name for name, _ in model.named_parameters()]
    assert not [n for n in names if n.startswith(("visual.", "fusion."))]
    assert {n.split(".")[0] for n in names} == {"encoder", "emission", "crf"}
    batch = make_batch(make_posts(3), with_visual=False)
    out = model(batch)
    assert out["align_loss"].item() == 0.0 and out["loss"].item() == out["crf_loss"].item()
    assert [len(p) for p in model.eval().decode(batch)] == batch["num_words"].tolist()
    with pytest.raises(ValueError, match=r"this model is text-only"):
        model.encode_visual(batch)


def test_truncated_words_are_predicted_o_and_still_scored():
    model = tiny_model().eval()
    words = ("obama",) + ("tokenization",) * 6 + ("london",)
    tags = ("B-PER",) + ("O",) * 6 + ("B-LOC",)
    post = Post(key="img0", words=words, tags=tags, line=1)
    batch = make_batch([post], max_length=8)
    seen = int(batch["word_mask"].sum())
    assert seen == 4 and batch["num_truncated"].tolist() == [len(words) - seen]
    (path,) = model.decode(batch)
    assert len(path) == len(words) and path[seen:] == [LABELS.index("O")] * (len(words) - seen)
    predicted = [LABELS[i] for i in path]
    scores = entity_scores([list(tags)], [predicted])
    # The LOC entity past the limit stays in the gold support and cannot be found.
    assert scores["per_type"]["LOC"]["support"] == 1 and scores["per_type"]["LOC"]["correct"] == 0


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_alignment_loss_is_infonce_over_posts_with_an_image(pooling):
    model = tiny_model(
        dropout=0.0, image_dropout=0.0, alignment_loss_weight=0.5, alignment_pooling=pooling
    ).eval()
    batch = make_batch(make_posts(5, seed=2), statuses={"img3": "missing"})
    with torch.no_grad():
        out = model(batch)
        words, word_mask = model.encode_text(batch), batch["word_mask"]
        visual, visual_mask = model.encode_visual(batch)
        cls = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0][:, 0]
    rows = [0, 1, 2, 4]
    if pooling == "cls":  # the encoder's [CLS] state, as AFDVQF's text_feat[:, 0]
        text = cls[rows]
    else:
        text = torch.stack([words[b][word_mask[b]].mean(0) for b in rows])
    image = torch.stack([visual[b][visual_mask[b]].mean(0) for b in rows])
    logits = F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T / 0.07
    target = torch.arange(4)
    expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    assert out["align_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["crf_loss"].item() + 0.5 * expected.item(), rel=1e-5)
    off = tiny_model(alignment_loss_weight=0.0).eval()
    assert off(batch)["align_loss"].item() == 0.0


def test_image_dropout_masks_images_in_training_only():
    model = tiny_model(dropout=0.0, image_dropout=0.999, alignment_loss_weight=0.0)
    batch = make_batch(make_posts(3))
    no_images = dict(batch, image_mask=torch.zeros_like(batch["image_mask"]))
    model.train()
    model.encoder.eval()  # the encoder's own dropout (its config's) would blur the comparison
    torch.manual_seed(0)
    dropped = model(batch)["loss"]
    with torch.no_grad():
        assert dropped.item() == pytest.approx(model.eval()(no_images)["loss"].item(), abs=1e-6)
        assert model(batch)["loss"].item() != pytest.approx(dropped.item(), abs=1e-6)


def test_param_groups():
    model = tiny_model()
    train_cfg = TrainConfig(lr_encoder=1e-5, lr_fusion=2e-4, lr_crf=3e-3, weight_decay=0.05)
    groups = model.param_groups(train_cfg)
    by_name = {g["name"]: g for g in groups}
    # No "crf" group: the transition scores are not weight-decayed (tests/train/engine/test_loop.py checks the rule).
    assert set(by_name) == {"encoder", "encoder_no_decay", "fusion", "fusion_no_decay", "crf_no_decay"}
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()) and len(set(grouped)) == len(grouped)
    lrs = {"encoder": 1e-5, "fusion": 2e-4, "crf": 3e-3}
    for g in groups:
        assert g["lr"] == lrs[g["name"].split("_")[0]]
        assert g["weight_decay"] == (0.0 if g["name"].endswith("_no_decay") else 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["name"].endswith("_no_decay") for p in g["params"]}
    decay = {names[id(p)] for g in groups if not g["name"].endswith("_no_decay") for p in g["params"]}
    layer_norms = {
        f"{module_name}.{param_name}"
        for module_name, module in model.named_modules()
        if isinstance(module, torch.nn.LayerNorm)
        for param_name, _ in module.named_parameters()
    }
    biases = {n for n in names.values() if n.endswith("bias")}  # MultiheadAttention has in_proj_bias
    assert layer_norms and biases and layer_norms | biases <= no_decay
    assert {"crf.crf.start_transitions", "crf.crf.end_transitions", "crf.crf.transitions"} <= no_decay
    assert "emission.weight" in decay
    assert {names[id(p)] for p in by_name["crf_no_decay"]["params"]} == {
        "crf.crf.transitions", "crf.crf.start_transitions", "crf.crf.end_transitions",
    }  # fmt: skip
    # Optimisers accept the groups as they are.
    torch.optim.AdamW(groups)


def test_emission_lr_crf_moves_the_emission_layer_to_the_crf_group():
    model = tiny_model(emission_lr="crf")
    groups = {g["name"]: g for g in model.param_groups(TrainConfig(lr_fusion=2e-4, lr_crf=3e-3))}
    assert [id(p) for p in groups["crf"]["params"]] == [id(model.emission.weight)]
    assert groups["crf"]["lr"] == 3e-3 and groups["crf"]["weight_decay"] == 0.01
    assert id(model.emission.bias) in {id(p) for p in groups["crf_no_decay"]["params"]}
    assert id(model.emission.weight) not in {id(p) for p in groups["fusion"]["params"]}


def test_emission_norm_is_a_layernorm_before_the_emission_layer_at_mangos_init():
    batch = make_batch(make_posts(3), with_visual=False)
    plain = tiny_model(seed=4, text_only=True, dropout=0.0)
    assert plain.emission_norm is None
    model = tiny_model(seed=4, text_only=True, dropout=0.0, emission_norm=True, bilstm=True, lstm_hidden=6)
    model.eval()
    # after the BiLSTM when there is one: the norm is as wide as the emission layer's input
    assert model.emission_norm.normalized_shape == (12,) == (model.emission.in_features,)
    # the original's "温和初始化": N(0, 0.02) weights, zero bias (a std far from PyTorch's default here)
    assert model.emission.weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert plain.emission.weight.std().item() > 0.04
    assert torch.all(model.emission.bias == 0) and not torch.all(plain.emission.bias == 0)
    with torch.no_grad():
        model.emission_norm.weight.uniform_(0.5, 1.5)
        model.emission_norm.bias.uniform_(-0.5, 0.5)
        states = model._bilstm(model.encode_text(batch), batch["word_mask"])  # (B, T, 12)
        want = model.emission(
            F.layer_norm(states, (12,), model.emission_norm.weight, model.emission_norm.bias)
        )
        torch.testing.assert_close(model._emissions(batch, None)[0], want, atol=1e-6, rtol=0)
    # not weight-decayed, and with emission_lr "crf" it trains with the emission layer
    crf = tiny_model(text_only=True, emission_norm=True, emission_lr="crf")
    groups = {g["name"]: {id(p) for p in g["params"]} for g in crf.param_groups(TrainConfig())}
    assert {id(crf.emission_norm.weight), id(crf.emission_norm.bias)} <= groups["crf_no_decay"]


@pytest.mark.parametrize(
    "changes, before, after",
    [
        (dict(text_only=True), False, True),  # the text baselines: the emission layer's input only
        (dict(), True, False),  # query-guided fusion (AFNER, AFDVQF): the encoder's states only
        (dict(fusion="mango", adaptive_gate=False), True, True),  # MANGO: both, as @d3b9439
    ],
)
def test_dropout_acts_where_each_original_puts_it(changes, before, after):
    batch = make_batch(make_posts(3))
    model = tiny_model(**changes).train()
    seen = []
    model.dropout.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))
    model._emissions(batch, None)
    B, S = batch["input_ids"].shape
    T = batch["word_mask"].shape[1]
    D = model.encoder.config.hidden_size
    assert seen == [(B, S, D)] * before + [(B, T, D)] * after


def test_an_unknown_emission_lr_is_refused():
    with pytest.raises(
        ValueError, match=re.escape("model.emission_lr must be one of 'fusion', 'crf', got 'head'")
    ):
        ModelConfig(emission_lr="head")


def test_heads_must_divide_the_width():
    with pytest.raises(ValueError, match=r"text encoder's width 32 is not divisible by model.qfnet_heads=3"):
        tiny_model(qfnet_heads=3)


def test_multimodal_model_needs_a_spec():
    with pytest.raises(ValueError, match=r"a multimodal model needs the cache's TokenSpec"):
        MNERModel(ModelConfig(text_encoder="tiny-bert", qfnet_heads=2), LABELS, None, "tiny-bert")


def test_region_labels_outside_the_detector_classes():
    model = tiny_model().eval()
    batch = make_batch(make_posts(2))
    batch["region_labels"][0, 0] = 91
    with pytest.raises(ValueError, match=r"region label ids must lie in \[0, 91\)"):
        model.decode(batch)


@pytest.mark.parametrize(
    "labels, message",
    [
        (["B-PER", "O"], "label names must start with 'O'"),
        (["O", "PER"], "label names must be 'O', 'B-<type>' or 'I-<type>'; got ['PER']"),
        (["O", "B-"], "label names must be 'O', 'B-<type>' or 'I-<type>'; got ['B-']"),
        (["O", "B-X", "B-X"], "label names repeat"),
        (["O"], "the label set has no entity type"),
    ],
)
def test_label_name_errors(labels, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MNERModel(
            ModelConfig(text_encoder="tiny-bert", qfnet_heads=2, text_only=True), labels, None, "tiny-bert"
        )
    assert TOKEN_TAGGING.check_labels(LABELS) == ["LOC", "PER"]


def test_bilstm_sits_between_the_word_states_and_the_emissions():
    batch = make_batch(make_posts(3), with_visual=False)
    B, T = batch["word_mask"].shape
    model = tiny_model(text_only=True, bilstm=True, lstm_hidden=7, dropout=0.0).eval()
    assert model.bilstm.hidden_size == 7 and model.bilstm.bidirectional
    assert model.emission.in_features == 14
    states = model._bilstm(model.encode_text(batch), batch["word_mask"])
    assert states.shape == (B, T, 14)
    # Packed: a post's states do not depend on the batch's padding (the post alone gives the same).
    lengths = batch["word_mask"].sum(1)
    short = int(lengths.argmin())
    alone = make_batch([make_posts(3)[short]], with_visual=False)
    with torch.no_grad():
        got = model._bilstm(model.encode_text(batch), batch["word_mask"])[short, : lengths[short]]
        want = model._bilstm(model.encode_text(alone), alone["word_mask"])[0, : lengths[short]]
    assert torch.allclose(got, want, atol=1e-6)
    assert [len(p) for p in model.decode(batch)] == batch["num_words"].tolist()
    # The BiLSTM's matrices are weight-decayed, its biases not, at the fusion learning rate.
    groups = {g["name"]: {id(p) for p in g["params"]} for g in model.param_groups(TrainConfig())}
    assert (
        id(model.bilstm.weight_ih_l0) in groups["fusion"]
        and id(model.bilstm.bias_ih_l0) in groups["fusion_no_decay"]
    )
    # A multimodal model takes the BiLSTM after the fusion.
    multimodal = tiny_model(bilstm=True, lstm_hidden=5).eval()
    assert [len(p) for p in multimodal.decode(make_batch(make_posts(3)))] == batch["num_words"].tolist()


def test_region_meta_off_builds_no_label_score_box_embeddings_and_reads_only_features():
    model = tiny_model(region_meta=False, use_patches=False).eval()
    assert not hasattr(model.visual, "label_embed") and not hasattr(model.visual, "box_embed")
    batch = make_batch(make_posts(2))
    changed = dict(batch)
    for key in ("region_labels", "region_scores", "region_boxes"):
        changed[key] = batch[key].flip(0)  # other posts' detections, same features
    a, b = model.encode_visual(batch)[0], model.encode_visual(changed)[0]
    assert torch.equal(a, b)
    with_meta = tiny_model(use_patches=False).eval()
    assert not torch.equal(with_meta.encode_visual(batch)[0], with_meta.encode_visual(changed)[0])


def test_lstm_hidden_without_a_bilstm_is_refused():
    message = (
        "model.lstm_hidden sets the BiLSTM's width, but model.bilstm is false; "
        "set model.bilstm = true or leave it at 256"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(lstm_hidden=64)
    with pytest.raises(ValueError, match=re.escape("model.lstm_hidden must be >= 1, got 0")):
        ModelConfig(bilstm=True, lstm_hidden=0)


def test_used_settings_leave_out_what_the_built_model_never_reads():
    from mner.train.engine.config import ModelConfig
    from mner.train.zoo.model import used_settings

    text = ModelConfig(text_only=True)
    # A text-only model builds no fusion and no image loss: their settings change nothing.
    assert used_settings(text) == used_settings(
        ModelConfig(text_only=True, alignment_loss_weight=0.0, qfnet_layers=1)
    )
    assert used_settings(text) != used_settings(ModelConfig(text_only=True, dropout=0.3))
    for key, value in (("text_frozen_layers", 1), ("emission_lr", "crf")):  # read by a text-only model too
        assert used_settings(text) != used_settings(ModelConfig(text_only=True, **{key: value})), key
    assert used_settings(ModelConfig()) != used_settings(ModelConfig(alignment_loss_weight=0.0))
    assert used_settings(ModelConfig()) == used_settings(ModelConfig(stack_layers=3))  # MANGO's only
    assert "name" not in used_settings(text)


def test_frozen_layers_get_no_gradient_no_dropout_and_no_optimizer_group():
    model = tiny_model(text_only=True, text_frozen_layers=1)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("encoder.embeddings.", "encoder.encoder.layer.0.")) for n in frozen)
    assert all(
        p.requires_grad for n, p in model.named_parameters() if n.startswith("encoder.encoder.layer.1.")
    )
    model.train()
    assert not model.encoder.embeddings.training and not model.encoder.encoder.layer[0].training
    assert model.encoder.encoder.layer[1].training and model.training
    grouped = {id(p) for group in model.param_groups(TrainConfig()) for p in group["params"]}
    assert not any(id(p) in grouped for p in model.parameters() if not p.requires_grad)
    model(make_batch(with_visual=False))["loss"].backward()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    assert model.encoder.encoder.layer[1].attention.self.query.weight.grad is not None


def test_frozen_layers_change_nothing_in_eval_mode():
    """With no cached states the model computes the frozen bottom itself: the same word states as N = 0."""
    batch = make_batch(with_visual=False)
    plain = tiny_model(text_only=True).eval()
    frozen = tiny_model(text_only=True, text_frozen_layers=2).eval()
    torch.testing.assert_close(frozen.encode_text(batch), plain.encode_text(batch), rtol=0, atol=1e-6)
