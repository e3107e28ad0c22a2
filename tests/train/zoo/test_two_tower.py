"""IFAformer's two towers (model.fusion "two_tower"): DeepKE's key/value exchange, checked against a
literal transcription of its encoder, trained from the cache's embedding output, and refused where the
towers cannot pair."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from mner.cache.reader import CacheReader
from mner.train.engine.config import ModelConfig
from mner.train.engine.runs import vision_blocks_of
from mner.train.zoo.model import MNERModel
from tests.train.engine import test_vision_training as vision
from tests.train.run_factories import run_config, single_thread  # noqa: F401 (single_thread: autouse fixture)

data = vision.data  # the fixture: a data folder with tiny-clip caches at K = 2 (all) and K = 0
model_and_batch = vision.model_and_batch
TWO_TOWER = {"fusion": "two_tower", "emission_lr": "crf", "adaptive_gate": False, "alignment_loss_weight": 0.0,
             "image_dropout": 0.0, "max_length": 24}  # fmt: skip


# ---- DeepKE's IFAEncoder, transcribed (zjunlp/DeepKE@568edd4 modeling_IFA.py). `values_bug` and
# `mask_bug` switch on the two lines the model deviates from (the text layers' values are the vision
# keys, :352; the vision keys' mask adds 1 to the scores, :359); everything else is the original's.


def deepke_clip_attention(attn, hidden_states, past_key_values):
    bsz, tgt_len, embed_dim = hidden_states.size()
    query_states = attn.q_proj(hidden_states) * attn.scale

    def _shape(tensor, seq_len, bsz):
        return tensor.view(bsz, seq_len, attn.num_heads, attn.head_dim).transpose(1, 2).contiguous()

    key_states = _shape(attn.k_proj(hidden_states), -1, bsz)
    value_states = _shape(attn.v_proj(hidden_states), -1, bsz)
    qks = (key_states, value_states)
    key_states = torch.cat([past_key_values[0], key_states], dim=2)
    value_states = torch.cat([past_key_values[1], value_states], dim=2)
    proj_shape = (bsz * attn.num_heads, -1, attn.head_dim)
    query_states = _shape(query_states, tgt_len, bsz).view(*proj_shape)
    key_states = key_states.view(*proj_shape)
    value_states = value_states.view(*proj_shape)
    attn_weights = nn.functional.softmax(torch.bmm(query_states, key_states.transpose(1, 2)), dim=-1)
    attn_output = torch.bmm(attn_weights, value_states)
    attn_output = attn_output.view(bsz, attn.num_heads, tgt_len, attn.head_dim).transpose(1, 2)
    return attn.out_proj(attn_output.reshape(bsz, tgt_len, embed_dim)), qks


def deepke_clip_layer(layer, hidden_states, past_key_values):
    residual = hidden_states
    hidden_states, qks = deepke_clip_attention(
        layer.self_attn, layer.layer_norm1(hidden_states), past_key_values
    )
    hidden_states = residual + hidden_states
    residual = hidden_states
    hidden_states = residual + layer.mlp(layer.layer_norm2(hidden_states))
    return hidden_states, qks


def deepke_bert_layer(layer, hidden_states, attention_mask, past_key_values, values_bug, mask_bug):
    sa = layer.attention.self
    heads, size = sa.num_attention_heads, sa.attention_head_size

    def transpose_for_scores(x):
        return x.view(*x.size()[:-1], heads, size).permute(0, 2, 1, 3)

    key_layer = transpose_for_scores(sa.key(hidden_states))
    value_layer = transpose_for_scores(sa.value(hidden_states))
    query_layer = transpose_for_scores(sa.query(hidden_states))
    qks = (key_layer, value_layer)
    key_layer = torch.cat([past_key_values[0], key_layer], dim=2)
    value_layer = torch.cat([past_key_values[0 if values_bug else 1], value_layer], dim=2)
    attention_scores = torch.matmul(query_layer, key_layer.transpose(-1, -2)) / math.sqrt(size)
    bsz, nheads, length, dsize = past_key_values[0].size()
    visual_attention_mask = (torch.ones if mask_bug else torch.zeros)((bsz, 1, 1, length))
    attention_scores = attention_scores + torch.cat((visual_attention_mask, attention_mask), dim=-1)
    context_layer = torch.matmul(nn.Softmax(dim=-1)(attention_scores), value_layer)
    context_layer = context_layer.permute(0, 2, 1, 3).contiguous()
    context_layer = context_layer.view(*context_layer.size()[:-2], heads * size)
    attention_output = layer.attention.output(context_layer, hidden_states)
    return layer.output(layer.intermediate(attention_output), attention_output), qks


def deepke_encoder(vision_layers, text_layers, vision_embeds, text_embeds, attention_mask, heads,
                   values_bug=False, mask_bug=False):  # fmt: skip
    extended = (1.0 - attention_mask[:, None, None, :].to(torch.long)) * -10000.0
    vision_hidden_states, text_hidden_states = vision_embeds, text_embeds
    text_qks = None
    for idx in range(len(vision_layers)):
        if idx == 0:
            bsz, length, dsize = text_embeds.size()
            visual_past_key_values = (text_embeds.view(bsz, heads, length, dsize // heads),) * 2
        else:
            visual_past_key_values = text_qks
        vision_hidden_states, vision_qks = deepke_clip_layer(
            vision_layers[idx], vision_hidden_states, visual_past_key_values
        )
        if idx == 0:
            bsz, length, dsize = vision_embeds.size()
            text_past_key_values = (vision_embeds.view(bsz, heads, length, dsize // heads),) * 2
        else:
            text_past_key_values = vision_qks
        text_hidden_states, text_qks = deepke_bert_layer(
            text_layers[idx], text_hidden_states, extended, text_past_key_values, values_bug, mask_bug
        )
    return text_hidden_states


def reference_states(model: MNERModel, batch: dict, max_length: int, **bugs) -> torch.Tensor:
    """The original's last text states (B, max_length, D) of every post, padded as DeepKE pads."""
    pad = max_length - batch["input_ids"].shape[1]
    input_ids = nn.functional.pad(batch["input_ids"], (0, pad), value=model.encoder.config.pad_token_id)
    attention = nn.functional.pad(batch["attention_mask"], (0, pad))
    text_embeds = model.encoder.embeddings(input_ids=input_ids)
    return deepke_encoder(
        model.vision_blocks.layers, model.encoder.encoder.layer, batch["vision_state"], text_embeds, attention,
        model.encoder.config.num_attention_heads, **bugs,
    )  # fmt: skip


def test_the_towers_compute_deepkes_encoder(data):
    """The model's text states of the posts with an image equal the transcribed original's to 1e-5
    (same weights, same inputs, eval mode), and each of the two named bugs, switched back on, moves them:
    the deviations are those two and nothing else."""
    model, batch = model_and_batch(data, "k2", **TWO_TOWER)
    model.eval()
    ok = batch["image_mask"]
    rows = ok.nonzero().squeeze(1)
    assert 0 < len(rows) < len(ok)
    with torch.no_grad():
        ours = model.fusion.text_states(model.encoder, model.vision_blocks.layers, batch, rows)
        theirs = reference_states(model, {k: v[rows] for k, v in batch.items() if torch.is_tensor(v)}, 24)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
        for bug in ("values_bug", "mask_bug"):
            buggy = reference_states(model, {k: v[rows] for k, v in batch.items() if torch.is_tensor(v)}, 24,
                                     **{bug: True})  # fmt: skip
            assert (buggy - theirs).abs().max() > 1e-3, bug


def test_a_post_keeps_its_output_in_any_batch_and_without_an_image_is_text_only(data):
    """Padded to model.max_length, a post's word states do not depend on the posts beside it; a post
    with no image gets the text-only states bitwise."""
    model, batch = model_and_batch(data, "k2", **TWO_TOWER)
    model.eval()
    ok = batch["image_mask"]
    with torch.no_grad():
        whole = model._emissions(batch, ok)[0]
        first = int(ok.nonzero()[0])
        alone = {k: v[first : first + 1] if torch.is_tensor(v) else v for k, v in batch.items()}
        S = int(alone["attention_mask"].sum())
        alone = {
            **alone,
            "input_ids": alone["input_ids"][:, :S],
            "attention_mask": alone["attention_mask"][:, :S],
        }
        torch.testing.assert_close(model._emissions(alone, ok[first : first + 1])[0], whole[first : first + 1],
                                   rtol=0, atol=1e-5)  # fmt: skip
        text_only = model._emissions(batch, torch.zeros_like(ok))[0]
        assert torch.equal(whole[~ok], text_only[~ok])
        assert (whole[ok] - text_only[ok]).abs().max() > 1e-3


@pytest.mark.parametrize("k", [-1, 1, 0])
def test_the_top_k_tower_layers_learn_and_the_rest_stays(data, k):
    """After one optimiser step on the model's loss the top k vision layers (k = -1: all) changed,
    except the parameters no output depends on (the last layer's queries, output projection and MLP);
    the layers below k, the pooled-CLS head and those dead parameters did not."""
    model, batch = model_and_batch(data, "k2", **TWO_TOWER, vision_trainable_blocks=k)
    model.train()
    before = {name: p.detach().clone() for name, p in model.vision_blocks.named_parameters()}
    groups = model.param_groups(run_config(data["tmp"] / "unused", data["k2"], data["data"]).train)
    optimiser = torch.optim.AdamW(groups)
    model(batch)["loss"].backward()
    optimiser.step()
    trained = 2 if k == -1 else k
    for name, p in model.vision_blocks.named_parameters():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        dead = layer == 1 and re.match(r"layers\.1\.(self_attn\.(q_proj|out_proj)|layer_norm2|mlp)\.", name)
        learns = layer is not None and layer >= 2 - trained and not dead
        assert p.requires_grad == learns, name
        assert (not torch.equal(p, before[name])) == learns, name


def test_refusals(data, tmp_path):
    """A cache without the embedding output names the command that stores it; towers of another
    shape, a frozen text prefix and an alignment loss are refused by name."""
    cfg = run_config(tmp_path / "run", data["k0"], data["data"], text_encoder="tiny-bert", **TWO_TOWER)
    with pytest.raises(ValueError) as caught:
        vision_blocks_of(cfg.model, CacheReader(data["k0"]), data["data"])
    message = str(caught.value)
    assert "stores no vision state (extracted without --vision-trainable-blocks)" in message
    assert "--vision-trainable-blocks 2" in message and "--model ifaformer-single" in message
    with pytest.raises(ValueError, match="text_frozen_layers = 1 freezes text encoder layers"):
        ModelConfig(**{**TWO_TOWER, "text_frozen_layers": 1})
    with pytest.raises(ValueError, match=r"model.alignment_loss_weight > 0 reads visual tokens"):
        model_and_batch(data, "k2", **{**TWO_TOWER, "alignment_loss_weight": 0.1})
    with CacheReader(data["k2"]) as reader:
        spec, blocks = reader.spec, reader.vision_blocks_config()
    with pytest.raises(ValueError, match=r"text encoder minilm has 6 layers of width 384 with 12 heads and the "
                                         r"cache's CLIP 2 of width 32 with 2 heads"):  # fmt: skip
        MNERModel(
            ModelConfig(**TWO_TOWER, text_encoder="minilm"),
            ["O", "B-LOC"],
            spec,
            "minilm",
            vision_blocks=blocks,
        )


def test_a_run_evaluates_predicts_and_resumes_as_it_trained(data, tmp_path, monkeypatch):
    """ifaformer's two towers through train_from_cache: the whole tower trains (its live weights moved,
    the dead ones are the cache's), evaluate, predict on re-extracted images and a resume match the run."""
    from safetensors.torch import load_file

    from mner.train.engine.loop import train_from_cache

    model = {**TWO_TOWER, "vision_trainable_blocks": -1}
    train = {"lr_vision": 1e-3}
    straight = train_from_cache(
        run_config(tmp_path / "straight", data["k2"], data["data"], epochs=2, train=train, **model)
    )
    weights = load_file(straight / "model.safetensors")
    stored = CacheReader(data["k2"]).vision_blocks()[1]
    for name, moved in (("layers.0.mlp.fc1.weight", True), ("layers.1.self_attn.k_proj.weight", True),
                        ("layers.1.mlp.fc1.weight", False)):  # fmt: skip
        assert torch.equal(weights[f"vision_blocks.{name}"], torch.from_numpy(stored[name])) != moved, name
    vision.check_evaluate_predict_resume(data, tmp_path, monkeypatch, straight, model, train)


def test_the_token_switches_are_no_ops_for_the_towers():
    """An ablation arm that only switches cached tokens (no_patch, no_region) trains the same two-tower
    model, so it is named a no-op; the tower's own settings are not."""
    from mner.train.zoo.model import used_settings

    base = ModelConfig(**TWO_TOWER)
    for change in ({"use_patches": False}, {"use_regions": False}, {"visual_builder": "dual"}):
        assert used_settings(ModelConfig(**{**TWO_TOWER, **change})) == used_settings(base), change
    for change in ({"vision_trainable_blocks": 1}, {"max_length": 30}, {"dropout": 0.3}):
        assert used_settings(ModelConfig(**{**TWO_TOWER, **change})) != used_settings(base), change
