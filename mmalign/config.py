"""Dataclass configs: one parser turns every field into a CLI flag and a YAML key.

A config is a (possibly nested) dataclass. Each field carries ``metadata={"help": ...}``.
``load_config(Cls, argv)`` reads an optional ``--config file.yaml`` first, then applies CLI
flags on top (``--lr 1e-5``; nested fields as ``--train.lr 1e-5``), then builds the dataclass,
whose ``__post_init__`` validates. Unknown YAML keys and unknown flags are errors that name the
key and the file, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["ConfigError", "config_to_dict", "diff_configs", "from_dict", "help_", "load_config", "save_config"]

T = TypeVar("T")


def help_(text: str) -> dict[str, str]:
    """Field metadata carrying its help text: ``field(default=..., metadata=help_("what it does"))``."""
    return {"help": text}


class ConfigError(ValueError):
    """A config file or flag that cannot be turned into the dataclass."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 also reads yes/no/on/off as booleans, which turned
    documented string values such as ``mixed_precision: no`` into ``False``; a boolean field still
    accepts those words (``_coerce`` maps them)."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--flag -1e-5`` -> ``--flag=-1e-5``: argparse otherwise reads ``-1e-5`` as an unknown option."""
    out: list[str] = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and token.startswith("-") and _is_number(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Turn a YAML/CLI value into ``tp``; raise ConfigError naming ``where``."""
    if value is None:
        return None
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    try:
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
            return from_dict(tp, value, where=where)
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
                return False
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if origin in (list, Sequence, tuple):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v] if not value.startswith("[") else json.loads(value)
            (arg,) = typing.get_args(tp)[:1] or (Any,)
            return [_coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            if isinstance(value, str):
                value = json.loads(value)
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: expected a mapping, got {value!r}")
            return dict(value)
        if origin is typing.Literal:
            if value not in typing.get_args(tp):
                raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
            return value
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: cannot read {value!r} as {tp}: {exc}") from exc
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys raise ``ConfigError``."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    data = _with_parent_defaults(cls, data)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: {exc}") from exc


def _init_values(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.init}


def _with_parent_defaults(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """Give a nested config given in part the parent's own defaults for the keys it leaves out.

    ``stage1: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=1e-7, lora_r=128))``
    with only ``--stage1.max_steps 5`` given must keep ``learning_rate=1e-7, lora_r=128``, not fall
    back to ``TrainConfig()``'s. Only the values the parent's factory *sets* (those differing from
    the nested class's own defaults) are carried over, so values a ``__post_init__`` derives (for
    example from ``loss``) are still derived from what the user gave.
    """
    out = dict(data)
    for f in dataclasses.fields(cls):
        given = out.get(f.name)
        if not (f.init and isinstance(given, dict)) or f.default_factory is dataclasses.MISSING:
            continue
        try:
            parent_default = f.default_factory()
            nested_cls = type(parent_default)
            if not dataclasses.is_dataclass(parent_default) or isinstance(parent_default, type):
                continue
            plain = _init_values(nested_cls())
        except (TypeError, ValueError):  # a nested class that needs arguments has no plain default
            continue
        overrides = {k: v for k, v in _init_values(parent_default).items() if plain.get(k) != v}
        out[f.name] = {**_json_ready(overrides), **given}
    return out


def _json_ready(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (config_to_dict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v)
            for k, v in values.items()}


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-Python (JSON/YAML-safe) view of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def diff_configs(a: dict[str, Any], b: dict[str, Any], *, ignore: Sequence[str] = (), prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two config dicts (ignoring ``ignore``)."""
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        if name in ignore or key in ignore:
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, ignore=ignore, prefix=f"{name}.")
        elif va != vb:
            out.append(f"{name}: {va!r} != {vb!r}")
    return out


def _flatten_fields(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    hints = _field_types(cls)
    out: list[tuple[str, Any, str]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = _strip_optional(hints[f.name])
        if _is_dataclass_type(tp):
            out += _flatten_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", tp, f.metadata.get("help", "")))
    return out


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def _defaults(cls: type) -> dict[str, Any]:
    """Dotted field name -> default value, read off ``cls()`` where it builds without arguments
    (so a nested config's own default factory counts), else off the field declarations."""
    try:
        return _flatten_values(cls())
    except (TypeError, ValueError):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
        return out


def _flatten_values(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out.update(_flatten_values(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def _flag_help(text: str, tp: Any, default: Any) -> str:
    parts = [text.replace("%", "%%")] if text else []
    if typing.get_origin(tp) is typing.Literal:
        parts.append("choices: " + " | ".join(str(c) for c in typing.get_args(tp)))
    parts.append(f"default: {json.dumps(default, default=str)}".replace("%", "%%"))
    return "; ".join(parts)


def load_config(cls: type[T], argv: Sequence[str] | None = None, *, description: str | None = None) -> T:
    """Parse ``--config path.yaml`` plus per-field flags into ``cls``.

    Flags override the file. A flag's value is read as YAML (``--lr 1e-5``, ``--betas [0.9,0.99]``,
    ``--kwargs '{beta: 0.1}'``) except for plain string fields, which take the text as given. Flag
    names must be written out in full (no prefix matching), and ``--flag -1e-5`` works as
    ``--flag=-1e-5``. A bad flag value is reported against the flag, not the file.
    """
    # allow_abbrev=False: "--train.lr" must not silently become "--train.lr_scheduler".
    parser = argparse.ArgumentParser(
        description=description or cls.__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=str, default=None, help="YAML file with the config's keys")
    fields = _flatten_fields(cls)
    defaults = _defaults(cls)
    for name, tp, text in fields:
        parser.add_argument(f"--{name}", dest=name, default=None, metavar="V",
                            help=_flag_help(text, tp, defaults.get(name)))
    args = parser.parse_args(_join_negative_values(list(argv) if argv is not None else sys.argv[1:]))
    data: dict[str, Any] = {}
    where = "command line"
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = _yaml_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not a readable YAML file: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = loaded
        where = str(path)
    flagged = False
    for name, tp, _ in fields:
        value = getattr(args, name)
        if value is None:
            continue
        if isinstance(value, str) and tp is not str:
            try:
                value = _yaml_load(value)
            except yaml.YAMLError as exc:
                raise ConfigError(f"command line: --{name}: cannot read {value!r}: {exc}") from exc
        _coerce(value, tp, f"command line: --{name}")  # a bad value is the flag's fault, not the file's
        _set_dotted(data, name, value)
        flagged = True
    if flagged and args.config:
        where = f"{where} with command-line flags"
    return from_dict(cls, data, where=where)
