"""The wheel setup.cfg builds: every config TOML inside it, and a venv holding only it runs the CLI.

The config folders are data, not code: setuptools ships them only because setup.cfg lists each as a
package with its *.toml as package data. A build that dropped them would still import, and break only
at `--model mango` or `--dataset twitter2015` on a user's machine, so the wheel itself is opened here.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a source tree holds besides the sources: nothing of it may reach the build.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
    "demo_out", "runs",
)  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the checkout (the build writes build/ and egg-info beside it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCES, symlinks=True)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    assert "would be ignored" not in built.stdout + built.stderr, built.stdout + built.stderr
    (found,) = tmp.glob("mner_cache-*.whl")
    return found


def shipped_configs() -> list[str]:
    """Where each TOML under configs/ must sit inside the wheel: mner/configs/<its path>."""
    files = sorted((REPO / "configs").rglob("*.toml"))
    assert len(files) > 10  # the datasets, models, experiments, train and classify folders
    return [f"mner/configs/{f.relative_to(REPO / 'configs').as_posix()}" for f in files]


@pytest.mark.slow
def test_the_wheel_holds_every_config_toml(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in shipped_configs() if name not in names]
    assert missing == []


@pytest.mark.slow
def test_a_venv_with_only_the_wheel_runs_the_cli_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The wheel's dependencies (torch, transformers, ...) come from this interpreter's site-packages as a
    # plain path entry: its .pth files (this checkout's editable install among them) are not processed.
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())  # fmt: skip
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n", encoding="utf-8")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True, capture_output=True,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    where = tmp_path / "elsewhere"
    where.mkdir()

    def mner(*args: str) -> str:
        done = subprocess.run(
            [venv / "bin" / "mner", *args], cwd=where, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    located = subprocess.check_output([python, "-c", "import mner.configs; print(mner.configs.CONFIG_DIR)"],
                                      cwd=where, env=env, text=True).strip()  # fmt: skip
    assert Path(located) == site / "mner" / "configs"
    models = mner("models")
    for toml in (REPO / "configs" / "models").glob("*.toml"):
        assert toml.stem in models
    experiments = mner("ablate", "--list")
    for toml in (REPO / "configs" / "experiments").glob("*.toml"):
        if toml.stem != "demo":
            assert toml.stem in experiments
