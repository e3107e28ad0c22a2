"""The sentence classifier of the BertResNet seed (seed 004): features and heads.

A post is one text feature t (the encoder's [CLS] state or its mean over real sub-words,
`text_pool`) and one image feature i (the cached global vector, or the mean of the cached patch
tokens, `image_feature`; the `xattn` head reads the patch tokens themselves). `mode` picks what the
head sees: `text` (t only: the cache is never opened), `image` (i only: no text encoder is loaded)
or `both`.

Heads (`head`), as in the seed's notebook:

- `mlp`: `mlp_text` Linear(Dt, L) and `mlp_image` Linear(Di, L) for the single modes, and
  `mlp_both`, the seed's TwoInputMLP, for both: Linear(Dt + Di, H) -> ReLU -> dropout -> Linear(H, L)
  over the concatenation.
- `cnn`: the seed's stack over the mode's feature vector read as a 1-channel signal of length D:
  Conv1d(1, 32, 3, pad 1) -> ReLU -> MaxPool(2) -> Conv1d(32, 64, 3, pad 1) -> ReLU -> MaxPool(2) ->
  Flatten -> Linear(64 * (D // 4), L), D = Dt + Di for both (as the seed), Dt or Di for one modality.
- `attention`: the single modes as `mlp`; for both, per-modality scores s_t = Linear(Dt, 1)(t) and
  s_i = Linear(Di, 1)(i) weight the features before `mlp_both`. The seed applies its softmax to
  each (B, 1) score on its own, which always gives 1 (the weights do nothing); here the softmax runs
  over the two modalities, so the weights sum to 1 and a post can lean on one modality.
- `xattn` (ours): for both, t attends to the patch tokens projected to Dt (one multi-head attention
  layer, `heads` heads), t + attended goes through LayerNorm -> Linear(Dt, L); the single modes as `mlp`.

Image normalisation (`image_norm`). "standard" maps the image feature x (each patch token for
`xattn`) to (x - mean) / std per dimension, with the train split's statistics held as buffers (so
they travel in model.safetensors to evaluate and predict); "none" feeds x as it is, as the seed does.

Frozen text prefix (`text_frozen_layers` N > 0): the encoder's embeddings and bottom N layers get no
gradient and stay in eval mode; the top layers run over the batch's cached states after layer N
(train/engine/text_states.py), or over that prefix computed here (zoo/text.py `subword_states`, shared
with the tagger).

Trainable vision blocks (`vision_trainable_blocks` k > 0, train/zoo/vision_blocks.py). The seed fine-tunes
its whole ResNet; from a cache that stores the state before the last k blocks (a ResNet's layer3 map)
those blocks run at every step on batch["vision_state"] and the image feature is made from their
output (the grid's mean, which is the avgpool vector, or the patch tokens), for the posts that have an
image. Before any step, in eval mode, that is the cached feature to float16 rounding. "standard" keeps
the statistics of the cached, frozen features for the blocks' output: the same map as the frozen model
at the first step, which the blocks then learn under, as any layer learns under the one after it. So
that the first training step is also that map's input, the blocks' BatchNorm layers keep their stored
statistics while training (`vision_batchnorm` "stored"; "batch" uses each batch's, as the notebook's
model.train() does).

Missing images. A post whose image is missing or unreadable has has_image False: its image feature
is zeroed, its attention weight on the image is exactly 0 (score -inf) and `xattn` skips the
attention, so such a post gets, bitwise, what the head gives with no image whatever the cache holds
for it (tests/train/engine/test_classify.py checks every head).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mner.train.engine.classifier_config import (
    CLASS_HEADS,
    IMAGE_FEATURES,
    IMAGE_NORMS,
    MODES,
    TEXT_POOLS,
    VISION_BATCHNORMS,
)
from mner.train.zoo.text import freeze_text_prefix, prefix_eval, subword_states
from mner.train.zoo.vision_blocks import VisionBlocks

MIN_STD = 1e-6  # a train std below this leaves its dimension unscaled (SentenceClassifier)


def reads_tokens(head: str, mode: str) -> bool:
    """Whether the head reads the patch tokens (B, P, Dp): xattn in both mode. In the single modes xattn
    is mlp over one vector, as every other head."""
    return head == "xattn" and mode == "both"


class TwoInputMLP(nn.Module):
    """The seed's mlp_both: (t (B, Dt), i (B, Di)) -> logits (B, L) through one hidden layer of H."""

    def __init__(self, text_dim: int, image_dim: int, hidden: int, num_labels: int, dropout: float):
        super().__init__()
        self.hidden = nn.Linear(text_dim + image_dim, hidden)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden, num_labels)

    def forward(self, text: Tensor, image: Tensor) -> Tensor:
        joined = torch.cat([text, image], dim=1)  # (B, Dt + Di)
        return self.out(self.dropout(torch.relu(self.hidden(joined))))  # (B, L)


class SeedCNN(nn.Module):
    """The seed's Conv1d stack: a feature vector (B, D) -> logits (B, L)."""

    def __init__(self, dim: int, num_labels: int):
        super().__init__()
        if dim < 4:
            raise ValueError(f"the cnn head needs a feature of at least 4 values, got {dim}")
        self.net = nn.Sequential(
            nn.Conv1d(1, 32, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            nn.MaxPool1d(kernel_size=2, stride=2),
            nn.Conv1d(32, 64, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            nn.MaxPool1d(kernel_size=2, stride=2),
            nn.Flatten(),
            nn.Linear(64 * (dim // 4), num_labels),
        )

    def forward(self, feature: Tensor) -> Tensor:
        return self.net(feature.unsqueeze(1))  # (B, 1, D) -> (B, L)


class ClassifierHead(nn.Module):
    """One head (CLASS_HEADS) for one mode (MODES): features -> logits (B, L)."""

    def __init__(
        self,
        head: str,
        mode: str,
        text_dim: int,
        image_dim: int,
        num_labels: int,
        hidden: int = 512,
        dropout: float = 0.1,
        heads: int = 4,
    ):
        super().__init__()
        if head not in CLASS_HEADS:
            raise ValueError(f"unknown classifier head {head!r}; known: {', '.join(CLASS_HEADS)}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
        self.head, self.mode = head, mode
        if head == "cnn":
            dim = {"text": text_dim, "image": image_dim, "both": text_dim + image_dim}[mode]
            self.cnn = SeedCNN(dim, num_labels)
        elif mode == "text":
            self.mlp_text = nn.Linear(text_dim, num_labels)
        elif mode == "image":
            self.mlp_image = nn.Linear(image_dim, num_labels)
        elif head in ("mlp", "attention"):
            self.mlp_both = TwoInputMLP(text_dim, image_dim, hidden, num_labels, dropout)
            if head == "attention":
                self.attention_text = nn.Linear(text_dim, 1)
                self.attention_image = nn.Linear(image_dim, 1)
        else:  # xattn, both
            if text_dim % heads:
                raise ValueError(f"xattn: the text width {text_dim} is not divisible by {heads} heads")
            self.project = nn.Linear(image_dim, text_dim)
            self.attend = nn.MultiheadAttention(text_dim, heads, dropout=dropout, batch_first=True)
            self.norm = nn.LayerNorm(text_dim)
            self.out = nn.Linear(text_dim, num_labels)

    @property
    def reads_tokens(self) -> bool:
        """Whether forward wants the patch tokens (B, P, Dp) rather than one image vector (B, Di)."""
        return reads_tokens(self.head, self.mode)

    def forward(self, text: Tensor | None, image: Tensor | None, has_image: Tensor | None) -> Tensor:
        """text (B, Dt) or None; image (B, Di) or, for xattn, (B, P, Dp), or None; has_image (B,) bool.

        Returns logits (B, L). A post with has_image False is scored as if it had no image.
        """
        if image is not None:
            keep = has_image.view(-1, *([1] * (image.dim() - 1)))
            image = torch.where(keep, image, torch.zeros((), dtype=image.dtype, device=image.device))
        if self.head == "cnn":
            feature = {"text": text, "image": image}.get(self.mode)
            return self.cnn(feature if feature is not None else torch.cat([text, image], dim=1))
        if self.mode == "text":
            return self.mlp_text(text)
        if self.mode == "image":
            return self.mlp_image(image)
        if self.head == "mlp":
            return self.mlp_both(text, image)
        if self.head == "attention":
            scores = torch.cat([self.attention_text(text), self.attention_image(image)], dim=1)  # (B, 2)
            scores = scores.masked_fill(
                ~torch.stack([torch.ones_like(has_image), has_image], dim=1), -torch.inf
            )
            weights = torch.softmax(scores, dim=1)  # (B, 2): exactly (1, 0) without an image
            return self.mlp_both(weights[:, :1] * text, weights[:, 1:] * image)
        tokens = self.project(image)  # (B, P, Dt)
        attended, _ = self.attend(text.unsqueeze(1), tokens, tokens, need_weights=False)  # (B, 1, Dt)
        fused = torch.where(has_image.unsqueeze(1), text + attended.squeeze(1), text)  # (B, Dt)
        return self.out(self.norm(fused))


def pool_text(hidden: Tensor, attention_mask: Tensor, how: str) -> Tensor:
    """hidden (B, S, Dt), attention_mask (B, S) -> (B, Dt): the [CLS] state (position 0) or the mean
    over real sub-words ([CLS] and [SEP] included, padding not)."""
    if how == "cls":
        return hidden[:, 0]
    if how != "mean":
        raise ValueError(f"unknown text_pool {how!r}; known: {', '.join(TEXT_POOLS)}")
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, S, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class SentenceClassifier(nn.Module):
    """Text encoder (None in image mode) + image normalisation + ClassifierHead; forward(batch) ->
    {"logits", "loss"?}.

    batch: input_ids / attention_mask (B, S) unless mode is image; image (B, Di) or (B, P, Dp) and
    has_image (B,) unless mode is text; labels (B,) for the loss; with frozen_layers N > 0, optionally
    text_states (B, S, Dt), the states after the encoder's layer N read from the text-state cache
    (computed here without them). class_weights (L,) or None weight the cross-entropy. image_norm
    "standard" with image_dim D > 0 holds image_mean / image_std (D,), identity until
    `set_image_statistics`.
    """

    def __init__(
        self,
        encoder: nn.Module | None,
        head: ClassifierHead,
        text_pool: str,
        class_weights: Tensor | None = None,
        image_norm: str = "none",
        image_dim: int = 0,
        vision_blocks: VisionBlocks | None = None,
        image_feature: str = "global",
        vision_batchnorm: str = "stored",
        frozen_layers: int = 0,
        encoder_name: str = "",
    ):
        """vision_blocks: the trainable blocks that make the image feature from batch["vision_state"]
        (None: the batch's cached feature is read as it is); image_feature: which feature of their output
        the head reads when it reads one vector (IMAGE_FEATURES; xattn reads the patch tokens);
        vision_batchnorm: the blocks' BatchNorm in training, on its stored statistics or the batch's
        (VISION_BATCHNORMS); frozen_layers: classifier.text_frozen_layers, the encoder's bottom layers
        frozen (eval mode, no gradient); encoder_name: classifier.text_encoder, named when the encoder
        cannot be split so."""
        super().__init__()
        if image_norm not in IMAGE_NORMS:
            raise ValueError(f"unknown image_norm {image_norm!r}; known: {', '.join(IMAGE_NORMS)}")
        if vision_batchnorm not in VISION_BATCHNORMS:
            raise ValueError(
                f"unknown vision_batchnorm {vision_batchnorm!r}; known: {', '.join(VISION_BATCHNORMS)}"
            )
        if image_feature not in IMAGE_FEATURES:
            raise ValueError(f"unknown image_feature {image_feature!r}; known: {', '.join(IMAGE_FEATURES)}")
        self.encoder, self.head, self.text_pool = encoder, head, text_pool
        # Image mode has no text encoder: nothing to freeze.
        self.frozen_layers = frozen_layers if encoder is not None else 0
        if self.frozen_layers:
            freeze_text_prefix(encoder, self.frozen_layers, encoder_name, "classifier.text_frozen_layers")
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.standardises = image_norm == "standard" and image_dim > 0
        if self.standardises:
            self.register_buffer("image_mean", torch.zeros(image_dim))
            self.register_buffer("image_std", torch.ones(image_dim))
        self.image_feature, self.vision_batchnorm = image_feature, vision_batchnorm
        # Registered last: the modules above keep the parameter names (and checkpoints) of a model without.
        self.vision_blocks = vision_blocks

    def train(self, mode: bool = True) -> SentenceClassifier:
        """Train or eval mode; the frozen bottom of the text encoder stays in eval mode (no dropout), so
        its output is the text-state cache's; with vision_batchnorm "stored" the blocks' BatchNorm layers
        stay in eval mode too (their stored running statistics, neither updated nor replaced by the batch's)."""
        super().train(mode)
        if self.frozen_layers:
            prefix_eval(self.encoder, self.frozen_layers)
        if self.vision_blocks is not None and self.vision_batchnorm == "stored":
            for module in self.vision_blocks.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    @torch.no_grad()
    def set_image_statistics(self, mean: Tensor, std: Tensor) -> None:
        """The train split's per-dimension mean and std (D,) of the image feature; a dimension whose
        std is below MIN_STD (constant over train) is only centred, so that an image unlike every train
        image cannot blow it up."""
        assert self.standardises and mean.shape == std.shape == self.image_mean.shape
        self.image_mean.copy_(mean)
        self.image_std.copy_(torch.where(std < MIN_STD, torch.ones_like(std), std))

    def forward(self, batch: dict) -> dict:
        text = None
        if self.encoder is not None:
            hidden = subword_states(self.encoder, self.frozen_layers, batch)  # (B, S, Dt)
            text = pool_text(hidden, batch["attention_mask"], self.text_pool)
        image = batch.get("image")
        if image is not None and self.vision_blocks is not None:
            image = self.block_image(batch)
        if image is not None and self.standardises:
            image = (image - self.image_mean) / self.image_std  # (B, Di) or (B, P, Dp)
        logits = self.head(text, image, batch.get("has_image"))  # (B, L)
        out = {"logits": logits}
        if "labels" in batch:
            out["loss"] = nn.functional.cross_entropy(
                logits.float(), batch["labels"], weight=self.class_weights
            )
        return out

    def block_image(self, batch: dict) -> Tensor:
        """The image feature the head reads, made by the vision blocks over batch["vision_state"] for the
        posts with has_image (B,) True and zero for the others, as the cache stores a missing image: the
        shape of batch["image"], (B, Di) or (B, P, Dp)."""
        cached = batch["image"]
        rows = batch["has_image"].nonzero().squeeze(1)  # (B',) posts whose image is read
        if not len(rows):
            return torch.zeros_like(cached)
        patches, pooled = self.vision_blocks(batch["vision_state"][rows])  # (B', P, Dp), (B', Dg)
        if self.head.reads_tokens:
            made = patches
        elif self.image_feature == "patches":
            made = patches.mean(1)  # (B', Dp)
        else:
            made = pooled  # (B', Dg)
        return made.new_zeros(cached.shape).index_copy(0, rows, made)
