"""The package's layering: imports go one way, and grading never loads training code."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kneepipe"
# Each layer may import itself and the layers before it, never one after it.
LAYERS = [
    {"kneepipe", "kneepipe.joints", "kneepipe.files", "kneepipe.config", "kneepipe.runtime", "kneepipe.metrics"},
    {"kneepipe.imaging", "kneepipe.decoding"},
    {"kneepipe.detect", "kneepipe.grade", "kneepipe.audit"},
    {"kneepipe.pipeline"},
    {"kneepipe.training", "kneepipe.serve", "kneepipe.dicom"},
    {"kneepipe.cli", "kneepipe.cli_common"},
]
TRAINING_ONLY = ("albumentations",)


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _layer(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in layer if name != "kneepipe"):
            return index
    return 0


def _sources() -> list[Path]:
    return sorted(path for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts)


def test_imports_only_go_down_the_layers():
    upward = []
    for path in _sources():
        module = _module(path)
        if module.endswith("commands"):
            continue  # a stage's commands are the command line's layer, kept beside the stage
        for name in _imports(path):
            if name.startswith("kneepipe.") and not name.endswith(".commands") and _layer(name) > _layer(module):
                upward.append(f"{module} imports {name}")
    assert upward == []


def test_nothing_on_the_inference_path_imports_training_code():
    found = []
    for path in _sources():
        module = _module(path)
        if module.startswith("kneepipe.training") or module == "kneepipe.cli":
            continue
        for name in _imports(path):
            if name.startswith("kneepipe.training") or name.split(".")[0] in TRAINING_ONLY:
                found.append(f"{module} imports {name}")
    assert found == []


@pytest.mark.slow
def test_the_inference_commands_run_without_the_training_extra(tmp_path, oai_dir):
    """A base install (no albumentations) grades: the training-only packages are made unimportable."""
    folder = tmp_path / "crops"
    folder.mkdir()
    for crop in sorted((oai_dir / "val" / "3").glob("*.png"))[:2]:
        (folder / crop.name).write_bytes(crop.read_bytes())
    script = (
        "import sys\n"
        "for name in ('albumentations',):\n"
        "    sys.modules[name] = None  # as if not installed\n"
        "from kneepipe.cli import app\n"
        "sys.argv = ['kneepipe', 'grade', *sys.argv[1:]]\n"
        "app()\n"
    )
    command = [sys.executable, "-c", script, str(folder), "--out", str(tmp_path / "graded")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "albumentations" not in result.stderr
    assert (tmp_path / "graded" / "grades.csv").read_text().count("\n") == 3


def test_a_training_command_without_the_extra_says_what_to_install(tmp_path):
    script = (
        "import sys\n"
        "sys.modules['albumentations'] = None\n"
        "from kneepipe.training.augment import AugmentationRecipe, albumentations_pipeline\n"
        "albumentations_pipeline(AugmentationRecipe(*[0.0] * 11))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and 'pip install "kneepipe[train]"' in result.stderr
