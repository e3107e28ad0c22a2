"""Each zoo model's forward and loss terms against the original's, written here as short literal references.

A reference takes the same weights as the model under test (copied from it), reads the same batch and
computes emissions and every loss term as the original code does; the two must agree to 1e-5, and the
model's total loss must equal the weighted sum of the reference's terms. The originals:

- the CRF seeds (AFNER / AFDVQF, liguochun0304/AFDVQF@034b93f model/base_model.py:216):
  ner_loss = -torchcrf.CRF(emissions, labels, mask, reduction="mean"), emissions = classifier(states);
- AFNER (@e0b3496) and AFDVQF (@034b93f): TypeQueryGenerator, MultiGrainedQuerySet, QueryGuidedFusion,
  AdaptiveFusionLayer (model/query_guided_fusion.py), the patch and region tokens of
  DualVisionTokenExtractor (model/dual_vision_extractor.py) and contrastive_loss (model/loss_functions.py);
- the softmax head (MANGO's README, "实体分类损失"): ce = cross_entropy(emissions / T, reduction="none"),
  loss = (ce * mask).sum() / mask.sum(), a token mean; MANGO's classifier is LayerNorm + Linear
  (liguochun0304/AFDVQF@d3b9439 model.py:313-318);
- the BiLSTM (MANGO, liguochun0304/AFDVQF@d3b9439 model.py, "（可选）BiLSTM pack"): pack_padded_sequence
  of the states by post length, a bidirectional nn.LSTM, pad_packed_sequence.

Words are read at their first sub-word (the cache labels words, not sub-words): the reference gathers
the encoder's last hidden state there, as the model does.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torchcrf
from torch import nn

from mner.train.engine.config_files import load_run_config
from mner.train.zoo.model import MNERModel
from tests.train.factories import (
    LABELS,
    NUM_DETECTOR_CLASSES,
    TYPES,
    make_batch,
    make_posts,
    tiny_model,
    tiny_spec,
    tiny_tokenizer,
)
from tests.train.zoo.test_crf import legal
from tests.train.zoo.test_zoo import batch_for as zoo_batch
from tests.train.zoo.test_zoo import build as zoo_build
from tests.train.zoo.test_zoo import config as zoo_config

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


# ------------------------------------------------------------------ MANGO (liguochun0304/AFDVQF@a20bc9e)


class GatedConcatFusion(nn.Module):
    """model.py:108-140 of the original, verbatim but for the init (weights are loaded)."""

    def __init__(self, hidden_dim, rel_temp=2.0):
        super().__init__()
        self.ln_t = nn.LayerNorm(hidden_dim)
        self.ln_v = nn.LayerNorm(hidden_dim)
        self.proj = nn.Linear(hidden_dim * 2, hidden_dim)
        self.gate = nn.Linear(hidden_dim * 2, hidden_dim)
        self.rel_head = nn.Sequential(
            nn.Linear(hidden_dim * 2, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1)
        )
        self.alpha = nn.Parameter(torch.tensor(0.02))
        self.rel_temp = rel_temp

    def forward(self, text_feat, img_ctx):
        t = self.ln_t(text_feat)
        v = self.ln_v(img_ctx)
        z = torch.cat([t, v], dim=-1)
        rel = torch.sigmoid(self.rel_head(z) / self.rel_temp)
        v = v * rel
        zf = torch.cat([t, v], dim=-1)
        fused = self.proj(zf)
        g = torch.sigmoid(self.gate(zf))
        return text_feat + self.alpha * (g * fused), rel


def compute_alignment_loss_v2(text_ctx, fused, mask=None, beta=0.3):
    """model.py:276-291 of the original."""
    t = F.normalize(text_ctx, dim=-1)
    v = F.normalize(fused, dim=-1)
    cos = (t * v).sum(-1)
    loss = (1.0 - cos) + beta * F.mse_loss(fused, text_ctx, reduction="none").mean(-1)
    return (loss * mask).sum() / (mask.sum() + 1e-6)


def info_nce(z1, z2, tau=0.15):
    """model.py:294-298 of the original: one direction, text -> image."""
    logits = torch.matmul(z1, z2.t()) / tau
    labels = torch.arange(z1.size(0), device=z1.device)
    return F.cross_entropy(logits, labels)


def test_mango_fusion_and_every_loss_term_are_the_originals():
    cfg = dict(
        fusion="mango",
        adaptive_gate=False,
        alignment_loss_weight=0.0,
        head="softmax",
        emission_temperature=2.5,
        emission_norm=True,
        stack_layers=2,
        resampler_queries=4,
        rel_temp=2.0,
        use_regions=False,
        patch_cls=False,
        global_from_cls=True,
        align_lambda=0.2,
        preserve_lambda=0.05,
        nce_lambda=0.02,
        sparsity_lambda=0.01,
        dropout=0.0,
        image_dropout=0.0,
    )
    model = tiny_model(seed=7, **cfg).eval()
    model.epoch = 2  # warm-up factor 2 / 5
    batch = make_batch(make_posts(4, seed=5))
    fusion = model.fusion
    # text and image sides as the model gives them (the visual token builder is the project's)
    txt = word_states(model, batch)  # (B, T, D)
    img, img_mask = model.encode_visual(batch)  # (B, P - 1, D): the CLS state is dropped
    assert img.shape[1] == batch["patch_tokens"].shape[1] - 1
    # VisualResampler (model.py:243-256): LN(attn(queries, img, img))
    q = fusion.resampler.queries.unsqueeze(0).expand(img.shape[0], -1, -1)
    out, _ = fusion.resampler.attention(q, img, img, key_padding_mask=~img_mask)
    img_tokens = fusion.resampler.ln(out)
    # the stack the README describes: per block self-attn, cross-attn, FFN, each residual + LayerNorm
    h = txt
    for block in fusion.blocks:
        a, _ = block.self_attention(h, h, h, key_padding_mask=~batch["word_mask"])
        h = block.norms[0](h + a)
        c, _ = block.cross_attention(h, img_tokens, img_tokens)
        h = block.norms[1](h + c)
        h = block.norms[2](h + block.ffn(h))
    gated = GatedConcatFusion(txt.shape[-1])
    gated.load_state_dict(fusion.gated.state_dict())
    fused, rel = gated(txt, h)  # fusion(txt, txt_ctx)
    mask = batch["word_mask"].float()
    tags, word_mask = targets(batch)
    entity_mask = (tags > 0).float()  # label id 0 is "O"
    align = (
        2 / 5 * compute_alignment_loss_v2(txt, fused, mask=mask * (rel.detach().squeeze(-1) + entity_mask))
    )
    preserve_map = F.mse_loss(fused, txt, reduction="none").mean(-1)
    preserve = (preserve_map * mask * (1.0 - rel.squeeze(-1))).sum() / (mask.sum() + 1e-6)
    txt_pool = F.normalize((txt * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    v_global = F.normalize(model.visual.patch_proj(batch["patch_tokens"][:, 0]), dim=-1)  # clip_proj(CLS)
    nce = info_nce(txt_pool, v_global, tau=0.15)
    sparsity = (rel.squeeze(-1) * mask).sum() / mask.sum()  # over the words (see mango.py's deviations)
    # the classifier (@d3b9439 model.py:313-318): LayerNorm, then Linear
    classifier = nn.Sequential(nn.LayerNorm(fused.shape[-1]), nn.Linear(fused.shape[-1], len(LABELS)))
    classifier[0].load_state_dict(model.emission_norm.state_dict())
    classifier[1].load_state_dict(model.emission.state_dict())
    logits = classifier(fused)
    emissions = logits / 2.5
    B, T, L = emissions.shape
    ce = F.cross_entropy(emissions.view(-1, L), tags.view(-1), reduction="none").view(B, T)
    ce = (ce * mask).sum() / mask.sum()

    emitted = model._emissions(batch, batch["image_mask"])[0]
    torch.testing.assert_close(emitted, logits, atol=TOL, rtol=0)
    got = model(batch)  # eval mode: the text encoder's own dropout is off
    terms = {"softmax": ce, "mango_align": align, "mango_preserve": preserve, "mango_nce": nce}
    terms["mango_sparsity"] = sparsity
    for name, expected in terms.items():
        assert got[f"{name}_loss"].item() == pytest.approx(expected.item(), abs=TOL), name
    total = ce + 0.2 * align + 0.05 * preserve + 0.02 * nce + 0.01 * sparsity
    assert got["loss"].item() == pytest.approx(total.item(), abs=TOL)


@pytest.mark.parametrize("name", ["mango", "bert-softmax"])
def test_the_softmax_models_decode_each_words_argmax_as_mango_does(name):
    """As their files build them: `emissions.argmax(dim=-1)` (@d3b9439 model.py:514); model.bio_constraints
    switches to the constrained decode (tested against enumeration in test_heads.py)."""
    cfg = zoo_config(name, "model.dropout=0.0", "model.image_dropout=0.0")
    model = zoo_build(cfg).eval()
    batch = zoo_batch(cfg, n=6)
    with torch.no_grad():
        emissions = model._emissions(batch, None)[0]  # (B, T, L)
    lengths = batch["word_mask"].sum(dim=1).tolist()
    argmax = [emissions[b, :n].argmax(-1).tolist() for b, n in enumerate(lengths)]
    assert [path[:n] for path, n in zip(model.decode(batch), lengths)] == argmax
    assert any(not legal(LABELS, path) for path in argmax)  # so a constrained decode would differ
    model.head.constrained = True
    assert [path[:n] for path, n in zip(model.decode(batch), lengths)] == model.head.decode(
        emissions, batch["word_mask"]
    )


# ------------------------------------- AFNER (liguochun0304/AFDVQF@e0b3496) and AFDVQF (@034b93f)


def type_query_init(text_encoder, tokenizer, type_names):
    """TypeQueryGenerator._build_init_queries (query_guided_fusion.py:24-38)."""
    prompts = [f"{tokenizer.mask_token} is {t}" for t in type_names]
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    out = text_encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask_pos = (enc["input_ids"] == tokenizer.mask_token_id).long().argmax(dim=1)
    return out[torch.arange(out.size(0)), mask_pos]  # [T,H]


def multi_grained_queries(type_queries, entity_queries, slots_per_type):
    """MultiGrainedQuerySet.forward (query_guided_fusion.py:52-57)."""
    T, H = type_queries.shape
    type_rep = type_queries.unsqueeze(1).repeat(1, slots_per_type, 1).view(-1, H)  # [Q,H]
    return type_rep + entity_queries


class QueryGuidedFusion(nn.Module):
    """query_guided_fusion.py:60-108, verbatim but for the init (weights are loaded)."""

    def __init__(self, hidden_dim, num_heads, num_layers, dropout):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(num_layers):
            ffn = [
                nn.Sequential(
                    nn.Linear(hidden_dim, hidden_dim * 4),
                    nn.GELU(),
                    nn.Dropout(dropout),
                    nn.Linear(hidden_dim * 4, hidden_dim),
                    nn.Dropout(dropout),
                )
                for _ in range(2)
            ]
            self.layers.append(
                nn.ModuleDict({
                    "q2t": nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True),
                    "q2v": nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True),
                    "t2v": nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout, batch_first=True),
                    "norm_q": nn.LayerNorm(hidden_dim),
                    "norm_t": nn.LayerNorm(hidden_dim),
                    "ffn_q": ffn[0],
                    "ffn_t": ffn[1],
                })
            )  # fmt: skip

    def forward(self, queries, text_feat, text_mask, vision_feat, vision_mask):
        key_padding_text = text_mask == 0
        key_padding_vis = vision_mask == 0
        for layer in self.layers:
            q1, _ = layer["q2t"](queries, text_feat, text_feat, key_padding_mask=key_padding_text)
            queries = layer["norm_q"](queries + q1)
            q2, _ = layer["q2v"](queries, vision_feat, vision_feat, key_padding_mask=key_padding_vis)
            queries = layer["norm_q"](queries + q2)
            t1, _ = layer["t2v"](text_feat, vision_feat, vision_feat, key_padding_mask=key_padding_vis)
            text_feat = layer["norm_t"](text_feat + t1)
            queries = queries + layer["ffn_q"](queries)
            text_feat = text_feat + layer["ffn_t"](text_feat)
        return queries, text_feat


def dual_vision_tokens(visual, batch):
    """DualVisionTokenExtractor (dual_vision_extractor.py) from the cached tokens, with the model's weights:
    _encode_patch_tokens (:111-124) over last_hidden_state[:, 1:], then the region tokens of
    _encode_regions (:276-292), feature + label + box + score under det_norm, zero where no region."""
    patch = visual.patch_proj(batch["patch_tokens"][:, 1:])  # vision_proj(patch)
    q = visual.resampler_queries.unsqueeze(0).expand(patch.size(0), -1, -1)
    resampled, _ = visual.resampler(q, patch, patch, key_padding_mask=None)
    resampled = visual.resampler_norm(resampled)
    feat = visual.region_proj(batch["region_feats"])  # the region's embedding through a projection
    feat = feat + visual.label_embed(batch["region_labels"])
    feat = feat + visual.box_embed(batch["region_boxes"])  # det_box_proj: Linear(4) + LayerNorm
    feat = feat + visual.score_embed(batch["region_scores"][..., None])
    region_mask = batch["region_mask"].long()
    region_feat = visual.region_norm(feat) * region_mask[..., None]
    tokens = torch.cat([resampled, region_feat], dim=1)
    mask = torch.cat([torch.ones_like(resampled[..., 0], dtype=torch.long), region_mask], dim=1)
    return tokens, mask


def masked_mean(feat, mask):
    """base_model.py _masked_mean."""
    m = mask.to(dtype=feat.dtype)
    denom = m.sum(dim=1, keepdim=True).clamp(min=1.0)
    return (feat * m.unsqueeze(-1)).sum(dim=1) / denom


def contrastive_loss(text_features, image_features, temperature=0.07):
    """loss_functions.py: symmetric InfoNCE."""
    t = F.normalize(text_features, dim=-1)
    i = F.normalize(image_features, dim=-1)
    logits = torch.matmul(t, i.transpose(0, 1)) / temperature
    labels = torch.arange(logits.size(0))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.transpose(0, 1), labels))


def qgf_model(name: str, seed: int) -> MNERModel:
    """The model file's settings on tiny-bert (width 32), smaller where size does not matter."""
    cfg, _ = load_run_config(model=name)
    cfg = dataclasses.replace(
        cfg, text_encoder="tiny-bert", max_length=32, slots_per_type=3, patch_resampler_queries=4, dropout=0.0
    )
    torch.manual_seed(seed)
    return MNERModel(cfg, LABELS, tiny_spec(), cfg.text_encoder, NUM_DETECTOR_CLASSES).eval()


@pytest.mark.parametrize("name", ["afner", "afdvqf"])
def test_query_guided_fusion_and_every_loss_term_are_the_originals(name):
    model = qgf_model(name, seed=11)
    cfg = model.cfg
    assert (cfg.qfnet_heads, cfg.visual_builder, cfg.patch_cls, cfg.alignment_pooling) == (
        8,
        "dual",
        False,
        "cls",
    )
    fusion = model.fusion
    # The query init: "[MASK] is TYPE" through the (untrained) text encoder.
    with torch.no_grad():
        init = type_query_init(model.encoder, tiny_tokenizer(), list(TYPES))
    torch.testing.assert_close(fusion.type_queries.detach(), init, atol=TOL, rtol=0)
    with torch.no_grad():  # move the weights off their init, so a wrong wiring cannot hide behind it
        fusion.type_queries.add_(torch.randn_like(fusion.type_queries))
        fusion.adaptive_weights.text_weight.fill_(0.8)
        fusion.adaptive_weights.vision_weight.fill_(-1.7)
    batch = make_batch(make_posts(4, seed=6), statuses={})
    assert batch["image_mask"].all() and batch["region_mask"].any(dim=1).all()

    text_out = model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    text_feat = torch.stack([text_out[b, batch["first_subword"][b]] for b in range(4)])  # words, (B, T, H)
    vis_feat, vis_mask = dual_vision_tokens(model.visual, batch)
    vision_global = masked_mean(vis_feat, vis_mask)
    queries = multi_grained_queries(fusion.type_queries, fusion.slots, cfg.slots_per_type)
    queries = queries.unsqueeze(0).expand(4, -1, -1)
    qfnet = QueryGuidedFusion(32, 8, cfg.qfnet_layers, 0.0)
    qfnet.load_state_dict(fusion.layers.state_dict(prefix="layers."))
    final_queries, enhanced_text = qfnet(queries, text_feat, batch["word_mask"].long(), vis_feat, vis_mask)
    enhanced_text = 0.8 * enhanced_text + -1.7 * vision_global.unsqueeze(1)  # AdaptiveFusionLayer
    emissions = model.emission(enhanced_text)  # classifier
    tags, mask = targets(batch)
    ner_loss = reference_crf_loss(model, emissions, tags, mask)
    align_loss = contrastive_loss(text_out[:, 0, :], vision_global, temperature=0.07)  # text_feat[:, 0]

    visual, visual_mask = model.encode_visual(batch)
    torch.testing.assert_close(visual * visual_mask[..., None], vis_feat, atol=TOL, rtol=0)
    torch.testing.assert_close(model._emissions(batch, batch["image_mask"])[0], emissions, atol=TOL, rtol=0)
    torch.testing.assert_close(fusion.final_slots, final_queries, atol=TOL, rtol=0)
    got = model(batch)
    assert got["crf_loss"].item() == pytest.approx(ner_loss.item(), abs=TOL)
    assert got["align_loss"].item() == pytest.approx(align_loss.item(), abs=TOL)
    assert got["slot_type_loss"].item() == 0.0  # ours, off: the originals have no such term
    total = ner_loss + 0.1 * align_loss
    assert got["loss"].item() == pytest.approx(total.item(), abs=TOL)
