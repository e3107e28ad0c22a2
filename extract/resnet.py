"""A torchvision ResNet as the vision backbone: its layer4 grid as patch tokens and its avgpool vector
as the global embedding, as BertResNet (seed 004) reads them; `tiny-resnet` is a seeded random one.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import transforms
from torchvision.models import resnet

from mner.cache.checksums import file_sha256
from mner.configs.presets import materialise, preset_dir
from mner.extract.config import (
    RESNETS,
    TINY_RESNET,
)
from mner.extract.weights import (
    PRESET_VERSION,
    load_state,
    one_thread,
)

# torchvision's ImageNet evaluation transform for its ResNets (ResNet50_Weights.IMAGENET1K_V1.transforms()):
# resize the short side to 256, center crop 224, ImageNet mean/std. Recorded in the manifest and fingerprint.
IMAGENET_PREPROCESS = {
    "resize": 256,
    "crop": 224,
    "interpolation": "bilinear",
    "antialias": True,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}
# tiny-resnet sees 64 px crops (a 2x2 layer4 grid at stride 32), resized in the same 256:224 ratio.
TINY_RESNET_PREPROCESS = {**IMAGENET_PREPROCESS, "resize": 73, "crop": 64}
_TORCHVISION_RESNETS: dict[str, Callable[..., resnet.ResNet]] = {
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "resnet152": resnet.resnet152,
}
assert set(_TORCHVISION_RESNETS) == set(RESNETS)


@dataclass
class ResNetEncoder:
    """A torchvision ResNet cut before its classifier: the layer4 grid as patch tokens, avgpool as global.

    Follows BertResNet (seed 004), which reads the ResNet's avgpool output; the grid keeps where things are.
    """

    model: resnet.ResNet  # conv1 ... layer4, avgpool (fc is never run)
    transform: Callable  # PIL image -> (3, S, S) float32, `preprocessing` below
    info: dict  # architecture, checkpoint sha256, preprocessing, untrained flag (manifest "models.vision")
    num_patches: int  # P = (S / 32) ** 2 grid cells, row-major, no CLS
    patch_dim: int  # Dp = layer4 channels (2048 for the Bottleneck ResNets)
    global_dim: int  # Dg = Dp: avgpool of the same grid
    patch_source: str  # what the stored patch tokens are (TokenSpec.patch_source)
    global_source: str  # what the stored global embedding is (TokenSpec.global_source)

    @property
    def image_preprocess(self) -> Callable[[list], Tensor]:
        """images -> (B, 3, S, S), picklable for DataLoader workers."""
        return functools.partial(preprocess_for_resnet, self.transform)

    def preprocess(self, images: list) -> Tensor:
        """PIL images -> pixel values (B, 3, S, S) float32, ImageNet-normalised."""
        return preprocess_for_resnet(self.transform, images)

    @torch.inference_mode()
    def encode(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """pixel_values (B, 3, S, S) -> layer4 grid tokens (B, P, Dp) and avgpool embeddings (B, Dp)."""
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(pixel_values))))  # (B, 64, S/4, S/4)
        grid = m.layer4(m.layer3(m.layer2(m.layer1(x))))  # (B, Dp, S/32, S/32)
        global_embed = torch.flatten(m.avgpool(grid), 1)  # (B, Dp): the grid's mean, as torchvision's forward
        return grid.flatten(2).transpose(1, 2), global_embed  # (B, P, Dp) row-major cells, (B, Dp)

    def to(self, device: torch.device) -> ResNetEncoder:
        self.model.to(device)
        return self


def resnet_transform(settings: dict) -> transforms.Compose:
    """The preprocessing `settings` (IMAGENET_PREPROCESS's keys) as a torchvision transform."""
    assert settings["interpolation"] == "bilinear"
    return transforms.Compose(
        [
            transforms.Resize(
                settings["resize"],
                interpolation=transforms.InterpolationMode.BILINEAR,
                antialias=settings["antialias"],
            ),
            transforms.CenterCrop(settings["crop"]),
            transforms.PILToTensor(),  # (3, S, S) uint8
            transforms.ConvertImageDtype(torch.float32),  # in [0, 1]
            transforms.Normalize(settings["mean"], settings["std"]),
        ]
    )


def preprocess_for_resnet(transform: Callable, images: list) -> Tensor:
    """PIL images -> (B, 3, S, S) float32, single-threaded (the same bits in workers and the main process)."""
    with one_thread():
        return torch.stack([transform(image) for image in images])


def load_resnet(name: str, ckpt: str | None, device: str | torch.device = "cpu") -> ResNetEncoder:
    """Build ResNet `name` (random init, nothing downloaded), load the state dict `ckpt`, eval on `device`.

    "tiny-resnet" writes its seeded random checkpoint to the preset folder when no `ckpt` is given.
    Raises ValueError, in one line naming the file, for a missing, unreadable or non-fitting checkpoint.
    """
    if name != TINY_RESNET and name not in _TORCHVISION_RESNETS:
        raise ValueError(f"unknown ResNet {name!r}; known: {', '.join([*RESNETS, TINY_RESNET])}")
    if ckpt is None and name != TINY_RESNET:
        raise ValueError(
            f"--vision-ckpt is required for {name}: give a local torchvision state-dict file "
            "(weights are never downloaded)"
        )
    untrained = ckpt is None
    ckpt_path = materialise_tiny_resnet() if ckpt is None else Path(ckpt).expanduser()
    if not ckpt_path.is_file():
        raise ValueError(f"vision checkpoint not found: {ckpt_path}")
    model = _tiny_resnet() if name == TINY_RESNET else _TORCHVISION_RESNETS[name](weights=None)
    load_state(model, ckpt_path, name, "vision")
    model.eval()
    settings = TINY_RESNET_PREPROCESS if name == TINY_RESNET else IMAGENET_PREPROCESS
    side = settings["crop"] // 32  # the stem and layer2-4 halve the size 5 times
    patch_source = f"{name}.layer4 ({side}x{side} grid, row-major)"
    global_source = f"{name}.avgpool"
    info = {
        "name": name,
        "arch": name,
        "ckpt": str(ckpt_path.resolve()),
        "sha256": file_sha256(ckpt_path),
        "untrained": untrained,
        "preprocessing": settings,
        "patch_source": patch_source,
        "global_source": global_source,
    }
    width = model.fc.in_features
    encoder = ResNetEncoder(
        model=model,
        transform=resnet_transform(settings),
        info=info,
        num_patches=side * side,
        patch_dim=width,
        global_dim=width,
        patch_source=patch_source,
        global_source=global_source,
    )
    return encoder.to(torch.device(device))


def materialise_tiny_resnet(root: Path | None = None) -> Path:
    """Write the seeded random tiny ResNet state dict (loaded afterwards like a real checkpoint)."""

    def write(path: Path) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = _tiny_resnet()
        buffer = io.BytesIO()  # through a buffer: the archive name must not depend on the temporary file
        torch.save(model.state_dict(), buffer)
        path.write_bytes(buffer.getvalue())

    return materialise((root or preset_dir()) / f"{TINY_RESNET}.v{PRESET_VERSION}.pt", write, is_dir=False)


def _tiny_resnet() -> resnet.ResNet:
    """torchvision's ResNet with one BasicBlock per stage and 8/16/32/64 channels (about 0.2M parameters):
    the same module names and forward as resnet50, a 64-d layer4 grid."""
    model = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=10)
    model.inplanes = 8
    model.conv1 = nn.Conv2d(3, 8, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(8)
    model.layer1 = model._make_layer(resnet.BasicBlock, 8, 1)
    model.layer2 = model._make_layer(resnet.BasicBlock, 16, 1, stride=2)
    model.layer3 = model._make_layer(resnet.BasicBlock, 32, 1, stride=2)
    model.layer4 = model._make_layer(resnet.BasicBlock, 64, 1, stride=2)
    model.fc = nn.Linear(64, 10)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            # Random running statistics, so eval-mode BatchNorm is not an identity and the test sees real mixing.
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    return model
