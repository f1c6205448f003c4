"""Configs in and out: YAML files, ``--set section.key=value`` overrides, the CLI arguments.

    cfg = load_config("examples/configs/tiny_cpu.yaml", ["train.global_batch_size=8"])
    save_config(cfg, "run/config.yaml")

Any key may be overridden on the command line with ``--set section.key=value`` (the value is
parsed as YAML, so ``--set optim.lr=3e-7`` gives a float and ``--set parallel.vpp=null`` gives
None). Unknown sections and keys and wrong types are refused naming the key (and the override or
the file and line that set it); the values' rules are the config tree's
(``selm_mcore.config.schema``).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from selm_mcore.config.schema import ConfigError, SelmConfig


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a field annotation (int -> float allowed), naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r} must be a list")
        (item,) = typing.get_args(annotation)
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads "5e-7" (no dot) as a string
        except ValueError:
            pass
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(
            f"{key}={value!r} must be of type {annotation.__name__}, got {type(value).__name__}"
        )
    return value


def from_dict(raw: dict[str, Any], source: str = "<dict>") -> SelmConfig:
    """Build a validated SelmConfig from nested dicts, refusing unknown sections and keys."""
    cfg = SelmConfig()
    hints = typing.get_type_hints(SelmConfig)
    if not isinstance(raw or {}, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections "
            f"({', '.join(hints)}), got {type(raw).__name__}"
        )
    for section_name, section_values in (raw or {}).items():
        if section_name not in hints:
            raise ConfigError(
                f"{source}: unknown section {section_name!r}; known: {', '.join(hints)}"
            )
        if section_values is None:  # an empty section in YAML (`data:` and nothing under it)
            continue
        if not isinstance(section_values, dict):
            raise ConfigError(f"{source}: section {section_name!r} must be a mapping")
        section = getattr(cfg, section_name)
        field_types = typing.get_type_hints(type(section))
        for key, value in section_values.items():
            if key not in field_types:
                raise ConfigError(
                    f"{source}: unknown key {section_name}.{key}; known: {', '.join(field_types)}"
                )
            setattr(section, key, _coerce(f"{section_name}.{key}", value, field_types[key]))
    try:
        return cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a raw config dict."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=3e-7")
        dotted, text = item.split("=", 1)
        section, key = dotted.split(".", 1)
        field_type = _override_field_type(item, section, key)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc})") from None
        if not isinstance(value, str) and field_type is str:
            value = text  # a string field takes the text as typed (a path like 2024, "001")
        try:
            value = _coerce(dotted, value, field_type)
        except ConfigError as exc:
            raise ConfigError(f"--set {item}: {exc}") from None
        if raw.get(section) is None:
            raw[section] = {}
        elif not isinstance(raw[section], dict):
            raise ConfigError(f"--set {item!r}: section {section!r} is not a mapping in the file")
        raw[section][key] = value
    return raw


def _override_field_type(item: str, section: str, key: str) -> Any:
    """The annotation of ``section.key``; an unknown one blames the override, not the file."""
    sections = typing.get_type_hints(SelmConfig)
    if section not in sections:
        raise ConfigError(
            f"--set {item}: unknown section {section!r}; known: {', '.join(sections)}"
        )
    fields = typing.get_type_hints(sections[section])
    if key not in fields:
        raise ConfigError(
            f"--set {item}: unknown key {section}.{key}; known: "
            f"{', '.join(f'{section}.{name}' for name in fields)}"
        )
    return fields[key]


def _read_yaml(path: Path) -> Any:
    """The YAML document of ``path``; a syntax error names the file, line and column."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path} line {mark.line + 1} column {mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        detail = f"{context}, {problem}" if context else problem
        start = getattr(exc, "context_mark", None)
        if start is not None and mark is not None and start.line != mark.line:
            detail += f" (what it was parsing began at line {start.line + 1})"
        raise ConfigError(
            f"{where}: YAML syntax error: {detail}. Fix the YAML there (check "
            "indentation, a missing ':' or an unclosed quote/bracket)"
        ) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> SelmConfig:
    """Read a YAML config (or defaults when path is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = _read_yaml(path) or {}
        source = str(path)
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}"
            )
    return from_dict(apply_overrides(raw, overrides or []), source)


def save_config(cfg: SelmConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from selm_mcore.runtime.files import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def add_config_arguments(
    parser, *, config_file: Literal["required", "optional", "none"] = "required"
) -> None:
    """The config arguments of a subcommand: CONFIG and repeated ``--set`` overrides.

    ``config_file``: "required" (a positional CONFIG), "optional" (CONFIG may be left out:
    defaults + ``--set``) or "none" (only ``--set``: the command names its config by option).
    """
    if config_file == "required":
        parser.add_argument("config", help="YAML config file (see examples/configs/)")
    elif config_file == "optional":
        parser.add_argument(
            "config",
            nargs="?",
            default=None,
            help="YAML config file (optional: defaults + --set overrides)",
        )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable)",
    )


def config_from_args(args) -> SelmConfig:
    return load_config(args.config, args.overrides)
