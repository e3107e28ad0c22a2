"""IFAformer (seed 002) as a single stream: the text encoder's own layers run over words and image.

IFAformer (Li et al., "On Analyzing the Role of Image for Visual-enhanced Relation Extraction",
AAAI SA'23; DeepKE's multimodal NER example) lets text and vision meet inside one transformer
instead of in a fusion module after it. Here that is done on the cached tokens:

    text   = encoder.embeddings(input_ids)                         (B, S, D) word + position + type,
                                                                   exactly the text-only embedding
    visual = LayerNorm(tokens + segment + position[:V])            (B, V, D) VisualTokenBuilder's
                                                                   tokens, a learned visual segment
                                                                   and learned visual positions
    states = encoder.encoder([text; visual], key mask [text; visual])    (B, S + V, D)
    words  = states[:, :S] at each word's first sub-word            (B, T, D) -> emissions -> CRF

The visual tokens are appended AFTER the text, so the text keeps the positions the text-only model
gives it (BERT's 0..S-1, RoBERTa's padding_idx-offset ones, both from the encoder's own embeddings).
Every query of a post sees the valid keys of that post only: its unpadded sub-words and its unmasked
visual tokens.

The rule every fusion keeps (train/zoo/fusion.py): a post with no usable image gets exactly its
image-less output. Masking the visual keys is not enough for that: a softmax and a weighted sum over
S + V keys are not bitwise the sums over S even when the V extra terms are exact zeros (the
reduction groups differently). So the joint pass runs over the posts that have an image only, and
every other post keeps the word states of the plain text pass, which MNERModel computes for the
whole batch anyway (it is also what the auxiliary losses read as the words "before fusion").

Left out from the seed: the separate CLIP vision tower whose layers exchange keys and values with
the text layers (the cached CLIP tokens stand in for it), the visual-grounding crops and the
pixel-level region crops (the cache's detector regions stand in for both).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

if TYPE_CHECKING:
    from mner.train.engine.config import ModelConfig

# BERT's initializer_range: the learned visual segment and positions start as small as the encoder's.
_INIT_STD = 0.02


class SingleStreamFusion(nn.Module):
    """registry.FUSIONS "single_stream": the visual embeddings that join the text in the encoder.

    MNERModel does not call forward: it sees `single_stream` and calls `encode` with its encoder.
    """

    uses_pooled = False  # reads no pooled image vector (VisualTokenBuilder builds none)
    single_stream = True  # MNERModel runs its text encoder through `encode` (one place: _emissions)

    def __init__(self, cfg: ModelConfig, width: int, entity_types: Sequence[str] = ()):
        super().__init__()
        self.positions = cfg.visual_positions
        # Named "embeddings" as the encoder's own table module is: embedding tables are not
        # weight-decayed (MNERModel.param_groups; tests/train/engine/test_loop.py checks names).
        self.embeddings = nn.ModuleDict(
            {
                "segment": nn.Embedding(1, width),  # the visual segment (RoBERTa has no second type id)
                "position": nn.Embedding(cfg.visual_positions, width),  # visual position 0..V-1
                "norm": nn.LayerNorm(width),
            }
        )
        for name in ("segment", "position"):
            nn.init.normal_(self.embeddings[name].weight, std=_INIT_STD)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, *args, **kwargs):
        raise TypeError("single_stream fusion runs inside the text encoder: call encode(encoder, ...)")

    def visual_embeddings(self, visual: torch.Tensor) -> torch.Tensor:
        """visual (B, V, D) tokens -> (B, V, D) encoder inputs: + segment + position, LayerNorm, dropout.

        Raises ValueError when V exceeds model.visual_positions.
        """
        V = visual.shape[1]
        if V > self.positions:
            raise ValueError(
                f"the cache gives {V} visual tokens per post but model.visual_positions = {self.positions}; "
                f"set model.visual_positions >= {V}"
            )
        position = self.embeddings["position"].weight[:V]  # (V, D)
        segment = self.embeddings["segment"].weight[0]  # (D,)
        return self.dropout(self.embeddings["norm"](visual + segment + position))  # (B, V, D)

    def encode(
        self,
        encoder: nn.Module,
        batch: dict,
        words: torch.Tensor,
        visual: torch.Tensor,
        visual_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Word states (B, T, D) of one pass of the encoder's layers over each post's text and image.

        Args:
            encoder: the Hugging Face base model (BertModel, RobertaModel, ...): .embeddings, .encoder.
            batch: input_ids (B, S), attention_mask (B, S), first_subword (B, T).
            words: (B, T, D) the text-only word states (MNERModel.encode_text of the same batch).
            visual: (B, V, D) visual tokens; visual_mask: (B, V), all False for a post with no image.
        Returns:
            (B, T, D): the joint pass's word states for posts with an unmasked visual token; `words`'
            rows, bitwise, for every other post.
        Raises:
            ValueError for an encoder without BERT's .embeddings / .encoder split (DistilBERT, ...).
        """
        if not (isinstance(getattr(encoder, "embeddings", None), nn.Module) and hasattr(encoder, "encoder")):
            raise ValueError(
                f"model.fusion = 'single_stream' runs the text encoder's embeddings and layers apart, which "
                f"a {type(encoder).__name__} does not expose (.embeddings, .encoder); use a BERT or "
                "RoBERTa-family encoder"
            )
        has_image = visual_mask.any(dim=1)  # (B,)
        if not bool(has_image.any()):
            return words
        rows = has_image.nonzero().squeeze(1)  # (Bi,) the posts with an image
        joint = self.joint_states(encoder, batch, rows, visual[rows], visual_mask[rows])  # (Bi, S + V, D)
        S = batch["input_ids"].shape[1]
        index = batch["first_subword"][rows][..., None].expand(-1, -1, joint.shape[-1])  # (Bi, T, D)
        fused = joint[:, :S].gather(1, index)  # (Bi, T, D)
        return words.index_copy(0, rows, fused.to(words.dtype))  # (B, T, D)

    def joint_states(
        self,
        encoder: nn.Module,
        batch: dict,
        rows: torch.Tensor,
        visual: torch.Tensor,
        visual_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Last hidden states (Bi, S + V, D) of the posts `rows` (Bi,): text first, then visual tokens.

        visual (Bi, V, D) and visual_mask (Bi, V) are those posts' tokens and mask.
        """
        input_ids = batch["input_ids"][rows]  # (Bi, S)
        # The encoder's own embedding of the text: its word, position and type embeddings exactly as
        # the text-only forward computes them (RoBERTa derives positions from input_ids' padding).
        text = encoder.embeddings(input_ids=input_ids)  # (Bi, S, D)
        hidden = torch.cat([text, self.visual_embeddings(visual).to(text.dtype)], dim=1)  # (Bi, S + V, D)
        keys = joint_key_mask(batch["attention_mask"][rows], visual_mask)  # (Bi, S + V)
        # The mask in the form the encoder's attention implementation wants (eager, sdpa, ...), made
        # by the same helper its forward uses for the text-only pass.
        mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=keys)
        return encoder.encoder(hidden, attention_mask=mask).last_hidden_state  # (Bi, S + V, D)


def joint_key_mask(attention_mask: torch.Tensor, visual_mask: torch.Tensor) -> torch.Tensor:
    """The keys every query of a post may attend to: its sub-words, then its visual tokens.

    attention_mask (B, S) (1 for a real sub-word), visual_mask (B, V) bool -> (B, S + V) long, 1 = visible.
    Each row is one post, so no post sees another's tokens; padded sub-words and masked visual tokens
    (padding regions, a masked image) are hidden.
    """
    return torch.cat([attention_mask.long(), visual_mask.long()], dim=1)  # (B, S + V)
