"""Stage-two configs: base.toml, experiment diffs, --set overrides, validation messages."""

import dataclasses
import re

import pytest

from mner import configs
from mner.cache.datasets import DataConfig
from mner.train.engine.config import ModelConfig, RunConfig, TrainConfig
from mner.train.engine.config_files import base_config_path, load_run_config


def write(tmp_path, text: str, name: str = "diff.toml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_base_toml_restates_every_default():
    data = configs.load_toml(base_config_path())
    assert ModelConfig.from_dict(data["model"]) == ModelConfig()
    assert TrainConfig.from_dict(data["train"]) == TrainConfig()
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        assert list(data[section]) == [f.name for f in dataclasses.fields(cls)]


def test_base_toml_has_a_comment_above_every_key():
    lines = base_config_path().read_text(encoding="utf-8").splitlines()
    keys = [i for i, line in enumerate(lines) if re.match(r"^\w+ = ", line)]
    assert len(keys) == len(dataclasses.fields(ModelConfig)) + len(dataclasses.fields(TrainConfig))
    for i in keys:
        assert lines[i - 1].startswith("#"), lines[i]


def test_diff_file_changes_only_its_keys(tmp_path):
    diff = write(
        tmp_path, "[model]\nqfnet_layers = 1\nfusion = 'gated'\nadaptive_gate = false\n[train]\nepochs = 3\n"
    )
    model, train = load_run_config(config_file=diff)
    base_model, base_train = load_run_config()
    assert model == dataclasses.replace(base_model, qfnet_layers=1, fusion="gated", adaptive_gate=False)
    assert train == dataclasses.replace(base_train, epochs=3)


@pytest.mark.parametrize("name", sorted(p.stem for p in configs.path("experiments").glob("*.toml")))
def test_shipped_experiments_load(name):
    """Each changes the base of some model of the zoo (no_slot_type: afner's)."""
    from mner.train.engine.config import model_names

    path = configs.path("experiments", f"{name}.toml")

    def changes(model: str) -> bool:
        try:
            return load_run_config(config_file=path, model=model) != load_run_config(model=model)
        except ValueError:  # a switch another model lacks (no_resampler without the mango fusion)
            return False

    assert any(changes(m) for m in model_names())


def test_overrides_parse_toml_literals_and_bare_strings(tmp_path):
    diff = write(tmp_path, "[model]\nqfnet_layers = 3\n")
    model, train = load_run_config(
        config_file=diff,
        overrides=[
            "model.qfnet_layers=1",  # later than the file: wins
            "model.adaptive_gate=false",
            "model.alignment_loss_weight=1",  # an integer is a fine float
            "model.text_encoder=/models/bert-base",  # bare string
            "train.device='cuda:1'",
            "train.lr_crf = 1e-2",
        ],
    )
    assert (model.qfnet_layers, model.adaptive_gate, model.text_encoder) == (1, False, "/models/bert-base")
    assert model.alignment_loss_weight == 1.0 and isinstance(model.alignment_loss_weight, float)
    assert (train.device, train.lr_crf) == ("cuda:1", 0.01)


def test_unknown_section_and_key_name_the_file(tmp_path):
    diff = write(tmp_path, "[modle]\nqfnet_layers = 1\n")
    with pytest.raises(
        ValueError, match=re.escape(f"{diff}: unknown section [modle]; expected [model], [train]")
    ):
        load_run_config(config_file=diff)
    diff = write(tmp_path, "[model]\nqfnet_layer = 1\n")
    with pytest.raises(ValueError, match=re.escape(f"{diff}: unknown key model.qfnet_layer; known keys: ")):
        load_run_config(config_file=diff)
    diff = write(tmp_path, "fusion = 'qgf'\n")
    with pytest.raises(
        ValueError, match=re.escape(f"{diff}: key 'fusion' is outside a table; put it under [model]")
    ):
        load_run_config(config_file=diff)
    base = write(tmp_path, "[train]\nnope = 1\n", name="base.toml")
    with pytest.raises(ValueError, match=re.escape(f"{base}: unknown key train.nope")):
        load_run_config(base_toml=base)


def test_unknown_override_key_names_the_override():
    with pytest.raises(ValueError, match=re.escape("--set model.nope=1: unknown key model.nope")):
        load_run_config(overrides=["model.nope=1"])
    with pytest.raises(ValueError, match=re.escape("--set data.x=1: unknown section [data]")):
        load_run_config(overrides=["data.x=1"])


@pytest.mark.parametrize("text", ["model.qfnet_layers", "qfnet_layers=1", "=1", "model.=1"])
def test_malformed_override(text):
    with pytest.raises(ValueError, match=re.escape(f"--set {text}: expected section.key=value")):
        load_run_config(overrides=[text])


def test_missing_config_file(tmp_path):
    with pytest.raises(ValueError, match="config file not found"):
        load_run_config(config_file=tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.qfnet_layers=two", "model.qfnet_layers must be an integer, got 'two'"),
        ("model.qfnet_layers=true", "model.qfnet_layers must be an integer, got True"),
        ("model.qfnet_layers=1.5", "model.qfnet_layers must be an integer, got 1.5"),
        ("model.adaptive_gate=1", "model.adaptive_gate must be true or false, got 1"),
        ("model.dropout=high", "model.dropout must be a number, got 'high'"),
        ("model.text_encoder=3", "model.text_encoder must be a string, got 3"),
        (
            "model.text_encoder=''",
            "model.text_encoder must name a preset (minilm, tiny-bert) or a folder, got ''",
        ),
        (
            "model.fusion=mlp",
            "model.fusion must be one of qgf, concat, gated, mango, single_stream, two_tower; got 'mlp'",
        ),
        (
            "model.fusion=adaptive",
            "model.fusion must be one of qgf, concat, gated, mango, single_stream, two_tower; got 'adaptive'",
        ),
        (
            "model.fusion=gated",
            "model.adaptive_gate = true gates query-guided fusion only, but model.fusion is 'gated'; "
            "set model.adaptive_gate = false",
        ),
        ("model.head=svm", "model.head must be one of crf, softmax; got 'svm'"),
        ("model.task=parsing", "model.task must be one of tagging, classification; got 'parsing'"),
        ("model.qfnet_layers=0", "model.qfnet_layers must be >= 1, got 0"),
        ("model.qfnet_heads=0", "model.qfnet_heads must be >= 1, got 0"),
        ("model.slots_per_type=0", "model.slots_per_type must be >= 1, got 0"),
        ("model.alignment_loss_weight=-0.1", "model.alignment_loss_weight must be >= 0, got -0.1"),
        ("model.alignment_temperature=0", "model.alignment_temperature must be > 0, got 0.0"),
        ("model.image_dropout=1.0", "model.image_dropout must be in [0, 1), got 1.0"),
        ("model.dropout=-0.1", "model.dropout must be in [0, 1), got -0.1"),
        ("model.max_length=2", "model.max_length must be >= 3, got 2"),
        ("train.epochs=0", "train.epochs must be >= 1, got 0"),
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("train.patience=0", "train.patience must be >= 1, got 0"),
        ("train.lr_encoder=0", "train.lr_encoder must be > 0, got 0.0"),
        ("train.lr_fusion=-1e-4", "train.lr_fusion must be > 0, got -0.0001"),
        ("train.lr_crf=0", "train.lr_crf must be > 0, got 0.0"),
        ("train.max_grad_norm=0", "train.max_grad_norm must be > 0, got 0.0"),
        ("train.weight_decay=-1", "train.weight_decay must be >= 0, got -1.0"),
        ("train.warmup_ratio=1", "train.warmup_ratio must be in [0, 1), got 1.0"),
        ("train.seed=-1", "train.seed must be >= 0, got -1"),
        ("train.num_workers=-1", "train.num_workers must be >= 0, got -1"),
        ("train.device=gpu", "train.device must be auto, cpu, mps, cuda or cuda:N; got 'gpu'"),
        ("train.amp=fp8", "train.amp must be one of auto, off, fp16, bf16; got 'fp8'"),
    ],
)
def test_invalid_values(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_run_config(overrides=[override])


@pytest.mark.parametrize("literal", ["nan", "inf", "-inf", "+inf", "-nan"])
@pytest.mark.parametrize(
    "key",
    [f"train.{f.name}" for f in dataclasses.fields(TrainConfig) if f.type == "float"]
    + [f"model.{f.name}" for f in dataclasses.fields(ModelConfig) if f.type == "float"],
)
def test_non_finite_numbers_are_refused_at_parse_time(key, literal, tmp_path):
    """Every float setting, from --set and from a TOML file: NaN and infinities never reach a run."""
    message = f"{key} must be a finite number, got {float(literal)}"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_run_config(overrides=[f"{key}={literal}"])
    section, name = key.split(".")
    diff = tmp_path / "diff.toml"
    diff.write_text(f"[{section}]\n{name} = {literal}\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_run_config(config_file=diff)


def test_no_visual_tokens_without_text_only():
    message = "model.use_patches and model.use_regions are both false"
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(use_patches=False, use_regions=False)
    assert ModelConfig(use_patches=False, use_regions=False, text_only=True).text_only


DATA = DataConfig(data_dir="/d")


def test_dict_round_trips(tmp_path):
    model = ModelConfig(fusion="concat", adaptive_gate=False, qfnet_layers=1)
    train = TrainConfig(epochs=2, device="cpu")
    assert ModelConfig.from_dict(model.to_dict()) == model
    assert TrainConfig.from_dict(train.to_dict()) == train
    run = RunConfig(
        model, train, cache_dir="/c", data=DataConfig(data_dir="/d"), out_dir=str(tmp_path), resume=True
    )
    assert RunConfig.from_dict(run.to_dict()) == run
    assert ModelConfig.from_dict({"qfnet_layers": 3}) == ModelConfig(qfnet_layers=3)


def test_from_dict_errors(tmp_path):
    with pytest.raises(ValueError, match=re.escape("run/config.json: unknown key model.heads; known keys:")):
        ModelConfig.from_dict({"heads": 2}, source="run/config.json")
    data = RunConfig(ModelConfig(), TrainConfig(), "/c", DATA, "out").to_dict()
    with pytest.raises(ValueError, match=re.escape("x.json: unknown run config keys ['extra']")):
        RunConfig.from_dict({**data, "extra": 1}, source="x.json")
    del data["out_dir"]
    with pytest.raises(ValueError, match=re.escape("x.json: run config is missing ['out_dir']")):
        RunConfig.from_dict(data, source="x.json")


def test_run_config_errors():
    with pytest.raises(ValueError, match=re.escape("cache_dir is required unless model.text_only is true")):
        RunConfig(ModelConfig(), TrainConfig(), None, DATA, "out")
    assert RunConfig(ModelConfig(text_only=True), TrainConfig(), None, DATA, "out").cache_dir is None
    with pytest.raises(ValueError, match=re.escape("out_dir must name the run folder, got ''")):
        RunConfig(ModelConfig(), TrainConfig(), "/c", DATA, "")


def test_a_record_is_read_as_it_is_written():
    """No name is upgraded: a fusion the registry does not hold is refused, whatever wrote the record."""
    record = {**ModelConfig().to_dict(), "fusion": "adaptive"}
    with pytest.raises(
        ValueError,
        match=re.escape("model.fusion must be one of qgf, concat, gated, mango, single_stream, two_tower"),
    ):
        ModelConfig.from_dict(record)
        RunConfig(ModelConfig(), TrainConfig(), "/c", DATA, "")


def test_a_run_recorded_before_data_config_still_reads():
    """Old config.json files hold only the data keys that were given; the missing ones are None."""
    old = RunConfig(ModelConfig(), TrainConfig(), "/c", DATA, "out").to_dict()
    old["data"] = {"data_dir": "/d"}
    run = RunConfig.from_dict(old, source="config.json")
    assert run.data == DataConfig(data_dir="/d")
    assert run.to_dict()["data"] == {
        "data_dir": "/d", "dataset": None, "data_root": None, "image_dir": None, "columns": None
    }  # fmt: skip
    with pytest.raises(ValueError, match=re.escape("data must be a DataConfig, got {'data_dir': '/d'}")):
        RunConfig(ModelConfig(), TrainConfig(), "/c", {"data_dir": "/d"}, "out")


# --------------------------------------------------------------------------------------- the model zoo


def model_dir(tmp_path, monkeypatch, files: dict[str, str]):
    """A config folder whose models/ holds `files` (name -> text); the other configs are the shipped ones."""
    import shutil

    root = tmp_path / "configs"
    shutil.copytree(configs.CONFIG_DIR, root, ignore=shutil.ignore_patterns("models", "__pycache__"))
    (root / "models").mkdir()
    for name, text in files.items():
        (root / "models" / f"{name}.toml").write_text(text, encoding="utf-8")
    monkeypatch.setattr(configs, "CONFIG_DIR", root)
    return root


ZOO = {
    "afdvqf": "# seed: 001 AFDVQF\n# adds: the base\n",
    "small": "# seed: 000 X\n# adds: one layer\n[model]\nqfnet_layers = 1\nslots_per_type = 3\n[train]\nepochs = 2\n",
}


def test_layers_apply_base_then_model_then_experiment_then_set(tmp_path, monkeypatch):
    model_dir(tmp_path, monkeypatch, ZOO)
    diff = write(tmp_path, "[model]\nslots_per_type = 5\nalignment_loss_weight = 0.0\n")
    model, train = load_run_config(model="small")
    assert model == dataclasses.replace(ModelConfig(), name="small", qfnet_layers=1, slots_per_type=3)
    assert train == dataclasses.replace(TrainConfig(), epochs=2)
    model, _ = load_run_config(model="small", config_file=diff, overrides=["model.alignment_loss_weight=0.5"])
    assert (model.qfnet_layers, model.slots_per_type, model.alignment_loss_weight) == (1, 5, 0.5)
    # Several experiment files apply in order.
    second = write(tmp_path, "[model]\nslots_per_type = 6\n", "second.toml")
    assert load_run_config(model="small", config_file=[diff, second])[0].slots_per_type == 6


def test_model_name_in_a_file_or_an_override_selects_the_model_file(tmp_path, monkeypatch):
    model_dir(tmp_path, monkeypatch, ZOO)
    diff = write(tmp_path, "[model]\nname = 'small'\nslots_per_type = 5\n")
    model, train = load_run_config(config_file=diff)
    assert (model.name, model.qfnet_layers, model.slots_per_type, train.epochs) == ("small", 1, 5, 2)
    model, _ = load_run_config(overrides=["model.name=small"])
    assert (model.name, model.qfnet_layers) == ("small", 1)
    # The later layer wins over --model.
    model, _ = load_run_config(model="small", overrides=["model.name=afdvqf"])
    assert (model.name, model.qfnet_layers) == ("afdvqf", 2)
    assert load_run_config() == (ModelConfig(), TrainConfig())


def test_a_model_file_naming_another_model_is_refused(tmp_path, monkeypatch):
    root = model_dir(
        tmp_path, monkeypatch, {**ZOO, "other": "# seed: s\n# adds: a\n[model]\nname = 'small'\n"}
    )
    message = f"{root / 'models' / 'other.toml'}: model.name is 'small', but this file is the model 'other'; drop the key"
    with pytest.raises(ValueError, match=re.escape(message)):
        load_run_config(model="other")


def test_unknown_model_lists_the_models():
    from mner.train.engine.config import model_names

    names = ", ".join(model_names())
    with pytest.raises(ValueError, match=re.escape(f"model.name must be one of {names}; got 'nope'")):
        load_run_config(model="nope")
    with pytest.raises(ValueError, match=re.escape(f"model.name must be one of {names}; got 'nope'")):
        load_run_config(overrides=["model.name=nope"])
    with pytest.raises(ValueError, match=re.escape(f"model.name must be one of {names}; got 'nope'")):
        ModelConfig(name="nope")


def test_every_model_file_describes_itself_and_loads():
    from mner.train.engine.config import model_names
    from mner.train.engine.config_files import describe_model, model_file

    assert "afdvqf" in model_names()
    for name in model_names():
        seed, adds = describe_model(name)
        assert seed and adds, name
        model, _ = load_run_config(model=name)
        assert model.name == name
        table = configs.load_toml(model_file(name))
        assert set(table) <= {"model", "train"}, name
    # The base's architecture is AFDVQF's; its original's training values are in its model file.
    model, _ = load_run_config(model="afdvqf")
    assert (model.fusion, model.adaptive_fusion, model.alignment_loss_weight) == ("qgf", "weights", 0.1)
    assert model == dataclasses.replace(ModelConfig(), **configs.load_toml(model_file("afdvqf"))["model"])


def test_text_only_drops_the_vision_blocks_a_model_file_trains_and_refuses_them_set_after_it():
    """MANGO's file trains its last 2 CLIP blocks; --text-only (and the text_only ablation arm) reads no
    image, so the file's value gives way to 0. Set after the file, the blocks and text_only conflict."""
    from mner.train.report.ablation_config import experiment_file

    assert load_run_config(model="mango")[0].vision_trainable_blocks == 2
    for changes in ({"overrides": ["model.text_only=true"]}, {"config_file": experiment_file("text_only")}):
        model, _ = load_run_config(model="mango", **changes)
        assert (model.text_only, model.vision_trainable_blocks, model.fusion) == (True, 0, "mango"), changes
    with pytest.raises(
        ValueError,
        match=re.escape(
            "model.vision_trainable_blocks = 1 trains vision blocks, but model.text_only = true reads no "
            "image; set model.vision_trainable_blocks = 0"
        ),
    ):
        load_run_config(model="mango", overrides=["model.text_only=true", "model.vision_trainable_blocks=1"])


def test_describe_model_strips_labels_and_needs_two_comment_lines(tmp_path, monkeypatch):
    from mner.train.engine.config_files import describe_model

    root = model_dir(
        tmp_path,
        monkeypatch,
        {**ZOO, "bare": "# MANGO (seed 003)\n# gated fusion\n", "short": "# only one\n"},
    )
    assert describe_model("small") == ("000 X", "one layer")
    assert describe_model("bare") == ("MANGO (seed 003)", "gated fusion")
    message = f"{root / 'models' / 'short.toml'}: the first two comment lines must say the seed"
    with pytest.raises(ValueError, match=re.escape(message)):
        describe_model("short")


def test_text_frozen_layers_are_refused_for_ifaformer_and_below_zero():
    with pytest.raises(ValueError, match=re.escape("model.text_frozen_layers must be >= 0, got -1")):
        ModelConfig(text_frozen_layers=-1)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "model.text_frozen_layers = 2 freezes text encoder layers whose output is computed once from the "
            "text, but model.fusion = 'single_stream' (IFAformer) feeds the image into every encoder layer; "
            "set model.text_frozen_layers = 0"
        ),
    ):
        ModelConfig(fusion="single_stream", adaptive_gate=False, text_frozen_layers=2)


def test_query_and_alignment_settings_are_checked():
    cases = {
        "model.typed_queries = false changes the query slots of model.fusion = 'qgf', but model.fusion is "
        "'gated'; leave it at true": dict(fusion="gated", adaptive_gate=False, typed_queries=False),
        "model.alignment_pooling must be one of 'cls', 'mean', got 'max'": dict(alignment_pooling="max"),
    }
    for message, changes in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            ModelConfig(**changes)
