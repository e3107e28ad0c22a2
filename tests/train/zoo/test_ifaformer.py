"""IFAformer's single stream (train/zoo/ifaformer.py): the image-less rule bitwise, positions, the mask,
shapes, the region switch, training, its config file, and a run through `mner train-from-cache`."""

import json
import re

import pytest
import torch
from click.testing import CliRunner
from transformers import RobertaConfig, RobertaModel

from mner.cli import main
from mner.train.engine.config import ModelConfig, TrainConfig
from mner.train.engine.config_files import describe_model, load_run_config
from mner.train.zoo.ifaformer import SingleStreamFusion, joint_key_mask
from mner.train.zoo.registry import AUX_LOSSES
from tests.train.factories import make_batch, make_cache, make_posts, tiny_model, tiny_spec, tiny_tokenizer
from tests.train.run_factories import FAST_LR, make_data, single_thread  # noqa: F401 (autouse fixture)

IFAFORMER = {"fusion": "single_stream", "adaptive_gate": False, "alignment_loss_weight": 0.0}


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory) -> str:
    """A random 2-layer RoBERTa over tiny-bert's vocabulary whose padding_idx is the tokenizer's pad id,
    so its positions are RoBERTa's padding-offset ones (padding_idx + 1 + i), not BERT's 0..S-1."""
    folder = tmp_path_factory.mktemp("tiny-roberta")
    tokenizer = tiny_tokenizer()
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=40,
        type_vocab_size=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        RobertaModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(params=["tiny-bert", "tiny-roberta"])
def encoder_name(request) -> str:
    return "tiny-bert" if request.param == "tiny-bert" else request.getfixturevalue("tiny_roberta")


def ifaformer(encoder: str = "tiny-bert", seed: int = 0, **changes):
    return tiny_model(seed=seed, text_encoder=encoder, **{**IFAFORMER, **changes})


def emissions(model, batch) -> torch.Tensor:
    """(B, T, L) emissions for the batch's own image mask."""
    return model._emissions(batch, batch["image_mask"])[0]


def test_an_image_less_post_gets_exactly_its_text_only_computation(encoder_name):
    model = ifaformer(encoder_name).eval()
    batch = make_batch(make_posts(5, seed=3), statuses={"img1": "missing", "img3": "corrupt"})
    assert batch["image_mask"].tolist() == [True, False, True, False, True]
    no_images = dict(batch, image_mask=torch.zeros_like(batch["image_mask"]))
    with torch.no_grad():
        mixed, masked = emissions(model, batch), emissions(model, no_images)
        text_only = model.emission(model.encode_text(batch)).float()  # (B, T, L)
    for row in (1, 3):
        assert torch.equal(mixed[row], masked[row]) and torch.equal(mixed[row], text_only[row])
    decoded, decoded_masked = model.decode(batch), model.decode(no_images)
    text_paths = model.head.decode(text_only, batch["word_mask"])
    for row in (1, 3):
        assert decoded[row] == decoded_masked[row] == text_paths[row]
    # The posts with an image do go through the joint pass.
    for row in (0, 2, 4):
        assert not torch.equal(mixed[row], text_only[row])


def test_joint_pass_matches_the_encoders_own_forward_with_the_visual_tokens_appended(encoder_name):
    """Reference: the Hugging Face forward on input_ids (its own positions: RoBERTa's padding offset)
    with the visual embeddings appended to its embedding output and the joint key mask."""
    model = ifaformer(encoder_name).eval()
    batch = make_batch(make_posts(3, seed=1))
    rows = torch.arange(3)
    with torch.no_grad():
        visual, visual_mask = model.encode_visual(batch)
        joint = model.fusion.joint_states(model.encoder, batch, rows, visual, visual_mask)
        appended = model.fusion.visual_embeddings(visual)
        hook = model.encoder.embeddings.register_forward_hook(
            lambda module, args, out: torch.cat([out, appended], dim=1)
        )
        try:
            reference = model.encoder(
                input_ids=batch["input_ids"],
                attention_mask=joint_key_mask(batch["attention_mask"], visual_mask),
            ).last_hidden_state
        finally:
            hook.remove()
    assert torch.equal(joint, reference)


def test_shapes():
    model = ifaformer().eval()
    batch = make_batch(make_posts(3), statuses={"img2": "missing"})
    spec = tiny_spec()
    B, S = batch["input_ids"].shape
    T = batch["word_mask"].shape[1]
    D = model.encoder.config.hidden_size
    V = spec.num_patches + spec.max_regions
    with torch.no_grad():
        words = model.encode_text(batch)
        visual, visual_mask = model.encode_visual(batch)
        assert model.fusion.encode(model.encoder, batch, words, visual, visual_mask).shape == (B, T, D)
        joint = model.fusion.joint_states(
            model.encoder, batch, torch.tensor([0, 1]), visual[:2], visual_mask[:2]
        )
        assert joint.shape == (2, S + V, D)
        assert emissions(model, batch).shape == (B, T, 5)
    assert [len(p) for p in model.decode(batch)] == batch["num_words"].tolist()
    out = model(batch)
    aux = {f"{name}_loss" for name in AUX_LOSSES.names}  # 0 for a loss that is off
    assert set(out) == {"loss", "crf_loss", *aux} and all(v.dim() == 0 for v in out.values())


def test_use_regions_false_reads_no_region_tensor():
    model = ifaformer(use_regions=False).eval()
    batch = make_batch(make_posts(3))
    patches_only = {key: value for key, value in batch.items() if not key.startswith("region_")}
    with torch.no_grad():
        visual, visual_mask = model.encode_visual(patches_only)
        joint = model.fusion.joint_states(model.encoder, patches_only, torch.arange(3), visual, visual_mask)
        assert joint.shape[1] == batch["input_ids"].shape[1] + tiny_spec().num_patches
        assert torch.equal(emissions(model, patches_only), emissions(model, batch))


def test_joint_key_mask():
    attention_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    visual_mask = torch.tensor([[True, False], [False, False]])
    assert joint_key_mask(attention_mask, visual_mask).tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]


def test_a_post_sees_only_its_own_unpadded_tokens():
    model = ifaformer().eval()
    posts = make_posts(3, seed=4)
    batch = make_batch(posts)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1], "post 0 must be padded"
    batch["region_mask"][0, -2:] = False  # post 0 detected two regions fewer than K: padding regions
    with torch.no_grad():
        reference = emissions(model, batch)
        # Padding regions of post 0 (region_mask False) get garbage: nothing moves.
        changed = dict(batch, region_feats=batch["region_feats"].clone())
        changed["region_feats"][0, ~batch["region_mask"][0]] = 1e3
        assert torch.equal(emissions(model, changed), reference)
        # Padded sub-words of post 0 (attention_mask 0) get other ids: nothing moves for post 0.
        changed = dict(batch, input_ids=batch["input_ids"].clone())
        changed["input_ids"][0, batch["attention_mask"][0] == 0] = 2000
        assert torch.equal(emissions(model, changed)[0], reference[0])
        # Another post's image changes: post 0 does not move; the changed post does.
        changed = dict(batch, patch_tokens=batch["patch_tokens"].clone())
        changed["patch_tokens"][1] += 5.0
        moved = emissions(model, changed)
        assert torch.equal(moved[0], reference[0]) and not torch.equal(moved[1], reference[1])


def test_loss_falls_on_a_tiny_fixed_batch_and_a_seed_repeats():
    batch = make_batch(make_posts(4, seed=0), statuses={"img2": "missing"})
    runs = []
    for _ in range(2):
        model = ifaformer(seed=0).train()
        optimizer = torch.optim.AdamW(
            model.param_groups(TrainConfig(lr_encoder=1e-3, lr_fusion=1e-3, lr_crf=1e-2))
        )
        torch.manual_seed(0)
        losses = []
        for _ in range(15):
            optimizer.zero_grad()
            loss = model(batch)["loss"]
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs.append((losses, model.state_dict()))
    (losses, state), (again, state_again) = runs
    assert losses[-1] < 0.5 * losses[0]
    assert losses == again
    assert all(torch.equal(state[name], state_again[name]) for name in state)


def test_visual_segment_and_positions_are_learned_and_not_decayed():
    model = ifaformer()
    assert isinstance(model.fusion, SingleStreamFusion)
    assert model.fusion.embeddings["position"].weight.shape == (256, 32)
    assert model.fusion.embeddings["segment"].weight.shape == (1, 32)
    groups = {g["name"]: g for g in model.param_groups(TrainConfig())}
    no_decay = {id(p) for p in groups["fusion_no_decay"]["params"]}
    assert {id(p) for p in model.fusion.parameters()} <= no_decay


def test_more_visual_tokens_than_positions():
    model = ifaformer(visual_positions=4).eval()
    batch = make_batch(make_posts(2))
    message = "the cache gives 9 visual tokens per post but model.visual_positions = 4; set model.visual_positions >= 9"
    with pytest.raises(ValueError, match=re.escape(message)):
        model.decode(batch)


def test_visual_positions_must_be_positive():
    with pytest.raises(ValueError, match=re.escape("model.visual_positions must be >= 1, got 0")):
        ModelConfig(visual_positions=0)


def test_an_encoder_without_the_bert_split_is_refused():
    model = ifaformer().eval()
    batch = make_batch(make_posts(2))
    words = model.encode_text(batch)
    visual, visual_mask = model.encode_visual(batch)
    message = (
        "model.fusion = 'single_stream' runs the text encoder's embeddings and layers apart, which a "
        "Linear does not expose (.embeddings, .encoder); use a BERT or RoBERTa-family encoder"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        model.fusion.encode(torch.nn.Linear(2, 2), batch, words, visual, visual_mask)


def test_the_fusion_is_not_called_as_a_late_fusion():
    fusion = SingleStreamFusion(ModelConfig(**IFAFORMER), 32)
    with pytest.raises(TypeError, match="single_stream fusion runs inside the text encoder"):
        fusion(torch.zeros(1, 2, 32))


def test_the_model_file_is_a_commented_diff_over_the_base():
    assert describe_model("ifaformer-single")[0].startswith("002 IFAformer, single-stream form")
    model, train = load_run_config(model="ifaformer-single")
    assert model.name == "ifaformer-single"
    assert (model.fusion, model.adaptive_gate, model.alignment_loss_weight, model.image_dropout) == (
        "single_stream",
        False,
        0.0,
        0.0,
    )
    assert (model.max_length, train.lr_encoder, train.lr_crf, train.warmup_ratio) == (40, 5e-5, 5e-2, 0.06)
    assert (train.batch_size, train.epochs) == (32, 30)


def test_train_from_cache_with_set_fusion_single_stream(tmp_path):
    data_dir, posts = make_data(tmp_path)
    cache_dir = make_cache(tmp_path, posts, statuses={"tr1": "missing"})
    out = tmp_path / "run"
    args = ["train-from-cache", "--cache", cache_dir, "--data-dir", data_dir, "--text-encoder", "tiny-bert"]
    args += ["--epochs", "1", "--out", out, "--set", "model.fusion=single_stream"]
    args += [
        "--set",
        "model.adaptive_gate=false",
        "--set",
        "model.qfnet_heads=2",
        "--set",
        "train.batch_size=4",
    ]
    args += [item for key, value in FAST_LR.items() for item in ("--set", f"train.{key}={value}")]
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["model"]["fusion"] == "single_stream" and recorded["model"]["visual_positions"] == 256
    result = CliRunner().invoke(main, ["evaluate", str(out), "--split", "test"])
    assert result.exit_code == 0, result.output
