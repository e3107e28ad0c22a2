"""The last vision blocks, trained in stage two on the state the cache stores before them.

A cache made with `mner extract-features --vision-trainable-blocks K` holds, per image, the input of
the vision model's last K blocks (`Record.vision_state`) and, in its folder, those blocks' weights with
the config that rebuilds them (`CacheReader.vision_blocks()`). CLIP has no dropout and the seeds use no
augmentation at that depth, so the stored state is a pure function of the image, and running the blocks
on it at every step is the original's fine-tuning without decoding an image or loading the vision model
(MANGO trains CLIP's last 2 blocks; IFAformer the whole tower; BertResNet its ResNet).

`VisionBlocks(config, arrays, blocks=k)` runs the last k <= K of them: the K - k before those run
frozen, under no_grad (the state is the input of the K-th last block, so they must run first), and
their parameters stay out of `parameters()` that require grad. Its output is what the cache stores as
tokens: CLIP's patch tokens (the last layer's output, all tokens, CLS first) and global embedding
(projection(post_layernorm(CLS)), or post_layernorm(CLS) without a projection); a ResNet's layer4 grid,
row-major, and its avgpool vector. Built from the cache alone: stage two never imports stage one.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models import resnet
from transformers import CLIPVisionConfig
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from mner.cache.reader import CacheReader

_RESNET_BLOCKS = {"BasicBlock": resnet.BasicBlock, "Bottleneck": resnet.Bottleneck}


def build_vision_blocks(
    config: dict, weights: dict | None, k: int | None, reads_global: bool
) -> VisionBlocks:
    """The last k blocks a model trains (None: all K; both tasks' models build them here): built on a fork of the
    random state, so every other module of the model starts from the weights of the same model without
    them, and training draws the same random numbers. A model that reads no global embedding
    (`reads_global` False) gives CLIP's post_layernorm and projection no gradient: they stay as stored."""
    with torch.random.fork_rng(devices=[]):
        blocks = VisionBlocks(config, weights, blocks=k)
    if not reads_global:
        for parameter in blocks.global_parameters():
            parameter.requires_grad_(False)
    return blocks


class VisionBlocks(nn.Module):
    """The last `blocks` vision blocks of a cache, trainable, over its stored `vision_state`.

    forward(state) -> (patch_tokens (B, P, Dp), global_embed (B, Dg)), the cache's token shapes:
    state is (B, P, Dp) for CLIP, (B, C3, H3, W3) for a ResNet's layer3 map.
    """

    def __init__(self, config: dict, arrays: dict[str, np.ndarray] | None, blocks: int | None = None):
        """
        Args:
            config: the cache's vision blocks config ({"kind": "clip" | "resnet", "blocks": K, ...}).
            arrays: the weights by name, as `CacheReader.vision_blocks()` returns them; None builds the
                structure alone (freshly initialised), for a trained model's weights to be loaded into.
            blocks: k, how many of the last blocks train (1 <= k <= K); None: all K.
        Raises ValueError for a k outside [1, K].
        """
        super().__init__()
        stored = config["blocks"]
        blocks = stored if blocks is None else blocks
        if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= stored:
            raise ValueError(
                f"vision blocks to train must be between 1 and the {stored} whose input the cache stores, "
                f"got {blocks!r}"
            )
        self.kind, self.stored, self.blocks = config["kind"], stored, blocks
        if self.kind == "clip":
            self._build_clip(config)
        elif self.kind == "resnet":
            self._build_resnet(config)
        else:
            raise ValueError(f"unknown vision blocks kind {self.kind!r}; known: clip, resnet")
        if arrays is not None:
            self._load(arrays)
        for parameter in self.frozen.parameters():
            parameter.requires_grad_(False)

    @classmethod
    def from_cache(cls, reader: CacheReader, blocks: int | None = None) -> VisionBlocks:
        """The blocks of the cache `reader` reads (ValueError when it stores no vision state)."""
        config, arrays = reader.vision_blocks()
        return cls(config, arrays, blocks)

    def global_parameters(self) -> list[nn.Parameter]:
        """The parameters that make the global embedding alone (CLIP's post_layernorm and projection; a
        ResNet's is the grid's mean): a model that reads no global embedding freezes them."""
        if self.kind != "clip":
            return []
        return [
            *self.post_layernorm.parameters(),
            *([] if self.projection is None else self.projection.parameters()),
        ]

    def _build_clip(self, config: dict) -> None:
        hf = CLIPVisionConfig(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_attention_heads=config["num_attention_heads"],
            hidden_act=config["hidden_act"],
            layer_norm_eps=config["layer_norm_eps"],
            attention_dropout=config["attention_dropout"],
        )
        hf._attn_implementation = "sdpa"  # as CLIP loads by default for extraction
        layers = [CLIPEncoderLayer(hf) for _ in range(self.stored)]
        cut = self.stored - self.blocks
        self.frozen = nn.ModuleList(layers[:cut])  # run under no_grad before the trained ones
        self.layers = nn.ModuleList(layers[cut:])
        self.post_layernorm = nn.LayerNorm(config["hidden_size"], eps=config["layer_norm_eps"])
        dim = config["projection_dim"]
        self.projection = None if dim is None else nn.Linear(config["hidden_size"], dim, bias=False)
        # transformers 4.x passes a causal mask beside the attention mask; 5.x takes the attention mask alone.
        self._masks = (
            2 if "causal_attention_mask" in inspect.signature(CLIPEncoderLayer.forward).parameters else 1
        )

    def _build_resnet(self, config: dict) -> None:
        # torchvision's ResNet._make_layer(block, planes, depth, stride) on the layer3 width.
        block = _RESNET_BLOCKS[config["block"]]
        inplanes, planes, width = config["inplanes"], config["planes"], config["planes"] * block.expansion
        downsample = nn.Sequential(
            resnet.conv1x1(inplanes, width, config["stride"]),
            nn.BatchNorm2d(width),
        )
        layer4 = [block(inplanes, planes, config["stride"], downsample)]
        layer4 += [block(width, planes) for _ in range(config["depth"] - 1)]
        self.frozen = nn.ModuleList()  # a ResNet cache trains layer4 whole (K = 1)
        self.layer4 = nn.Sequential(*layer4)

    def _load(self, arrays: dict[str, np.ndarray]) -> None:
        """The cache's weights, named as extraction wrote them (CLIP's layers 0..K-1 across frozen + layers)."""
        state = {}
        for name, value in arrays.items():
            if self.kind == "clip" and name.startswith("layers."):
                _, index, rest = name.split(".", 2)
                index = int(index)
                cut = len(self.frozen)
                name = f"frozen.{index}.{rest}" if index < cut else f"layers.{index - cut}.{rest}"
            state[name] = torch.from_numpy(np.array(value))
        self.load_state_dict(state, strict=True)

    def forward(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """state (B, P, Dp) | (B, C3, H3, W3) -> patch tokens (B, P, Dp), global embedding (B, Dg)."""
        if self.kind == "resnet":
            grid = self.layer4(state)  # (B, Dp, G, G)
            pooled = torch.flatten(
                nn.functional.adaptive_avg_pool2d(grid, 1), 1
            )  # (B, Dp): torchvision's avgpool
            return grid.flatten(2).transpose(1, 2), pooled  # (B, G*G, Dp) row-major cells
        hidden = state
        if len(self.frozen):
            with torch.no_grad():
                for layer in self.frozen:
                    hidden = self._layer(layer, hidden)  # (B, P, Dp)
        for layer in self.layers:
            hidden = self._layer(layer, hidden)  # (B, P, Dp)
        pooled = self.post_layernorm(hidden[:, 0])  # (B, Dp) CLS
        return hidden, pooled if self.projection is None else self.projection(pooled)  # (B, Dg)

    def _layer(self, layer: CLIPEncoderLayer, hidden: Tensor) -> Tensor:
        out = layer(hidden, *([None] * self._masks))  # no padding: every image has all P tokens
        return out[0] if isinstance(out, tuple) else out
