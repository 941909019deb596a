"""detect.yaml: every key documented, precedence defaults < file < overrides, clear rejections."""

from __future__ import annotations

import dataclasses
import re

import pytest
from typer.testing import CliRunner

from kneepipe.cli import app
from kneepipe.cli_common import EXIT_CONFIG
from kneepipe.config import ConfigError, defaults_path, load_config
from kneepipe.detect.config import DetectConfig


def test_every_key_of_detect_yaml_is_a_field_and_commented():
    lines = [line for line in defaults_path(DetectConfig).read_text().splitlines() if re.match(r"^[a-z_]+:", line)]
    keys = {line.split(":")[0] for line in lines}
    assert keys == {f.name for f in dataclasses.fields(DetectConfig)}
    assert all(re.search(r"#\s*\(\w", line) for line in lines), "each key needs '# (type) ...'"


def test_precedence_defaults_then_file_then_overrides(tmp_path):
    defaults = load_config(DetectConfig)
    user_file = tmp_path / "mine.yaml"
    user_file.write_text("conf: 0.4\nimgsz: 416\n")
    from_file = load_config(DetectConfig, user_file)
    assert (from_file.conf, from_file.imgsz, from_file.iou) == (0.4, 416, defaults.iou)
    both = load_config(DetectConfig, user_file, ["conf=0.6"])
    assert (both.conf, both.imgsz) == (0.6, 416)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("confidance=0.3", "unknown key 'confidance' in command line for stage 'detect'"),
        ("conf=1.5", "conf: 1.5 is out of range"),
        ("imgsz=300", "multiples of 32"),
        ("max_det=many", "max_det: expected int"),
        ("close_mosaic=99", "close_mosaic: 99 exceeds train_epochs"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DetectConfig, overrides=[override])


def test_cli_rejects_a_bad_config_with_exit_code_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("iou: 2.0\n")
    result = CliRunner().invoke(app, ["detect", str(tmp_path), "--out", str(tmp_path / "out"), "-c", str(bad)])
    assert result.exit_code == EXIT_CONFIG
    assert "iou" in result.output
    assert not (tmp_path / "out").exists()
