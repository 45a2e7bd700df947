"""arcfold's own wheel, as `make wheelhouse` builds it for an offline Kaggle install: it ships every config file and
runs from any directory (the wheels of the dependencies need the internet and are not built here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # pip builds and installs the wheel, then python -m arcfold runs from it

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_every_config_and_composes_the_kaggle_experiment_from_anywhere(tmp_path):
    # Build from a copy: an in-tree build would leave build/ and egg-info beside the sources.
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        ROOT / "src", project / "src", symlinks=True, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "conf")
    )
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(dist),
            str(project),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = dist.glob("arcfold-*.whl")

    shipped = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"arcfold/conf/{p.relative_to(ROOT / 'conf')}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs and configs <= shipped, configs - shipped
    assert "arcfold/conf/experiment/kaggle.yaml" in shipped

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "arcfold", "--cfg", "job", "experiment=kaggle", "model.path=/m"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "challenges: /kaggle/input/arc-prize-2025/arc-agi_test_challenges.json" in done.stdout
    assert "kind: hf" in done.stdout and "outputs: /kaggle/working" in done.stdout
