"""IFAformer as DeepKE builds it: a vision tower whose layers exchange keys and values with the text layers.

zjunlp/DeepKE@568edd4, src/deepke/name_entity_re/multimodal/models/modeling_IFA.py (IFAEncoder.forward,
:575-658; CLIPAttention.forward :226-290; BertSelfAttention.forward :328-381). The two towers have the
same depth, width and head count (DeepKE asserts the depth and hard-codes 12 heads; here all three are
checked). For layer i = 0..L-1, vision first:

    vision = CLIPLayer_i(vision; keys, values = [text_kv; its own])     (B, P, D) vision queries read the text
    text   = BertLayer_i(text;   keys, values = [vision_kv; its own])   (B, S, D) text queries read the image

    text_kv   (B, H, S, D/H) each: for layer 0 the text embeddings `view(B, H, S, D/H)` as keys and as values
              (no projection, and a reshape, not a split into heads: :604); for layer i > 0 the keys and
              values text layer i-1 computed from its own input
    vision_kv (B, H, P, D/H) each: for layer 0 the vision embeddings after CLIP's pre-LayerNorm, reshaped
              the same way (:622); for layer i > 0 the keys and values vision layer i computed from its
              input (after its layer_norm1)

Vision queries see every text key, padding included (CLIP's attention takes no mask); DeepKE pads every
post to max_seq sub-words (dataset.py, encode_plus padding='max_length'), so a post with an image is
padded to model.max_length here too, and its output does not depend on its batch. Text queries see the
vision keys and the unpadded sub-words of their post (DeepKE's -10000 mask). The word states are the
last text layer's. The vision tower's own output is never read, only the keys and values it hands the
text, so its last layer computes those alone and its other parameters (never used by DeepKE's loss
either) are frozen.

Deviations, each with its reason:
- Forced by the cache: the tower reads the embedding output the cache stores (`extract-features
  --vision-trainable-blocks` = the CLIP's layer count): [CLS] and the whole image's patches with CLIP's
  positions, after pre-LayerNorm, so the patch embedding and the positions stay frozen. DeepKE feeds
  [CLS] (no position) + 3 visual-grounding crops at 128 px (48 tokens) + 3 detector crops at 64 px
  (12 tokens), each kind with its own learned positions, and not the whole image; its grounding crops
  come from a tool outside its code (its data release ships them).
- Bug in the original: its text layers use the vision KEYS as values (`value_layer =
  torch.cat([past_key_values[0], value_layer])`, :352); here the vision values.
- Bug in the original: the vision keys' mask is a tensor of ones added to the text queries' scores
  (:359), which raises every vision score by 1; here 0 (no vision token is hidden).
- The rule every fusion keeps (train/zoo/fusion.py): a post without a usable image gets exactly the
  text-only computation, the plain encoder; DeepKE reads a placeholder image (inf.png) for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mner.train.zoo.text import split_layers

if TYPE_CHECKING:
    from mner.train.engine.config import ModelConfig

# DeepKE's additive mask for a padded sub-word (get_extended_attention_mask).
_HIDDEN = -10000.0


class TwoTowerFusion(nn.Module):
    """registry.FUSIONS "two_tower": IFAformer's vision tower beside the text encoder's layers.

    It holds no parameters: the text layers are the encoder's, the vision layers MNERModel's
    `vision_blocks` (the cache's whole CLIP encoder). MNERModel sees `two_tower` and calls `encode`.
    """

    uses_pooled = False
    two_tower = True  # MNERModel builds no visual token builder and calls `encode` (one place: _emissions)

    def __init__(self, cfg: ModelConfig, width: int, entity_types: Sequence[str] = ()):
        super().__init__()
        self.max_length = cfg.max_length

    def forward(self, *args, **kwargs):
        raise TypeError("two_tower fusion runs inside the text encoder: call encode(encoder, tower, ...)")

    def encode(
        self, encoder: nn.Module, tower: Sequence[nn.Module], batch: dict, words: Tensor, image_mask: Tensor
    ) -> Tensor:
        """Word states (B, T, D): the last text layer's for posts whose image_mask (B,) is True, `words`'
        rows (the text-only states), bitwise, for the others.

        Args:
            encoder: the Hugging Face base model (.embeddings, .encoder.layer; checked by check_towers).
            tower: the vision layers (CLIPEncoderLayer), as many as the encoder's.
            batch: input_ids (B, S), attention_mask (B, S), first_subword (B, T), vision_state (B, P, D).
            words: (B, T, D) the text-only word states of the same batch.
        """
        rows = image_mask.nonzero().squeeze(1)  # (Bi,) the posts with an image
        if not len(rows):
            return words
        text = self.text_states(encoder, tower, batch, rows)  # (Bi, max_length, D)
        index = batch["first_subword"][rows][..., None].expand(-1, -1, text.shape[-1])  # (Bi, T, D)
        return words.index_copy(0, rows, text.gather(1, index).to(words.dtype))  # (B, T, D)

    def text_states(
        self, encoder: nn.Module, tower: Sequence[nn.Module], batch: dict, rows: Tensor
    ) -> Tensor:
        """The last text layer's states (Bi, max_length, D) of the posts `rows`, padded to max_length."""
        input_ids, attention = batch["input_ids"][rows], batch["attention_mask"][rows]  # (Bi, S)
        pad = self.max_length - input_ids.shape[1]
        if pad > 0:
            pad_id = encoder.config.pad_token_id or 0
            input_ids = F.pad(input_ids, (0, pad), value=pad_id)  # (Bi, max_length)
            attention = F.pad(attention, (0, pad), value=0)
        text = encoder.embeddings(input_ids=input_ids)  # (Bi, L, D) word + position + type
        vision = batch["vision_state"][rows].to(text.dtype)  # (Bi, P, D) after CLIP's pre-LayerNorm
        heads = encoder.config.num_attention_heads
        scores_mask = (1.0 - attention[:, None, None, :].to(text.dtype)) * _HIDDEN  # (Bi, 1, 1, L)
        scores_mask = torch.cat(
            [scores_mask.new_zeros(*scores_mask.shape[:3], vision.shape[1]), scores_mask], -1
        )
        text_kv = (reshape_heads(text, heads),) * 2  # (Bi, H, L, D/H) what vision layer 0 reads
        embedded = (reshape_heads(vision, heads),) * 2  # (Bi, H, P, D/H) what text layer 0 reads
        hidden, last = text, len(tower) - 1
        for i, (vision_layer, text_layer) in enumerate(zip(tower, encoder.encoder.layer)):
            own = None
            if i < last:  # the last vision layer's output would never be read: its keys and values alone
                vision_next, own = vision_attend(vision_layer, vision, text_kv, heads)  # (Bi, P, D)
            elif i > 0:
                own = vision_keys_values(vision_layer, vision, heads)[1]
            hidden, text_kv = text_attend(text_layer, hidden, scores_mask, embedded if i == 0 else own)
            if i < last:
                vision = vision_next
        return hidden  # (Bi, L, D)


def reshape_heads(states: Tensor, heads: int) -> Tensor:
    """(B, N, D) -> (B, H, N, D/H) by `view`, as DeepKE hands the embeddings to the other tower's first
    layer: memory order kept, so head h, position n holds sub-vector (h * N + n) % H of token (h * N + n) // H."""
    B, N, D = states.shape
    return states.reshape(B, heads, N, D // heads)


def split_heads(states: Tensor, heads: int) -> Tensor:
    """(B, N, D) -> (B, H, N, D/H): the usual split of projected keys, values or queries into heads."""
    B, N, D = states.shape
    return states.view(B, N, heads, D // heads).transpose(1, 2)


def merge_heads(states: Tensor) -> Tensor:
    """(B, H, N, D/H) -> (B, N, D)."""
    B, H, N, d = states.shape
    return states.transpose(1, 2).reshape(B, N, H * d)


def vision_keys_values(layer: nn.Module, vision: Tensor, heads: int) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """A CLIP layer's normed input (B, P, D) (its layer_norm1 of vision (B, P, D)) and its own keys and
    values (B, H, P, D/H) of it."""
    normed = layer.layer_norm1(vision)  # (B, P, D)
    attention = layer.self_attn
    return normed, (
        split_heads(attention.k_proj(normed), heads),
        split_heads(attention.v_proj(normed), heads),
    )


def vision_attend(
    layer: nn.Module, vision: Tensor, text_kv: tuple[Tensor, Tensor], heads: int
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """A CLIP encoder layer whose queries (B, P, D) also read the text's keys and values (B, H, S, D/H).

    DeepKE's CLIPEncoderLayer + CLIPAttention with past_key_values: pre-LayerNorm residual blocks,
    queries scaled by head_dim ** -0.5, no mask, attention dropout as the layer's config. Returns the
    layer's output (B, P, D) and its own keys and values (B, H, P, D/H), which text layer i reads.
    """
    attention = layer.self_attn
    normed, own = vision_keys_values(layer, vision, heads)
    query = split_heads(attention.q_proj(normed) * attention.scale, heads)  # (B, H, P, D/H)
    keys = torch.cat([text_kv[0], own[0]], dim=2)  # (B, H, S + P, D/H)
    values = torch.cat([text_kv[1], own[1]], dim=2)
    probs = torch.softmax(query @ keys.transpose(-1, -2), dim=-1)  # (B, H, P, S + P)
    probs = F.dropout(probs, p=attention.dropout, training=layer.training)
    vision = vision + attention.out_proj(merge_heads(probs @ values))  # (B, P, D)
    return vision + layer.mlp(layer.layer_norm2(vision)), own  # (B, P, D)


def text_attend(
    layer: nn.Module, hidden: Tensor, scores_mask: Tensor, vision_kv: tuple[Tensor, Tensor]
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """A BERT layer whose queries (B, L, D) also read the vision keys and values (B, H, P, D/H).

    scores_mask (B, 1, 1, P + L): 0 for a vision key and an unpadded sub-word, -10000 for padding.
    Returns the layer's output (B, L, D) and its own keys and values (B, H, L, D/H) of its input, which
    the next vision layer reads. BERT's post-LayerNorm residuals and dropouts, as BertLayer.
    """
    self_attention = layer.attention.self
    heads = self_attention.num_attention_heads
    query = split_heads(self_attention.query(hidden), heads)  # (B, H, L, D/H)
    own = split_heads(self_attention.key(hidden), heads), split_heads(self_attention.value(hidden), heads)
    keys = torch.cat([vision_kv[0], own[0]], dim=2)  # (B, H, P + L, D/H)
    values = torch.cat([vision_kv[1], own[1]], dim=2)
    scores = query @ keys.transpose(-1, -2) / query.shape[-1] ** 0.5 + scores_mask  # (B, H, L, P + L)
    probs = self_attention.dropout(torch.softmax(scores, dim=-1))
    attended = layer.attention.output(merge_heads(probs @ values), hidden)  # (B, L, D)
    return layer.output(layer.intermediate(attended), attended), own  # (B, L, D)


def check_towers(encoder: nn.Module, blocks: dict, text_encoder: str) -> None:
    """Refuse a text encoder and a cached vision encoder that cannot pair layer for layer.

    blocks: the cache's vision blocks config; it must store the embedding output of a CLIP.
    """
    layers = split_layers(encoder, "model.fusion = 'two_tower'", text_encoder)
    if blocks.get("kind") != "clip" or blocks.get("blocks") != blocks.get("layers"):
        raise ValueError(
            "model.fusion = 'two_tower' (IFAformer) runs a whole CLIP vision tower from the embedding output "
            f"the cache stores, but the cache stores the input of the last {blocks.get('blocks')} blocks of a "
            f"{blocks.get('kind')} model with {blocks.get('layers')}; extract it with a CLIP and "
            "--vision-trainable-blocks equal to its layer count"
        )
    text = (len(layers), encoder.config.hidden_size, encoder.config.num_attention_heads)
    vision = (blocks.get("layers"), blocks.get("hidden_size"), blocks.get("num_attention_heads"))
    if text != vision:
        raise ValueError(
            f"model.fusion = 'two_tower' (IFAformer) pairs each text layer with a vision layer of the same "
            f"width and heads, but text encoder {text_encoder} has {text[0]} layers of width {text[1]} with "
            f"{text[2]} heads and the cache's CLIP {vision[0]} of width {vision[1]} with {vision[2]} heads; "
            "extract the cache with a CLIP of the text encoder's shape (ViT-B/32 beside BERT-base), or use "
            "the single stream (--model ifaformer-single)"
        )


def dead_parameters(tower: Sequence[nn.Module]) -> list[nn.Parameter]:
    """The tower's parameters no output depends on: its last layer's queries, output projection and
    MLP (only its keys and values reach the text); with one layer, that layer whole (text layer 0 reads
    the embeddings themselves)."""
    last = tower[-1]
    if len(tower) == 1:
        return list(last.parameters())
    unused = (last.self_attn.q_proj, last.self_attn.out_proj, last.layer_norm2, last.mlp)
    return [parameter for module in unused for parameter in module.parameters()]
