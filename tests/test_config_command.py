"""`kneepipe config STAGE`: the resolved defaults of a stage, printed as a usable config file."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from kneepipe.cli import STAGES, app
from kneepipe.cli_common import EXIT_CONFIG
from kneepipe.config import load_config, to_dict
from kneepipe.detect.config import DetectConfig


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_prints_its_resolved_config_as_yaml(stage):
    result = CliRunner().invoke(app, ["config", stage])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed and all(line.count("  # ") == 1 for line in result.stdout.splitlines())


def test_overrides_are_resolved_and_their_defaults_named(tmp_path):
    own = tmp_path / "detect.yaml"
    own.write_text("conf: 0.2\n")
    result = CliRunner().invoke(app, ["config", "detect", "--config", str(own), "max_det=1"])
    assert result.exit_code == 0, result.output
    assert "max_det: 1  # (int) most joints kept per radiograph" in result.stdout
    assert "[default: 2]" in result.stdout and "conf: 0.2  #" in result.stdout
    again = tmp_path / "again.yaml"
    again.write_text(result.stdout)  # the printed config is a config file
    assert to_dict(load_config(DetectConfig, again)) == to_dict(load_config(DetectConfig, own, {"max_det": 1}))


def test_an_unknown_stage_or_key_is_refused():
    assert CliRunner().invoke(app, ["config", "train"]).exit_code == EXIT_CONFIG
    bad = CliRunner().invoke(app, ["config", "grade", "lr=fast"])
    assert bad.exit_code == EXIT_CONFIG and "lr" in bad.output


def test_an_error_naming_a_long_path_keeps_the_path_on_one_line(tmp_path):
    """Messages are not wrapped by the console: a path cut by a line break could not be copied or grepped."""
    missing = tmp_path / ("a-folder-name-long-enough-to-pass-any-terminal-width-" * 3) / "site.yaml"
    result = CliRunner().invoke(app, ["config", "grade", "--config", str(missing)])
    assert result.exit_code == EXIT_CONFIG
    assert f"error: cannot read config file {missing}:" in result.output.splitlines()[0], result.output
