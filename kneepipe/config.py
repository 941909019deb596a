"""Stage configuration: defaults < ``--config FILE`` < command-line overrides.

Every stage keeps one commented YAML of defaults in ``configs/<stage>.yaml`` and one
frozen dataclass that names its keys, their types and their allowed ranges. The YAML
holds the default *values*; the dataclass holds the *rules*. :func:`load_config` merges
the three sources in that order (right-most wins), rejects unknown keys and
out-of-range values with a message naming the key, and returns the dataclass.

>>> from kneepipe.detect.config import DetectConfig
>>> cfg = load_config(DetectConfig, overrides=["conf=0.4"])
>>> cfg.conf
0.4
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

C = TypeVar("C")


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type or lies out of range."""


def rule(
    *, range: tuple[float | None, float | None] | None = None, choices: Sequence[Any] | None = None, help: str = ""
) -> dict[str, Any]:
    """Field metadata for a config dataclass: an inclusive numeric range or a set of choices."""
    return {"range": range, "choices": tuple(choices) if choices is not None else None, "help": help}


def defaults_path(config_cls: Any) -> Path:
    """The shipped defaults file of a stage config class (its ``STAGE`` attribute)."""
    return CONFIG_DIR / f"{config_cls.STAGE}.yaml"


def parse_overrides(items: Sequence[str] | Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """Turn ``["key=value", ...]`` into a dict, parsing each value as YAML (``3`` -> int).

    ``prefix`` is how the command line named these keys (``detect.``); messages keep it.
    """
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {prefix + item!r} is not of the form {prefix}key=value")
        try:
            parsed[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as err:
            problem = str(err).splitlines()[0]
            raise ConfigError(f"{prefix}{key.strip()}: cannot parse the value {value!r} ({problem})") from None
    return parsed


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        content = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror or err}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value")
    return content


def _allowed_types(annotation: Any) -> tuple[type, ...]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(annotation) for t in _allowed_types(arg))
    if origin is not None:
        return (origin,)
    if annotation is type(None):
        return (type(None),)
    return (annotation,)


def _check_value(field: dataclasses.Field, annotation: Any, value: Any, source: str, prefix: str = "") -> Any:
    name = prefix + field.name
    allowed = _allowed_types(annotation)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tuple in allowed and isinstance(value, list):
        value = tuple(value)
    is_bool = isinstance(value, bool)
    ok = any(
        (t is bool and is_bool)
        or (t is not bool and not is_bool and isinstance(value, t))
        or (t is type(None) and value is None)
        for t in allowed
    )
    if not ok:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise ConfigError(f"{name}: expected {names}, got {value!r} (from {source})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name}: {value!r} is not a finite number (from {source})")
    if isinstance(value, tuple) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
        raise ConfigError(f"{name}: {list(value)!r} holds a value that is not a finite number (from {source})")
    meta = field.metadata
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{name}: {value!r} is not one of {list(meta['choices'])} (from {source})")
    if meta.get("range") and isinstance(value, int | float) and not is_bool:
        low, high = meta["range"]
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
            raise ConfigError(f"{name}: {value!r} is out of range {bounds} (from {source})")
    if meta.get("range") and isinstance(value, tuple):
        low, high = meta["range"]
        for item in value:
            if (low is not None and item < low) or (high is not None and item > high):
                raise ConfigError(f"{name}: {item!r} is out of range [{low}, {high}] (from {source})")
    return value


def load_config(
    config_cls: type[C],
    config_file: str | Path | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
    prefix: str = "",
) -> C:
    """Resolve a stage's configuration: shipped defaults < ``config_file`` < ``overrides``.

    Args:
        config_cls: the stage's frozen config dataclass (with a ``STAGE`` class attribute).
        config_file: an optional user YAML holding any subset of the stage's keys.
        overrides: ``["key=value", ...]`` from the command line, or a dict.
        prefix: how the command line names the stage's keys (``detect.``), for messages.

    Raises:
        ConfigError: naming the offending key, for unknown keys, wrong types or ranges.
    """
    stage: Any = config_cls  # a frozen dataclass with a STAGE name
    fields = {f.name: f for f in dataclasses.fields(stage)}
    hints = typing.get_type_hints(config_cls)
    layers = [(str(defaults_path(config_cls)), _read_yaml(defaults_path(config_cls)))]
    if config_file is not None:
        layers.append((str(config_file), _read_yaml(Path(config_file))))
    layers.append(("command line", parse_overrides(overrides, prefix=prefix)))

    merged: dict[str, Any] = {}
    for source, layer in layers:
        for key, value in layer.items():
            if key not in fields:
                hint = _closest(key, fields)
                raise ConfigError(
                    f"unknown key {prefix + str(key)!r} in {source} for stage '{stage.STAGE}'"
                    + (f"; did you mean {prefix + hint!r}?" if hint else "")
                )
            merged[key] = _check_value(fields[key], hints[key], value, source, prefix)
    missing = sorted(set(fields) - set(merged))
    if missing:
        raise ConfigError(f"keys without a value for stage '{stage.STAGE}': {', '.join(missing)}")
    config = config_cls(**merged)
    validate = getattr(config, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigError as err:
            raise ConfigError(f"{prefix}{err}" if prefix else str(err)) from None
    return config


def _closest(key: str, fields: Mapping[str, Any]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, list(fields), n=1)
    return matches[0] if matches else None


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML-safe dict of a config dataclass (tuples become lists, paths strings)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def describe_config(config: Any) -> str:
    """The resolved config as YAML, each key with the comment of its shipped default (``kneepipe config``).

    A key whose value differs from the shipped default says so, and what the default is.

    >>> from kneepipe.detect.config import DetectConfig
    >>> lines = describe_config(load_config(DetectConfig, overrides={"max_det": 1})).splitlines()
    >>> print(next(line for line in lines if line.startswith("max_det")))
    max_det: 1  # (int) most joints kept per radiograph (a film shows at most two knees) [default: 2]
    """

    def flow(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()

    defaults_file = defaults_path(type(config))
    comments = {}
    for line in defaults_file.read_text().splitlines():
        key, colon, rest = line.partition(":")
        if colon and not line.startswith((" ", "#")) and "#" in rest:
            comments[key.strip()] = rest.split("#", 1)[1].strip()
    defaults = _read_yaml(defaults_file)
    lines = []
    for key, value in to_dict(config).items():
        note = comments.get(key, "")
        if key in defaults and flow(defaults[key]) != flow(value):
            note = f"{note} [default: {flow(defaults[key])}]"
        lines.append(f"{key}: {flow(value)}  # {note}" if note else f"{key}: {flow(value)}")
    return "\n".join(lines) + "\n"


def save_config(config: Any, folder: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the resolved config (plus run facts such as inputs) as ``folder/args.yaml``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    content = to_dict(config)
    if extra:
        content.update({k: str(v) if isinstance(v, Path) else v for k, v in extra.items()})
    from kneepipe.files import write_atomic

    return write_atomic(folder / "args.yaml", yaml.safe_dump(content, sort_keys=False))
