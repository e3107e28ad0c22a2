"""Trainable vision blocks (`extract-features --vision-trainable-blocks K`): what the cache costs per
image, and what a training step of the vision part costs, against the whole vision model in the loop.

The models are CLIP ViT-B/32 (12 layers, 768 wide, 224 px, 32 px patches, projection 512) and a
torchvision ResNet-50, both randomly initialised from their configs: nothing is downloaded, and
neither the byte counts nor the step times depend on the weights' values. The code measured is the
code that runs: extraction's encoders (`encode_with_state`, `block_weights`), the cache's TokenSpec
shapes and dtypes, and stage two's `VisionBlocks`.

    bytes / image    the shard payload of one image with --detector none (patch tokens, global embedding,
                     the vision state from K > 0, and the small per-image arrays); regions add the same
                     bytes at every K
    weights MiB      vision_blocks.safetensors, once per cache
    step ms          one training step of the vision part alone, batch 16, on the CPU: forward, a loss,
                     backward, for the blocks and for a small head every variant shares (a Linear on the
                     patch tokens and one on the global embedding; K = 0 is that head alone, on the
                     cached tokens); "end to end" runs the whole vision model on pixels, trainable
    x end to end     step / the end-to-end step of the same model, measured in the same run

The MANGO table times the whole stage-two step (`train.loop.train_step`: forward, loss, backward, clip,
AdamW) of the MANGO model (configs/models/mango.toml on MiniLM, no regions) on 16 posts of 20 words
with B/32 tokens, at model.vision_trainable_blocks = 0, 2 and 12 (all), against the k = 0 model with
the whole B/32 tower run on the pixels inside the step and trained with it (end to end). Image dropout
is off, so every variant runs its vision part on all 16 images.

    python benchmarks/bench_vision_blocks.py            # B/32 at K = 0, 2, all; ResNet-50 at K = 0, 1; MANGO
    python benchmarks/bench_vision_blocks.py --reps 5 --no-resnet --no-mango
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet50
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from mner.cache.spec import DTYPES, TokenSpec
from mner.extract.clip import ClipEncoder
from mner.extract.resnet import IMAGENET_PREPROCESS, ResNetEncoder, resnet_transform
from mner.runtime import resolve_runtime
from mner.train.engine.config_files import load_run_config
from mner.train.engine.data import Collate
from mner.train.engine.loop import make_optimizer, train_step
from mner.train.zoo.model import MNERModel
from mner.train.zoo.text import load_tokenizer, resolve_text_encoder
from mner.train.zoo.vision_blocks import VisionBlocks

BATCH = 16


def b32() -> ClipEncoder:
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        image_size=224,
        patch_size=32,
        projection_dim=512,
    )
    model = CLIPVisionModelWithProjection(config)
    return ClipEncoder(
        vision=model.vision_model,
        projection=model.visual_projection,
        processor=CLIPImageProcessor(),
        info={"name": "clip-vit-b32 (random)"},
        num_patches=50,
        patch_dim=768,
        global_dim=512,
        patch_source="vision_model.last_hidden_state (CLS first)",
        global_source="image_embeds (visual_projection)",
    )


def r50() -> ResNetEncoder:
    torch.manual_seed(0)
    return ResNetEncoder(
        model=resnet50(weights=None),
        transform=resnet_transform(IMAGENET_PREPROCESS),
        info={"name": "resnet50 (random)"},
        num_patches=49,
        patch_dim=2048,
        global_dim=2048,
        patch_source="resnet50.layer4 (7x7 grid, row-major)",
        global_source="resnet50.avgpool",
    )


def spec_of(encoder, blocks: int) -> TokenSpec:
    """The cache's TokenSpec for `encoder` with --detector none and --vision-trainable-blocks `blocks`."""
    state = {}
    if blocks:
        shape, source = encoder.state_spec(blocks)
        state = {"vision_state_shape": shape, "vision_state_source": source}
    return TokenSpec(
        num_patches=encoder.num_patches,
        patch_dim=encoder.patch_dim,
        global_dim=encoder.global_dim,
        max_regions=0,
        region_dim=0,
        patch_source=encoder.patch_source,
        global_source=encoder.global_source,
        region_source="none",
        **state,
    )


def image_bytes(encoder, blocks: int) -> int:
    """One image's shard payload with --detector none, as ShardWriter lays it out."""
    spec = spec_of(encoder, blocks)
    return sum(
        int(np.prod(shape)) * DTYPES[name].itemsize for name, shape in spec.shapes().items() if name in DTYPES
    )


def blocks_of(encoder, blocks: int) -> VisionBlocks:
    config, tensors = encoder.block_weights(blocks)
    return VisionBlocks(config, {name: value.detach().numpy() for name, value in tensors.items()})


def timed(step, reps: int) -> float:
    """Median seconds of `step()` over `reps` runs after one warm-up."""
    step()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def step_of(vision, head: nn.ModuleList, inputs: torch.Tensor):
    """One training step: vision(inputs) -> (patches, global), the head's loss, backward."""

    def step():
        head.zero_grad(set_to_none=True)
        if isinstance(vision, nn.Module):
            vision.zero_grad(set_to_none=True)
        patches, pooled = vision(inputs)  # (B, P, Dp), (B, Dg)
        loss = head[0](patches).square().mean() + head[1](pooled).square().mean()
        loss.backward()

    return step


def measure(name: str, encoder, ks: list[int], layers: int, reps: int) -> list[tuple]:
    size = IMAGENET_PREPROCESS["crop"]
    pixels = torch.randn(BATCH, 3, size, size)  # (B, 3, S, S)
    patches, pooled = (
        tensor.clone() for tensor in encoder.encode(pixels)
    )  # the cached tokens, out of inference mode
    head = nn.ModuleList(
        [nn.Linear(encoder.patch_dim, encoder.patch_dim), nn.Linear(encoder.global_dim, encoder.global_dim)]
    )

    if isinstance(encoder, ClipEncoder):

        def whole(x):
            out = encoder.vision(pixel_values=x)
            return out.last_hidden_state, encoder.projection(out.pooler_output)

        trainable = [encoder.vision, encoder.projection]
    else:

        def whole(x):
            m = encoder.model
            grid = m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
            return grid.flatten(2).transpose(1, 2), torch.flatten(m.avgpool(grid), 1)

        trainable = [encoder.model]
    for module in trainable:
        module.train().requires_grad_(True)
    end_to_end = timed(step_of(whole, head, pixels), reps)
    rows = [(name, "end to end", image_bytes(encoder, 0), None, end_to_end)]
    for k in ks:
        if k == 0:
            seconds = timed(step_of(lambda cached: (patches, pooled), head, pixels), reps)
            rows.append((name, "K=0", image_bytes(encoder, 0), 0.0, seconds))
            continue
        with torch.no_grad():
            _, _, state = encoder.encode_with_state(pixels, k)
        state = state.clone()  # out of inference mode, so autograd may use it
        runner = blocks_of(encoder, k).train()
        config, tensors = encoder.block_weights(k)
        weights = sum(value.numel() * value.element_size() for value in tensors.values()) / 2**20
        label = f"K={k}" + (" (all)" if k == layers else "")
        rows.append(
            (name, label, image_bytes(encoder, k), weights, timed(step_of(runner, head, state), reps))
        )
    return rows


class EndToEnd(nn.Module):
    """The k = 0 model with the whole CLIP tower in the loop: tokens made from batch["pixels"], trained."""

    def __init__(self, model: MNERModel, encoder: ClipEncoder):
        super().__init__()
        self.model, self.vision, self.projection = model, encoder.vision, encoder.projection

    def forward(self, batch: dict) -> dict:
        out = self.vision(pixel_values=batch["pixels"])
        tokens = {
            **batch,
            "patch_tokens": out.last_hidden_state,
            "global_embed": self.projection(out.pooler_output),
        }
        return self.model(tokens)


def mango_batch(encoder: ClipEncoder, pixels: torch.Tensor, state, tokenizer, labels) -> dict:
    """16 posts of 20 words with the cached tokens of `pixels` (and their vision state) through Collate."""
    rng = np.random.default_rng(0)
    words = ["paris", "obama", "the", "game", "today", "#rt", "@user", "visited", "london", "rain"]
    patches, pooled = (t.clone() for t in encoder.encode(pixels))  # (B, P, Dp), (B, Dg)
    items = []
    for b in range(BATCH):
        post = [str(w) for w in rng.choice(words, 20)]
        item = {"key": str(b), "path": None, "line": 0, "words": post, "tags": ["O"] * 20}
        item.update(image_ok=True, num_regions=0, region_feats=np.zeros((0, 0), np.float16))
        item.update(region_labels=np.zeros(0, np.int32), region_scores=np.zeros(0, np.float32))
        item.update(region_boxes=np.zeros((0, 4), np.float32))
        item.update(patch_tokens=patches[b].half().numpy(), global_embed=pooled[b].half().numpy())
        if state is not None:
            item["vision_state"] = state[b].half().numpy()
        items.append(item)
    batch = Collate(tokenizer, labels, 64, with_visual=True)(items)
    batch["pixels"] = pixels
    return batch


def measure_mango(encoder: ClipEncoder, ks: list[int], reps: int) -> list[tuple]:
    """[(variant, seconds)] of MANGO's train_step at each k, and end to end."""
    size = IMAGENET_PREPROCESS["crop"]
    pixels = torch.randn(BATCH, 3, size, size)  # (B, 3, S, S)
    labels = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    encoder_dir = resolve_text_encoder("minilm")
    tokenizer = load_tokenizer(encoder_dir)
    runtime = resolve_runtime("cpu", "off")
    rows = []
    for k in ["end to end", *ks]:
        blocks = 0 if k == "end to end" else k
        overrides = [
            "model.use_regions=false",
            "model.image_dropout=0.0",
            f"model.vision_trainable_blocks={blocks}",
        ]
        model_cfg, train_cfg = load_run_config(model="mango", overrides=overrides)
        config = arrays = state = None
        if blocks:
            config, tensors = encoder.block_weights(blocks)
            arrays = {name: value.detach().numpy() for name, value in tensors.items()}
            with torch.no_grad():
                _, _, state = encoder.encode_with_state(pixels, blocks)
        torch.manual_seed(0)
        model = MNERModel(
            model_cfg,
            labels,
            spec_of(encoder, blocks),
            encoder_dir,
            vision_blocks=config,
            vision_weights=arrays,
        ).train()
        groups = model.param_groups(train_cfg)
        if k == "end to end":
            model = EndToEnd(model, encoder).train()
            tower = [*encoder.vision.parameters(), *encoder.projection.parameters()]
            for parameter in tower:
                parameter.requires_grad_(True)
            groups.append({"name": "vision", "params": tower, "lr": train_cfg.lr_vision, "weight_decay": 0.0})
        optimizer, scheduler, scaler = make_optimizer(groups, train_cfg.weight_decay, 0.0, 10**6, runtime)
        batch = mango_batch(encoder, pixels, state, tokenizer, labels)
        step = functools.partial(
            train_step, model, batch, optimizer, scheduler, scaler, train_cfg.max_grad_norm, runtime
        )
        label = k if k == "end to end" else f"k={k}" + (" (all)" if k == 12 else "")
        rows.append((label, timed(step, reps)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reps", type=int, default=3, help="timed steps per variant (median), after a warm-up"
    )
    parser.add_argument("--no-resnet", action="store_true", help="B/32 only")
    parser.add_argument("--no-mango", action="store_true", help="leave out the MANGO step table")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, CPU, {args.reps} reps (median)"
    )
    clip = b32()
    print(
        "per image cache bytes (B/32, --detector none): "
        + ", ".join(f"K={k} {image_bytes(clip, k):,}" for k in (0, 1, 2, 12))
    )
    rows = measure("B/32", clip, [0, 2, 12], 12, args.reps)
    if not args.no_resnet:
        rows += measure("ResNet-50", r50(), [0, 1], 0, args.reps)  # layer4 is not "all" of a ResNet
    print(
        f"{'model':<10} {'variant':<12} {'bytes/image':>12} {'weights MiB':>12} {'step ms':>9} {'x end to end':>13}"
    )
    ends = {name: seconds for name, label, _, _, seconds in rows if label == "end to end"}
    for name, label, size, weights, seconds in rows:
        mib = "" if weights is None else f"{weights:.1f}"
        print(
            f"{name:<10} {label:<12} {size:>12,} {mib:>12} {seconds * 1e3:>9.1f} {seconds / ends[name]:>13.3f}"
        )
    k0 = {name: seconds for name, label, _, _, seconds in rows if label == "K=0"}
    k2 = next((seconds for name, label, _, _, seconds in rows if name == "B/32" and label == "K=2"), None)
    if k2 is not None:
        print(
            f"B/32: K=2 step / K=0 step = {k2 / k0['B/32']:.1f}; end to end / K=2 step = {ends['B/32'] / k2:.1f}"
        )
    if args.no_mango:
        return
    mango = dict(measure_mango(clip, [0, 2, 12], args.reps))
    print(
        f"MANGO train_step, B/32 tokens, batch {BATCH}: {'variant':<12} {'step ms':>9} {'x k=0':>7} {'x end to end':>13}"
    )
    for label, seconds in mango.items():
        print(
            f"{'':<39}{label:<12} {seconds * 1e3:>9.1f} {seconds / mango['k=0']:>7.2f} "
            f"{seconds / mango['end to end']:>13.3f}"
        )
    print(
        f"MANGO: k=2 step / k=0 step = {mango['k=2'] / mango['k=0']:.2f}; "
        f"end to end / k=2 step = {mango['end to end'] / mango['k=2']:.1f}"
    )


if __name__ == "__main__":
    main()
