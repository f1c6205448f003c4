"""Configs in and out: YAML files, ``--set section.key=value`` overrides, the CLI arguments.

    cfg = load_config("examples/configs/tiny_cpu.yaml", ["train.global_batch_size=8"])
    save_config(cfg, "run/config.yaml")

Any key may be overridden on the command line with ``--set section.key=value`` (the value is
parsed as YAML, so ``--set optim.lr=3e-7`` gives a float and ``--set parallel.vpp=null`` gives
None). Unknown sections and keys and wrong types are refused naming the key (and the override or
the file and line that set it); the values' rules are the config tree's
(``selm_mcore.config.schema``).

YAML aliases (``*name``) are bounded: a document (file or ``--set`` value) whose values, with
every alias expanded, number more than ``MAX_YAML_VALUES`` (a few hundred in a real config), or
that refers to itself, is refused before it is built (an "alias bomb" of a few hundred bytes
expands to billions of values). Messages show values through ``short_repr`` (bounded work).
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from selm_mcore.config.schema import ConfigError, SelmConfig
from selm_mcore.runtime.errors import clip_text, short_repr

# Values (scalars, lists, mappings) of one YAML document with every alias expanded.
MAX_YAML_VALUES = 100_000


def _expanded_size(root: yaml.Node, source: str) -> int:
    """Values under ``root`` with every alias expanded (each shared node counted once per use),
    without building them; stops past MAX_YAML_VALUES. A node that contains itself is refused."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_nodes: set[int] = set()
    while stack:
        node, children_done = stack.pop()
        if id(node) in sizes:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if children_done:
            open_nodes.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), MAX_YAML_VALUES + 1)
            continue
        if id(node) in open_nodes:
            raise ConfigError(f"{source}: a YAML alias refers to the value that contains it")
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in children:
            if id(child) in open_nodes:
                raise ConfigError(f"{source}: a YAML alias refers to the value that contains it")
            stack.append((child, False))
    return sizes[id(root)]


def safe_load_bounded(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` after checking that its aliases expand to at most
    MAX_YAML_VALUES values (``source`` names the file or override in the error)."""
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{source}: the YAML is nested too deeply") from None
        if node is None:
            return None
        size = _expanded_size(node, source)
        if size > MAX_YAML_VALUES:
            raise ConfigError(
                f"{source}: the YAML's aliases (*name) expand to more than {MAX_YAML_VALUES} "
                "values (an alias bomb?); write the values out instead of nesting aliases"
            )
        return loader.construct_document(node)
    finally:
        loader.dispose()


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
            raise ConfigError(f"{key}={short_repr(value)} must be a list")
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
            f"{key}={short_repr(value)} must be of type {annotation.__name__}, got "
            f"{type(value).__name__}"
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
                f"{source}: unknown section {short_repr(section_name)}; known: {', '.join(hints)}"
            )
        if section_values is None:  # an empty section in YAML (`data:` and nothing under it)
            continue
        if not isinstance(section_values, dict):
            raise ConfigError(f"{source}: section {short_repr(section_name)} must be a mapping")
        section = getattr(cfg, section_name)
        field_types = typing.get_type_hints(type(section))
        for key, value in section_values.items():
            if key not in field_types:
                raise ConfigError(
                    f"{source}: unknown key {section_name}.{clip_text(str(key))}; known: "
                    f"{', '.join(field_types)}"
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
            raise ConfigError(
                f"--set {short_repr(item)}: expected section.key=value, e.g. optim.lr=3e-7"
            )
        dotted, text = item.split("=", 1)
        section, key = dotted.split(".", 1)
        field_type = _override_field_type(item, section, key)
        label = f"--set {clip_text(item)}"
        try:
            value = safe_load_bounded(text, label) if text else ""
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{label}: the value is not valid YAML ({problem})") from None
        if not isinstance(value, str) and field_type is str:
            value = text  # a string field takes the text as typed (a path like 2024, "001")
        try:
            value = _coerce(dotted, value, field_type)
        except ConfigError as exc:
            raise ConfigError(f"{label}: {exc}") from None
        if raw.get(section) is None:
            raw[section] = {}
        elif not isinstance(raw[section], dict):
            raise ConfigError(
                f"{label}: section {short_repr(section)} is not a mapping in the file"
            )
        raw[section][key] = value
    return raw


def _override_field_type(item: str, section: str, key: str) -> Any:
    """The annotation of ``section.key``; an unknown one blames the override, not the file."""
    sections = typing.get_type_hints(SelmConfig)
    if section not in sections:
        raise ConfigError(
            f"--set {clip_text(item)}: unknown section {short_repr(section)}; known: "
            f"{', '.join(sections)}"
        )
    fields = typing.get_type_hints(sections[section])
    if key not in fields:
        raise ConfigError(
            f"--set {clip_text(item)}: unknown key {section}.{clip_text(key)}; known: "
            f"{', '.join(f'{section}.{name}' for name in fields)}"
        )
    return fields[key]


def _read_yaml(path: Path) -> Any:
    """The YAML document of ``path``; a syntax error names the file, line and column."""
    try:
        return safe_load_bounded(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}); save the config as UTF-8"
        ) from None
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
