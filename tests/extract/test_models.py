"""CLIP and detector loading, and region tokens checked against torchvision's own forward pass."""

import hashlib
import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.models import detection, resnet
from torchvision.models.detection.transform import resize_boxes
from torchvision.models.feature_extraction import create_feature_extractor
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from mner.cache.datasets import DataConfig
from mner.extract.clip import load_clip, materialise_clip_preset
from mner.extract.config import RESNETS, ExtractConfig
from mner.extract.detector import build_detector, materialise_tiny_frcnn
from mner.extract.resnet import load_resnet, materialise_tiny_resnet
from mner.extract.weights import one_thread

VISION = dict(
    image_size=32,
    patch_size=16,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
)


def sha256_of(path) -> str:
    """A second implementation of the weight hash the fingerprint uses."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def config(**changes) -> ExtractConfig:
    return ExtractConfig(data=DataConfig(data_dir="unused"), out="unused", **changes)


def save_clip(folder, kind: str, crop: int = 32, image_mean=None):
    """A tiny random HF folder: "full" CLIPModel or "vision" CLIPVisionModel, with its processor."""
    torch.manual_seed(1)
    if kind == "full":
        text = dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
        )
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=VISION, projection_dim=8))
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**VISION))
    model.save_pretrained(folder)
    extra = {"image_mean": image_mean} if image_mean else {}
    CLIPImageProcessor(
        size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, **extra
    ).save_pretrained(folder)
    return model.eval()


def some_images():
    """Two noise pictures of different sizes (flat ones would tie every proposal's score)."""
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in [(40, 56, 3), (50, 30, 3)]
    ]


def test_demo_clip_preset_has_the_bundled_text_encoders_shape(preset_dir):
    """demo-clip pairs with MiniLM layer for layer (IFAformer's two towers need equal depth, width, heads)."""
    from transformers import AutoConfig

    from mner.train.zoo.text import resolve_text_encoder

    clip = load_clip("demo-clip")
    text = AutoConfig.from_pretrained(resolve_text_encoder("minilm"), local_files_only=True)
    shape = ("num_hidden_layers", "hidden_size", "num_attention_heads")
    assert (
        [getattr(clip.vision.config, n) for n in shape] == [getattr(text, n) for n in shape] == [6, 384, 12]
    )
    assert clip.info["name"] == "demo-clip" and clip.info["untrained"] is True
    assert clip.num_patches == 17 and materialise_clip_preset("demo-clip").parent == preset_dir


def test_tiny_clip_preset_matches_the_saved_model(preset_dir):
    clip = load_clip("tiny-clip")
    folder = materialise_clip_preset()
    assert folder.parent == preset_dir
    assert (clip.num_patches, clip.patch_dim, clip.global_dim) == (17, 32, 32)  # 1 + (64 / 16)^2 tokens
    assert clip.info["untrained"] is True
    assert clip.info["sha256"] == {"model.safetensors": sha256_of(folder / "model.safetensors")}
    assert clip.info["processor"]["crop_size"] == {"height": 64, "width": 64}
    pixel_values = clip.preprocess(some_images())
    assert pixel_values.shape == (2, 3, 64, 64)
    patches, global_embed = clip.encode(pixel_values)
    reference = CLIPVisionModelWithProjection.from_pretrained(folder).eval()(pixel_values=pixel_values)
    torch.testing.assert_close(patches, reference.last_hidden_state)
    torch.testing.assert_close(global_embed, reference.image_embeds)
    assert clip.global_source == "image_embeds (visual_projection)"


def test_full_clip_folder_uses_vision_tower_and_projection(tmp_path):
    reference = save_clip(tmp_path, "full", image_mean=[0.1, 0.2, 0.3])
    clip = load_clip(str(tmp_path))
    assert clip.info["class"] == "CLIPModel" and clip.info["untrained"] is False
    # The processor comes from the same folder: its (unusual) normalisation is the one used.
    assert clip.info["processor"]["image_mean"] == [0.1, 0.2, 0.3]
    pixel_values = clip.preprocess(some_images())  # (2, 3, 32, 32)
    patches, global_embed = clip.encode(pixel_values)
    assert patches.shape == (2, 5, 16) and global_embed.shape == (2, 8)
    with torch.no_grad():
        features = reference.get_image_features(pixel_values=pixel_values)
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    torch.testing.assert_close(global_embed, features)


def test_vision_folder_without_projection_stores_pooler_output(tmp_path):
    reference = save_clip(tmp_path, "vision")
    clip = load_clip(str(tmp_path))
    assert clip.info["class"] == "CLIPVisionModel" and clip.global_source == "pooler_output"
    pixel_values = clip.preprocess(some_images())
    patches, global_embed = clip.encode(pixel_values)
    with torch.no_grad():
        out = reference(pixel_values=pixel_values)
    torch.testing.assert_close(patches, out.last_hidden_state)
    torch.testing.assert_close(global_embed, out.pooler_output)
    assert global_embed.shape == (2, 16)


def test_clip_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="CLIP model folder not found or has no config.json: .*nowhere"):
        load_clip(str(tmp_path / "nowhere"))
    save_clip(tmp_path / "noproc", "vision")
    (tmp_path / "noproc" / "preprocessor_config.json").unlink()
    with pytest.raises(
        ValueError,
        match="has no preprocessor_config.json; the image processor must come from the same folder",
    ):
        load_clip(str(tmp_path / "noproc"))
    save_clip(tmp_path / "crop", "vision", crop=48)
    with pytest.raises(
        ValueError, match="processor crop_size .*48.* does not match the encoder's image_size 32"
    ):
        load_clip(str(tmp_path / "crop"))
    save_clip(tmp_path / "bert", "vision")
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="has model_type 'bert'; expected 'clip' or 'clip_vision_model'"):
        load_clip(str(tmp_path / "bert"))
    save_clip(tmp_path / "noweights", "vision")
    for weights in (tmp_path / "noweights").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ValueError, match=f"^CLIP folder {tmp_path / 'noweights'} cannot be loaded: "):
        load_clip(str(tmp_path / "noweights"))


@pytest.mark.slow
def test_detector_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="--detector-ckpt is required for fasterrcnn_resnet50_fpn"):
        build_detector("fasterrcnn_resnet50_fpn", None, config())
    with pytest.raises(ValueError, match=f"detector checkpoint not found: {tmp_path / 'gone.pt'}"):
        build_detector("fasterrcnn_resnet50_fpn", str(tmp_path / "gone.pt"), config())
    with pytest.raises(ValueError, match="does not fit fasterrcnn_mobilenet_v3_large_320_fpn"):
        build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", str(materialise_tiny_frcnn()), config())
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=f"^detector checkpoint {junk} is not a torchvision state_dict file"):
        build_detector("fasterrcnn_mobilenet_v3_large_320_fpn", str(junk), config())
    with pytest.raises(ValueError, match="unknown detector 'yolo'; known: fasterrcnn_resnet50_fpn, "):
        build_detector("yolo", None, config())


@pytest.mark.slow
def test_torchvision_detector_loads_the_given_checkpoint(tmp_path):
    torch.manual_seed(3)
    saved = detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=91
    )
    ckpt = tmp_path / "mobilenet.pt"
    torch.save(saved.state_dict(), ckpt)
    name = "fasterrcnn_mobilenet_v3_large_320_fpn"
    det = build_detector(
        name, str(ckpt), config(detector=name, detector_ckpt=str(ckpt), score_thr=0.3, nms_iou=0.4, topk=7)
    )
    for name, value in saved.state_dict().items():
        assert torch.equal(det.model.state_dict()[name], value), name
    heads = det.model.roi_heads
    assert (heads.score_thresh, heads.nms_thresh, heads.detections_per_img) == (0.3, 0.4, 7)
    assert det.region_dim == 1024
    assert det.info["sha256"] == sha256_of(ckpt) and det.info["untrained"] is False
    assert len(det.info["categories"]) == 91 and det.info["categories"][1] == "person"


def raw_tensors():
    return [
        torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in some_images()
    ]  # (3, H, W)


def test_tiny_detector_detections_equal_torchvision_forward():
    det = build_detector("tiny-frcnn", None, config(topk=5))
    assert det.model.roi_heads.score_thresh == 0.0 and det.info["untrained"] is True
    images = raw_tensors()
    sizes = [tuple(im.shape[-2:]) for im in images]
    regions = det.detect([det.preprocess(im) for im in images], sizes)
    with torch.no_grad(), one_thread():  # preprocessing runs single-threaded in `detect` too
        reference = det.model(images)  # torchvision's own end-to-end forward
    wide = build_detector("tiny-frcnn", None, config(topk=50))
    wider = wide.detect([wide.preprocess(im) for im in images], sizes)
    for got, ref, more, (height, width) in zip(regions, reference, wider, sizes):
        assert len(got.scores) == 5
        torch.testing.assert_close(got.pixel_boxes, ref["boxes"])
        torch.testing.assert_close(got.scores, ref["scores"])
        assert torch.equal(got.labels, ref["labels"])
        # top-k keeps the best-scoring boxes of a longer list.
        torch.testing.assert_close(got.scores, more.scores[:5])
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        assert got.boxes.min() >= 0 and got.boxes.max() <= 1
        torch.testing.assert_close(got.boxes * scale, ref["boxes"].clamp(min=0), rtol=0, atol=1e-4)


def test_region_feature_is_box_head_pooled_on_the_stored_box():
    det = build_detector("tiny-frcnn", None, config(topk=6))
    model = det.model
    images = raw_tensors()
    sizes = [tuple(im.shape[-2:]) for im in images]
    regions = det.detect([det.preprocess(im) for im in images], sizes)
    with torch.no_grad(), one_thread():
        batch, _ = model.transform(images)  # torchvision's own normalise + resize + pad
        features = model.backbone(batch.tensors)
        features = {"0": features} if isinstance(features, torch.Tensor) else features
        for i, got in enumerate(regions):
            boxes = resize_boxes(got.pixel_boxes, sizes[i], batch.image_sizes[i])  # back to the resized frame
            pooled = model.roi_heads.box_roi_pool(
                features, [boxes if j == i else boxes[:0] for j in range(2)], batch.image_sizes
            )
            expected = model.roi_heads.box_head(pooled)  # (R, Dr)
            assert got.feats.shape == (6, 64)
            torch.testing.assert_close(got.feats, expected, rtol=1e-4, atol=1e-5)
    # Different boxes of one image give different features: the pooling really follows the box.
    assert not torch.allclose(regions[0].feats[0], regions[0].feats[-1])


# --------------------------------------------------------------------------------------------- ResNet


def save_state(model: torch.nn.Module, path) -> str:
    torch.save(model.state_dict(), path)
    return str(path)


def textured_image(width: int = 300, height: int = 200, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.slow  # builds each torchvision ResNet at full size
@pytest.mark.parametrize("name", RESNETS)
def test_resnet_grid_and_avgpool_are_torchvisions(tmp_path, name):
    """The stored tokens against torchvision's own computations: its ImageNet transform, its layer4 output
    (feature_extraction) and its forward up to avgpool (fc replaced by Identity)."""
    torch.manual_seed(0)
    reference = getattr(resnet, name)(weights=None).eval()
    encoder = load_resnet(name, save_state(reference, tmp_path / f"{name}.pth"))
    images = [textured_image(), textured_image(180, 260, seed=1)]
    pixels = encoder.preprocess(images)  # (2, 3, 224, 224)
    # resize 256, crop 224, ImageNet mean/std: the IMAGENET1K_V1 transform of all three ResNets
    trusted = getattr(resnet, f"ResNet{name[6:]}_Weights").IMAGENET1K_V1.transforms()
    assert torch.equal(pixels, torch.stack([trusted(image) for image in images]))
    patches, global_embed = encoder.encode(pixels)
    assert patches.shape == (2, 49, 2048) and global_embed.shape == (2, 2048)
    assert (encoder.num_patches, encoder.patch_dim, encoder.global_dim) == (49, 2048, 2048)
    with torch.inference_mode():
        grid = create_feature_extractor(reference, {"layer4": "grid"})(pixels)["grid"]  # (2, 2048, 7, 7)
        reference.fc = torch.nn.Identity()
        pooled = reference(pixels)  # (2, 2048): torchvision's forward up to avgpool
    torch.testing.assert_close(patches, grid.flatten(2).transpose(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(global_embed, pooled, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(global_embed, patches.mean(dim=1), rtol=1e-5, atol=1e-6)
    assert patches[0, 0].ne(patches[0, 48]).any()  # grid cells differ: the tokens keep where things are
    info = encoder.info
    assert info["arch"] == name and not info["untrained"]
    assert info["sha256"] == hashlib.sha256((tmp_path / f"{name}.pth").read_bytes()).hexdigest()
    # torchvision's own ImageNet evaluation transform for its ResNet weights is the reference.
    reference = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    assert info["preprocessing"] == {
        "resize": reference.resize_size[0],
        "crop": reference.crop_size[0],
        "interpolation": reference.interpolation.value,
        "antialias": reference.antialias,
        "mean": reference.mean,
        "std": reference.std,
    }
    assert encoder.patch_source == f"{name}.layer4 (7x7 grid, row-major)"
    assert encoder.global_source == f"{name}.avgpool"


def test_tiny_resnet_preset_is_written_once_and_untrained():
    path = materialise_tiny_resnet()
    before = path.read_bytes()
    encoder = load_resnet("tiny-resnet", None)
    assert materialise_tiny_resnet().read_bytes() == before  # reused, not rewritten
    assert encoder.info["untrained"] and encoder.info["preprocessing"]["crop"] == 64
    patches, global_embed = encoder.encode(encoder.preprocess([textured_image()]))
    assert patches.shape == (1, 4, 64) and global_embed.shape == (1, 64)  # a 2x2 layer4 grid
    torch.testing.assert_close(global_embed, patches.mean(dim=1), rtol=1e-5, atol=1e-6)
    assert sum(p.numel() for p in encoder.model.parameters()) < 300_000


def test_resnet_checkpoint_errors_name_the_file(tmp_path):
    tiny = torch.load(materialise_tiny_resnet(), weights_only=True)
    with pytest.raises(ValueError, match=f"^vision checkpoint not found: {tmp_path / 'nope.pth'}$"):
        load_resnet("resnet50", str(tmp_path / "nope.pth"))
    with pytest.raises(ValueError, match="^--vision-ckpt is required for resnet101: give a local"):
        load_resnet("resnet101", None)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(
        ValueError, match=f"^vision checkpoint {garbage} is not a torchvision state_dict file"
    ):
        load_resnet("tiny-resnet", str(garbage))
    listed = tmp_path / "list.pth"
    torch.save([1, 2], listed)
    with pytest.raises(ValueError, match=f"^vision checkpoint {listed} holds a list, not a state_dict"):
        load_resnet("tiny-resnet", str(listed))
    cases = {
        "mismatch.pth": (tiny, "resnet50", "size mismatch for conv1.weight"),
        "missing.pth": (
            {k: v for k, v in tiny.items() if not k.startswith("fc.")},
            "tiny-resnet",
            r"2 missing keys \(e.g. fc.weight\)$",
        ),
        "extra.pth": (
            {**tiny, "head.bias": torch.zeros(1)},
            "tiny-resnet",
            r"1 unexpected keys \(e.g. head.bias\)$",
        ),
    }
    for name, (state, arch, message) in cases.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(
            ValueError, match=f"^vision checkpoint {tmp_path / name} does not fit {arch}: .*{message}"
        ):
            load_resnet(arch, str(tmp_path / name))
        try:
            load_resnet(arch, str(tmp_path / name))
        except ValueError as err:
            assert "\n" not in str(err)  # one line
