"""The stage-two model: text encoder -> visual token builder -> fusion -> emissions -> head.

The fusion, the head, the auxiliary losses and the task are entries of train/zoo/registry.py named in
the ModelConfig.

Training loss = the head's loss, mean over posts (the CRF's negative log-likelihood)
              + weight_i * loss_i for every auxiliary loss whose weight is > 0 (train/zoo/losses.py:
                AFNER's and AFDVQF's InfoNCE alignment of each post's [CLS] state with its mean visual
                token; our slot type presence from the fusion's final query slots; MANGO's four losses
                in train/zoo/mango.py).
With model.bilstm a BiLSTM runs over the (fused) word states before the emission layer.
Image dropout (MANGO) masks every visual token of a post with probability image_dropout while
training, so the model also learns to tag posts whose image is missing.
With model.vision_trainable_blocks = k > 0 the patch tokens and the global embedding are not read from
the cache as they are: the last k vision blocks (train/zoo/vision_blocks.py) make them at every step
from the state the cache stores before those blocks, and train at train.lr_vision.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from mner.cache.spec import TokenSpec
from mner.train.engine.config import ModelConfig, TrainConfig
from mner.train.zoo.fusion import build_fusion
from mner.train.zoo.heads import Head
from mner.train.zoo.losses import LossInputs, type_presence
from mner.train.zoo.registry import AUX_LOSSES, HEADS, TASKS
from mner.train.zoo.text import (
    freeze_text_prefix,
    load_encoder,
    load_tokenizer,
    prefix_eval,
    subword_states,
    type_prompt_states,
)
from mner.train.zoo.two_tower import check_towers, dead_parameters
from mner.train.zoo.vision_blocks import VisionBlocks, build_vision_blocks
from mner.train.zoo.visual import VisualTokenBuilder

# What a text-only model reads of its config: model.text_only builds no visual token builder, no
# fusion and none of the auxiliary losses that need an image (MNERModel.__init__).
_TEXT_PATH = (
    "text_encoder",
    "task",
    "head",
    "bio_constraints",
    "max_length",
    "dropout",
    "label_smoothing",
    "emission_temperature",
    "emission_norm",
    "bilstm",
    "lstm_hidden",
    "text_only",
    "text_frozen_layers",
    "emission_lr",
)
# What only the MANGO fusion reads (train/zoo/mango.py); another fusion ignores these fields.
_MANGO_ONLY = ("resampler", "resampler_queries", "stack_layers", "rel_temp", "align_warmup_epochs", "nce_tau")


def used_settings(cfg: ModelConfig) -> dict:
    """The fields of `cfg` the model built from it reads (model.name, which only records the file the
    settings came from, left out): two configs with equal used settings train the same model, so an
    ablation arm that differs from another only elsewhere is a no-op."""
    settings = cfg.to_dict()
    del settings["name"]
    if cfg.text_only:
        image_free = {w for n, w in AUX_LOSSES.weights.items() if not AUX_LOSSES.get(n).needs_image}
        return {key: value for key, value in settings.items() if key in {*_TEXT_PATH, *image_free}}
    if cfg.fusion == "two_tower":
        # IFAformer's towers read the cache's state alone: no visual token builder, patch or region switch.
        read = {
            *_TEXT_PATH,
            "fusion",
            "image_dropout",
            "vision_trainable_blocks",
            *AUX_LOSSES.weights.values(),
        }
        return {key: value for key, value in settings.items() if key in read}
    if cfg.fusion != "mango":
        for key in _MANGO_ONLY:
            del settings[key]
    return settings


class MNERModel(nn.Module):
    """Multimodal NER tagger over cached image tokens (text-only when cfg.text_only)."""

    def __init__(
        self,
        cfg: ModelConfig,
        label_names: Sequence[str],
        spec: TokenSpec | None,
        encoder_dir: str | Path,
        num_detector_classes: int = 91,
        vision_blocks: dict | None = None,
        vision_weights: dict | None = None,
    ):
        """
        Args:
            cfg: the model config.
            label_names: ["O", "B-X", "I-X", ...] as cache.datasets.label_names gives them.
            spec: the token shapes of the cache (None only when cfg.text_only).
            encoder_dir: the text encoder folder or preset name (train.text.resolve_text_encoder).
            num_detector_classes: region label ids lie in [0, this) (91 for torchvision's COCO).
            vision_blocks: the cache's vision blocks config (manifest "vision_blocks" "config"); needed,
                and read, only with cfg.vision_trainable_blocks > 0.
            vision_weights: their weights as the cache stores them (`CacheReader.vision_blocks()`); None
                leaves them freshly initialised, for a trained run's weights to be loaded.
        """
        super().__init__()
        self.cfg = cfg
        self.label_names = list(label_names)
        self.task = TASKS.get(cfg.task)
        self.types = self.task.check_labels(self.label_names)
        self.outside = self.label_names.index("O")
        self.encoder = load_encoder(encoder_dir)
        self.frozen_layers = cfg.text_frozen_layers
        if self.frozen_layers:
            freeze_text_prefix(self.encoder, self.frozen_layers, cfg.text_encoder)
        width = self.encoder.config.hidden_size
        if width % cfg.qfnet_heads:
            raise ValueError(
                f"the text encoder's width {width} is not divisible by model.qfnet_heads={cfg.qfnet_heads}; "
                "pick a head count that divides it"
            )
        if cfg.text_only:
            self.visual = self.fusion = None
        elif cfg.fusion == "two_tower":
            # IFAformer's vision tower reads the cache's embedding output itself: no visual tokens.
            self.visual, self.fusion = None, build_fusion(cfg, width, self.types)
        else:
            if spec is None:
                raise ValueError(
                    "a multimodal model needs the cache's TokenSpec; pass spec or set model.text_only"
                )
            self.visual = VisualTokenBuilder(cfg, spec, width, num_detector_classes)
            self.fusion = build_fusion(cfg, width, self.types)
            if getattr(self.fusion, "type_queries", None) is not None:
                prompts = type_prompt_states(self.encoder, load_tokenizer(encoder_dir), self.types)  # (E, D)
                self.fusion.type_queries.data.copy_(prompts)
        # model.bilstm: a BiLSTM over the (fused) word states before the emission layer.
        self.bilstm = (
            nn.LSTM(width, cfg.lstm_hidden, batch_first=True, bidirectional=True) if cfg.bilstm else None
        )
        self.dropout = nn.Dropout(cfg.dropout)
        emission_width = 2 * cfg.lstm_hidden if cfg.bilstm else width
        self.emission = nn.Linear(emission_width, len(self.label_names))
        # model.emission_norm: MANGO's classifier, LayerNorm + Linear with the Linear at N(0, 0.02), bias 0
        self.emission_norm = nn.LayerNorm(emission_width) if cfg.emission_norm else None
        if cfg.emission_norm:
            nn.init.normal_(self.emission.weight, std=0.02)
            nn.init.zeros_(self.emission.bias)
        # Registered under its registry name, so checkpoint keys name the head that made them
        # (crf.crf.transitions, as before the registry) and another head's weights fail to load.
        self._head_attr = cfg.head.replace("-", "_")
        self.add_module(self._head_attr, HEADS.get(cfg.head)(cfg, self.label_names))
        # Only the losses that are on are built: weight > 0, and an image if the loss needs one.
        self.aux_losses = nn.ModuleDict()
        for name, weight in AUX_LOSSES.weights.items():
            loss = AUX_LOSSES.get(name)
            if (
                getattr(cfg, weight) > 0
                and loss.needs_image
                and self.fusion is not None
                and self.visual is None
            ):
                raise ValueError(
                    f"model.{weight} > 0 reads visual tokens, which model.fusion = {cfg.fusion!r} does not "
                    f"build (its vision tower reads the cache's state itself); set model.{weight} = 0"
                )
            if getattr(cfg, weight) > 0 and not (loss.needs_image and cfg.text_only):
                self.aux_losses[name] = loss(cfg, width)
                if getattr(loss, "needs_slots", False) and not getattr(self.fusion, "exposes_slots", False):
                    raise ValueError(
                        f"model.{weight} > 0 needs a fusion with query slots (qgf), but model.fusion is "
                        f"{cfg.fusion!r}; set model.{weight} = 0"
                    )
        # label id -> entity type index (-1 for O), for the losses that read type presence
        self._label_type = [self.types.index(n[2:]) if n != "O" else -1 for n in self.label_names]
        # The training epoch (1, 2, ...), set by the loop before each epoch for the losses that warm up
        # (MANGO's alignment); None outside the loop, where they count as warmed up.
        self.epoch: int | None = None
        self.vision_blocks = self._build_vision_blocks(vision_blocks, vision_weights)

    def _build_vision_blocks(self, config: dict | None, weights: dict | None) -> VisionBlocks | None:
        """The trainable vision blocks of cfg.vision_trainable_blocks (None for 0), built last
        (`build_vision_blocks`: every other module starts from the weights of the same model with 0)."""
        k = self.cfg.vision_trainable_blocks
        if not self.cfg.reads_vision_state:
            return None
        if config is None:
            raise ValueError(
                f"model.vision_trainable_blocks = {k} needs the vision blocks of a cache extracted with "
                "--vision-trainable-blocks; pass the cache's vision blocks config"
            )
        if self.visual is None:
            return self._build_tower(config, weights)
        if not self.cfg.use_patches and self.visual.global_proj is None:
            # The blocks make the patch tokens and the global embedding: with neither read they learn nothing.
            raise ValueError(
                f"model.vision_trainable_blocks = {k} trains the blocks that make the patch tokens and the "
                f"global embedding, but model.use_patches is false and model.fusion {self.cfg.fusion!r} reads "
                "no global embedding; set model.vision_trainable_blocks = 0"
            )
        k = None if k == -1 else k  # -1: all the cache stores
        return build_vision_blocks(config, weights, k, reads_global=self.visual.global_proj is not None)

    def _build_tower(self, config: dict, weights: dict | None) -> VisionBlocks:
        """IFAformer's vision tower (model.fusion "two_tower"): the cache's whole CLIP encoder, every layer
        run beside its text layer; the top model.vision_trainable_blocks of them train (-1: all, 0: none),
        the others, the pooled-CLS head and the parameters no output depends on stay as stored."""
        check_towers(self.encoder, config, self.cfg.text_encoder)
        stored = config["blocks"]
        k = stored if self.cfg.vision_trainable_blocks == -1 else self.cfg.vision_trainable_blocks
        if k > stored:
            raise ValueError(
                f"model.vision_trainable_blocks = {k} is more than the {stored} layers of the cache's vision "
                f"tower; set it to at most {stored} (-1: all)"
            )
        tower = build_vision_blocks(config, weights, None, reads_global=False)  # all K layers in .layers
        frozen = [
            *(p for layer in tower.layers[: stored - k] for p in layer.parameters()),
            *dead_parameters(tower.layers),
        ]
        for parameter in frozen:
            parameter.requires_grad_(False)
        return tower

    @property
    def head(self) -> Head:
        """The head named by cfg.head (train/zoo/heads.py)."""
        return getattr(self, self._head_attr)

    def train(self, mode: bool = True) -> MNERModel:
        """Train or eval mode; the frozen bottom of the text encoder stays in eval mode (no dropout),
        so its output is the text-state cache's."""
        super().train(mode)
        if self.frozen_layers:
            prefix_eval(self.encoder, self.frozen_layers)
        return self

    def encode_text(self, batch: dict) -> torch.Tensor:
        """Word states (B, T, D): the encoder state of each word's first sub-word.

        Words cut by truncation get the first sub-word's slot 0 ([CLS]); word_mask hides them. With
        model.text_frozen_layers = N the top layers run over batch["text_states"] (B, S, D), the states
        after layer N read from the text-state cache, or over the frozen bottom computed here without it.
        """
        states = subword_states(self.encoder, self.frozen_layers, batch)  # (B, S, D)
        return word_states(states, batch["first_subword"])  # (B, T, D)

    def encode_visual(
        self, batch: dict, image_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Visual tokens (B, V, D) and their mask (B, V); all masked for a post whose image is masked.

        image_mask (B,) defaults to batch["image_mask"]; forward passes the image-dropped one.
        """
        if self.visual is None:
            raise ValueError("this model is text-only (model.text_only = true): it has no visual tokens")
        image_mask = batch["image_mask"] if image_mask is None else image_mask
        return self.visual(self.vision_inputs(batch, image_mask), image_mask)

    def vision_inputs(self, batch: dict, image_mask: torch.Tensor) -> dict:
        """The batch the visual token builder reads: with trainable vision blocks, a copy whose
        patch_tokens (B, P, Dp) and global_embed (B, Dg) are the blocks' output over batch["vision_state"]
        for the posts whose image_mask (B,) is True and zero for the others, as the cache stores a missing
        image (so a masked post stays bitwise image-less, and a dropped image costs no block run);
        otherwise the batch itself."""
        if self.vision_blocks is None:
            return batch
        rows = image_mask.nonzero().squeeze(1)  # (B',) posts whose image is read
        patches, pooled = batch["patch_tokens"], batch["global_embed"]  # (B, P, Dp), (B, Dg)
        if len(rows):
            made, made_pooled = self.vision_blocks(batch["vision_state"][rows])  # (B', P, Dp), (B', Dg)
            patches = made.new_zeros(patches.shape).index_copy(0, rows, made)  # (B, P, Dp)
            pooled = made_pooled.new_zeros(pooled.shape).index_copy(0, rows, made_pooled)  # (B, Dg)
        else:
            patches, pooled = torch.zeros_like(patches), torch.zeros_like(pooled)
        return {**batch, "patch_tokens": patches, "global_embed": pooled}

    def _emissions(self, batch: dict, image_mask: torch.Tensor | None):
        """Emissions (B, T, L), word states (B, T, D) before fusion, the visual tokens (B, V, D) with
        their mask (B, V), the pooled image vector (B, D) (None for a text-only model, the pooled one
        also for a fusion that does not use it) and the encoder's [CLS] state (B, D), for the given
        image mask.

        Dropout acts on the fused states before the emission layer, unless the fusion says otherwise, as
        its original does: `drops_text`, on the encoder's states before the fusion (and the losses) too;
        `drops_fused` false, not on the fused states (QGF drops the text only, MANGO both).
        """
        states = subword_states(self.encoder, self.frozen_layers, batch)  # (B, S, D)
        drops_text = getattr(self.fusion, "drops_text", False)
        drops_fused = getattr(self.fusion, "drops_fused", True)
        if drops_text:
            states = self.dropout(states)
        words = word_states(states, batch["first_subword"])  # (B, T, D)
        visual = visual_mask = pooled = None
        fused = words
        if getattr(self.fusion, "two_tower", False):
            # IFAformer: a vision tower and the text layers exchange keys and values (train/zoo/two_tower.py)
            image_mask = batch["image_mask"] if image_mask is None else image_mask  # (B,)
            fused = self.fusion.encode(self.encoder, self.vision_blocks.layers, batch, words, image_mask)
        elif self.fusion is not None:
            image_mask = batch["image_mask"] if image_mask is None else image_mask  # (B,)
            tokens = self.vision_inputs(batch, image_mask)  # the blocks run once for both readers
            visual, visual_mask = self.visual(tokens, image_mask)  # (B, V, D), (B, V)
            pooled = self.visual.encode_global(tokens, image_mask) if self.visual.builds_global else None
            if getattr(self.fusion, "single_stream", False):
                # IFAformer: the encoder's own layers run over words + visual tokens (train/zoo/ifaformer.py)
                fused = self.fusion.encode(self.encoder, batch, words, visual, visual_mask)  # (B, T, D)
            else:
                fused = self.fusion(words, batch["word_mask"], visual, visual_mask, pooled)  # (B, T, D)
        if self.bilstm is not None:
            fused = self._bilstm(fused, batch["word_mask"])  # (B, T, 2H)
        # The CRF's log-sum-exp runs in float32 even under autocast: fp16 would round the partition.
        if drops_fused:
            fused = self.dropout(fused)
        if self.emission_norm is not None:
            fused = self.emission_norm(fused)
        emissions = self.emission(fused).float()  # (B, T, L)
        return emissions, words, visual, visual_mask, pooled, states[:, 0]

    def _bilstm(self, states: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """states (B, T, D) -> (B, T, 2H), run over each post's words only (packed), so the backward
        direction starts at the post's last word, not at the batch's padding; zero past it."""
        lengths = word_mask.sum(dim=1).clamp(min=1).cpu()  # (B,); word_mask is a prefix of each row
        packed = nn.utils.rnn.pack_padded_sequence(states, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.bilstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=states.shape[1])
        return out  # (B, T, 2H)

    def forward(self, batch: dict) -> dict:
        """Training losses, scalars: "loss" (the total), "<head>_loss" ("crf_loss") and "<name>_loss" for
        every auxiliary loss ("align_loss", "slot_type_loss"), 0 for one that is off."""
        image_mask = None
        if self.fusion is not None:
            image_mask = batch["image_mask"]  # (B,)
            if self.training and self.cfg.image_dropout > 0:
                keep = torch.rand(image_mask.shape, device=image_mask.device) >= self.cfg.image_dropout
                image_mask = image_mask & keep
        emissions, words, visual, visual_mask, pooled, cls = self._emissions(
            batch, image_mask
        )  # (B, T, L), (B, T, D), ...
        tags, word_mask = self.task.targets(batch, self.outside)  # (B, T), (B, T)
        head_loss = self.head.loss(emissions, tags, word_mask)  # ()
        losses = {f"{self._head_attr}_loss": head_loss}
        loss = head_loss
        inputs = LossInputs(
            words,
            word_mask,
            emissions,
            visual,
            visual_mask,
            pooled=pooled,
            text_cls=cls,
            entities=word_mask & (tags != self.outside),  # (B, T)
            fusion_state=getattr(self.fusion, "state", None),
            epoch=self.epoch,
        )
        if any(getattr(loss, "needs_slots", False) for loss in self.aux_losses.values()):
            inputs.slots = self.fusion.final_slots  # (B, Q, D)
            label_type = torch.tensor(self._label_type, device=tags.device)  # (L,)
            inputs.type_presence = type_presence(tags, word_mask, label_type, len(self.types))  # (B, E)
        for name, weight in AUX_LOSSES.weights.items():
            if name in self.aux_losses:
                losses[f"{name}_loss"] = self.aux_losses[name](inputs)
                loss = loss + getattr(self.cfg, weight) * losses[f"{name}_loss"]
            else:
                losses[f"{name}_loss"] = emissions.new_zeros(())
        return {"loss": loss, **losses}

    @torch.no_grad()
    def decode(self, batch: dict) -> list[list[int]]:
        """A label id per word (len == num_words); words cut by truncation are predicted O.

        Uses batch["image_mask"] as given (no image dropout), whatever the module's mode.
        """
        image_mask = batch["image_mask"] if self.fusion is not None else None
        emissions = self._emissions(batch, image_mask)[0]  # (B, T, L)
        paths = self.head.decode(emissions, batch["word_mask"])
        return [
            path + [self.outside] * (n - len(path)) for path, n in zip(paths, batch["num_words"].tolist())
        ]

    def param_groups(self, train_cfg: TrainConfig) -> list[dict]:
        """AdamW parameter groups: encoder at lr_encoder, visual/fusion at lr_fusion, CRF at lr_crf, the
        emission layer at lr_fusion or, with model.emission_lr = "crf", at lr_crf (IFAformer), the
        trainable vision blocks at lr_vision (their frozen prefix requires no grad and is in no group).

        Weight decay goes to the weight matrices that multiply an input (nn.Linear, the attention
        projections, convolutions) and nothing else: not biases or LayerNorm, not embedding tables
        (word, position, region label, token type), not the CRF's transition scores and not the
        fusion's query slots, as BERT fine-tuning recipes exclude them. Empty groups are left out.
        Each group has "name", "params", "lr" and "weight_decay".
        """
        parts = {
            "encoder": ([], train_cfg.lr_encoder),
            "fusion": ([], train_cfg.lr_fusion),
            "crf": ([], train_cfg.lr_crf),
            "vision": ([], train_cfg.lr_vision),
        }
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("encoder."):
                part = "encoder"
            elif name.startswith("vision_blocks."):
                part = "vision"
            elif name.startswith("crf.") or (
                name.startswith(("emission.", "emission_norm.")) and self.cfg.emission_lr == "crf"
            ):
                part = "crf"
            else:
                part = "fusion"
            parts[part][0].append(param)
        decayed = decayed_parameters(self)
        groups = []
        for part, (params, lr) in parts.items():
            decay = [p for p in params if id(p) in decayed]
            no_decay = [p for p in params if id(p) not in decayed]
            for suffix, chosen, weight_decay in (
                ("", decay, train_cfg.weight_decay),
                ("_no_decay", no_decay, 0.0),
            ):
                if chosen:
                    groups.append(
                        {"name": part + suffix, "params": chosen, "lr": lr, "weight_decay": weight_decay}
                    )
        return groups


def word_states(states: torch.Tensor, first_subword: torch.Tensor) -> torch.Tensor:
    """The state (B, T, D) of each word's first sub-word, from sub-word states (B, S, D) and the index of
    each word's first sub-word (B, T)."""
    index = first_subword[..., None].expand(-1, -1, states.shape[-1])  # (B, T, D)
    return states.gather(1, index)  # (B, T, D)


# Modules whose matrices multiply an input; their >= 2-D parameters are weight-decayed.
_DECAYED_MODULES = (nn.Linear, nn.MultiheadAttention, nn.Conv1d, nn.Conv2d, nn.LSTM)


def decayed_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters to weight-decay: the matrices (dim >= 2) owned by a _DECAYED_MODULES module."""
    return {
        id(param)
        for module in model.modules()
        if isinstance(module, _DECAYED_MODULES)
        for param in module.parameters(recurse=False)
        if param.dim() >= 2
    }
