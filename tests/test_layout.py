"""The design card's layout: top-level folders installed as subpackages of one `esam3` package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import esam3
from esam3 import pipeline, schemas, train, workers

ROOT = Path(__file__).resolve().parents[1]


def test_subpackages_map_to_top_level_folders() -> None:
    assert Path(esam3.__file__).parent == ROOT / "esam3"
    for module, folder in ((pipeline, "pipeline"), (schemas, "schemas"), (workers, "workers"), (train, "train")):
        assert Path(module.__file__).parent == ROOT / folder


def test_nothing_generic_is_importable(tmp_path: Path) -> None:
    """`import pipeline` must not work outside the repo: only `esam3.*` is installed."""
    for name in ("pipeline", "schemas", "workers", "train"):
        result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True)
        assert result.returncode != 0, f"top-level '{name}' is importable"
