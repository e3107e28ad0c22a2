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


def test_every_task_names_registered_heads():
    for name in TASKS.names:
        assert set(TASKS.get(name).heads) <= set(HEADS.names), name


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
