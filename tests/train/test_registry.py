"""The registries: names match what they build, errors name the key, no torch to validate a config."""

import re
import subprocess
import sys

import pytest

from mner.train.registry import AUX_LOSSES, FUSIONS, HEADS, TASKS, Registry

ALL = {"fusion": FUSIONS, "head": HEADS, "aux loss": AUX_LOSSES, "task": TASKS}


@pytest.mark.parametrize("kind", ALL.keys())
def test_every_entry_resolves_to_what_its_registry_builds(kind):
    """Fusions, heads and auxiliary losses are module classes the model instantiates; a task is an
    object naming its heads and reading a split's labels."""
    import torch

    registry = ALL[kind]
    for name in registry.names:
        entry = registry.get(name)
        if kind == "task":
            assert isinstance(entry.heads, tuple | list) and callable(entry.label_names), name
        else:
            assert isinstance(entry, type) and issubclass(entry, torch.nn.Module), name


def test_unknown_name_names_the_key_and_the_choices():
    registry = Registry("model.thing", {"a": "mner.train.tasks:TOKEN_TAGGING", "b": "x:y"})
    with pytest.raises(ValueError, match=re.escape("model.thing must be one of a, b; got 'c'")):
        registry.get("c")


def test_every_task_names_heads_that_build():
    """Tagging's heads are HEADS entries; the classifier's are the names ClassifierHead builds."""
    from mner.train.classifier_model import ClassifierHead

    assert set(TASKS.get("tagging").heads) <= set(HEADS.names)
    for head in TASKS.get("classification").heads:
        built = ClassifierHead(head, "both", 8, 8, 3, 8, 0.0, 2)
        assert sum(p.numel() for p in built.parameters()) > 0, head
    with pytest.raises(ValueError):
        ClassifierHead("crf", "both", 8, 8, 3, 8, 0.0, 2)
    assert set(TASKS.names) == {"tagging", "classification"}


def test_validating_a_config_does_not_import_torch():
    code = "import sys; from mner.train.config import load_run_config; load_run_config(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_head_the_task_cannot_use_is_refused(monkeypatch):
    from mner.train import tasks
    from mner.train.config import ModelConfig

    monkeypatch.setattr(tasks, "TOKEN_TAGGING", tasks.TokenTagging(heads=("softmax",)))
    message = "model.head 'crf' does not fit model.task 'tagging'; its heads are softmax"
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig()
