"""Typed run configs: dataclass sections read from TOML, `section.key=value` overrides, a TOML writer.

    @dataclass
    class TrainSection:
        lr: float = setting(1e-4, "peak learning rate", gt=0)
        schedule: str = setting("cosine", "LR schedule", choices=("cosine", "wsd", "constant"))

    @dataclass
    class RunConfig:
        out_dir: str = setting("", "where everything is written", required=True)
        train: TrainSection = section(TrainSection)
        lora: LoraSection | None = optional_section(LoraSection)   # absent in the file: None

    cfg = load_config(RunConfig, "sft.toml", ["train.lr=3e-4"])     # ConfigError before anything runs
    text = to_toml(cfg)                                              # the resolved config, re-readable

Every value is checked against its field: the type (bools are not numbers; an int is accepted where a
float is expected), `choices`, numeric bounds (`ge`, `gt`, `le`, `lt`) and `required`. An error names the
file (or the command-line override), the `[section] key`, what was found and what is allowed, and for an
unknown key the closest known one. A schema may define `check(self)` for rules across fields, raising
`ConfigError` through `fail(key, message)`. Settings are one of: bool, int, float, str, list[str],
list[int], list[float]. TOML has no null, so "unset" is spelled by a value the help text names ("" or 0).
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import typing
from pathlib import Path

SCALARS = (bool, int, float, str)


class ConfigError(ValueError):
    """A config problem, with the file (or override) and the key in the message."""


# ----------------------------------------------------------------------------------------------
# Declaring settings

def setting(default, help: str, *, choices=None, ge=None, gt=None, le=None, lt=None, required: bool = False):
    """A dataclass field carrying its help text and constraints (lists: `default` is copied per instance)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "ge": ge, "gt": gt,
            "le": le, "lt": lt, "required": required}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls, help: str = ""):
    """A required sub-table (always present, filled with defaults)."""
    return dataclasses.field(default_factory=cls, metadata={"section": cls, "help": help, "optional": False})


def optional_section(cls, help: str = ""):
    """A sub-table that is None unless the file or an override mentions it (e.g. [lora])."""
    return dataclasses.field(default=None, metadata={"section": cls, "help": help, "optional": True})


def fail(key: str, message: str):
    """Raise a ConfigError for `key` ("section.key"); `load_config` adds the source."""
    raise ConfigError(f"{_display(key)}: {message}")


def _display(key: str) -> str:
    """"train.lr" -> "[train] lr"; a top-level key stays as is."""
    sec, _, name = key.rpartition(".")
    return f"[{sec}] {name}" if sec else name


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_section(f: dataclasses.Field) -> bool:
    return "section" in f.metadata


def _list_item(tp) -> type | None:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is list else None


def _a(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def type_name(tp) -> str:
    item = _list_item(tp)
    if item is not None:
        return f"list of {type_name(item)}s"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}[tp]


# ----------------------------------------------------------------------------------------------
# Checking one value

def _describe(value) -> str:
    kind = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)
    text = json.dumps(value) if isinstance(value, (bool, int, float, str)) else repr(value)
    return f"{text} ({kind})"


def _check_type(value, tp):
    """The value converted to `tp` (int -> float), or ConfigError without the key (added by the caller)."""
    item = _list_item(tp)
    if item is not None:
        if not isinstance(value, list):
            raise ConfigError(f"must be {_a(type_name(tp))}, got {_describe(value)}")
        return [_check_type(v, item) for v in value]
    ok = (isinstance(value, tp) and not (tp is not bool and isinstance(value, bool))) or \
         (tp is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"must be {_a(type_name(tp))}, got {_describe(value)}")
    return float(value) if tp is float else value


def _check_bounds(value, meta: dict):
    for v in value if isinstance(value, list) else [value]:
        if meta.get("choices") is not None and v not in meta["choices"]:
            allowed = ", ".join(json.dumps(c) for c in meta["choices"])
            raise ConfigError(f"must be one of {allowed}; got {json.dumps(v)}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if isinstance(v, float) and math.isnan(v):
                raise ConfigError("must be a number, got nan")
            for op, bound, ok in (("ge", ">=", lambda a, b: a >= b), ("gt", ">", lambda a, b: a > b),
                                  ("le", "<=", lambda a, b: a <= b), ("lt", "<", lambda a, b: a < b)):
                b = meta.get(op)
                if b is not None and not ok(v, b):
                    raise ConfigError(f"must be {bound} {b}, got {v}")


def check_value(value, tp, meta: dict):
    value = _check_type(value, tp)
    _check_bounds(value, meta)
    return value


def parse_text(text: str, tp):
    """A command-line value for a field of type `tp`: a TOML literal (true, 3, 1e-4, ["a", "b"]); strings
    may be bare; lists may also be comma-separated (a,b,c)."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = None
    if tp is str:
        return value if isinstance(value, str) else text
    item = _list_item(tp)
    if item is not None and not isinstance(value, list):
        parts = [p.strip() for p in text.split(",") if p.strip()]
        return [parse_text(p, item) for p in parts]
    if value is None:
        raise ConfigError(f"cannot read {text!r} as {_a(type_name(tp))}")
    return value


# ----------------------------------------------------------------------------------------------
# Building a config

def _suggest(name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _fill(cls, data: dict, prefix: str):
    """An instance of `cls` from a TOML table; raises ConfigError naming the first bad key."""
    if not isinstance(data, dict):
        raise ConfigError(f"[{prefix.rstrip('.')}] must be a table, got {_describe(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    for key in data:
        if key not in fields:
            where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
            kinds = "section" if isinstance(data[key], dict) and not prefix else "key"
            raise ConfigError(f"unknown {kinds} {key!r} in {where}{_suggest(key, fields)} "
                              f"(known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if _is_section(f):
            if name in data:
                kwargs[name] = _fill(f.metadata["section"], data[name], key + ".")
            continue
        if name not in data:
            continue
        try:
            kwargs[name] = check_value(data[name], hints[name], f.metadata)
        except ConfigError as e:
            raise ConfigError(f"{_display(key)} {e}") from None
    return cls(**kwargs)


def check_fields(cfg, prefix: str = "") -> None:
    """Check every setting of an instance (and of its sections) against its type and constraints, as
    `load_config` does for a file: for configs built in Python (`__post_init__`)."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _is_section(f):
            if value is not None:
                check_fields(value, prefix + f.name + ".")
            continue
        try:
            setattr(cfg, f.name, check_value(value, hints[f.name], f.metadata))
        except ConfigError as e:
            raise ConfigError(f"{_display(prefix + f.name)} {e}") from None


def _check_required(cfg, prefix: str = ""):
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _is_section(f):
            if value is not None:
                _check_required(value, prefix + f.name + ".")
        elif f.metadata.get("required") and value in ("", [], None):
            raise ConfigError(f"{_display(prefix + f.name)} is required: {f.metadata['help']}")


def set_value(cfg, key: str, text: str) -> None:
    """Apply one override "section.key" = text (parsed for the field's type, then checked)."""
    parts = key.split(".")
    obj, prefix = cfg, ""
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if part not in fields:
            where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
            raise ConfigError(f"unknown key {part!r} in {where}{_suggest(part, fields)} "
                              f"(known: {', '.join(sorted(fields))})")
        f = fields[part]
        last = i == len(parts) - 1
        if _is_section(f):
            if last:
                raise ConfigError(f"{key!r} is a section; set one of its keys, e.g. {key}.{next(iter(fields))}")
            if getattr(obj, part) is None:
                setattr(obj, part, f.metadata["section"]())
            obj, prefix = getattr(obj, part), prefix + part + "."
            continue
        if not last:
            raise ConfigError(f"{_display(prefix + part)} is a setting, not a section")
        tp = _hints(type(obj))[part]
        try:
            setattr(obj, part, check_value(parse_text(text, tp), tp, f.metadata))
        except ConfigError as e:
            raise ConfigError(f"{_display(key)} {e}") from None


def parse_override(arg: str) -> tuple[str, str]:
    if "=" not in arg or arg.startswith("="):
        raise ConfigError(f"override {arg!r} must look like section.key=value (e.g. train.lr=3e-4)")
    key, _, text = arg.partition("=")
    return key.strip(), text.strip()


def read_toml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None


def load_config(cls, path=None, overrides=(), data: dict | None = None):
    """Read `path` (TOML) or `data`, apply the overrides, check everything; returns an instance of `cls`.

    Errors are ConfigError("<file>: [section] key ..."), or "command line train.lr=x: ..." for overrides."""
    source = str(path) if path is not None else "config"
    raw = read_toml(path) if path is not None else dict(data or {})
    try:
        cfg = _fill(cls, raw, "")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    for arg in overrides:
        try:
            key, text = parse_override(arg)
            set_value(cfg, key, text)
        except ConfigError as e:
            raise ConfigError(f"command line {arg!r}: {e}") from None
    where = source + (" (with the command-line overrides)" if overrides else "")
    try:
        _check_required(cfg)
        if hasattr(cfg, "check"):
            cfg.check()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return cfg


# ----------------------------------------------------------------------------------------------
# Writing and describing

def to_dict(cfg) -> dict:
    """Nested plain dict (absent optional sections left out)."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if _is_section(f):
            if value is not None:
                out[f.name] = to_dict(value)
        else:
            out[f.name] = list(value) if isinstance(value, list) else value
    return out


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)      # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(cfg) -> str:
    """TOML text that `load_config` reads back to an equal config (top-level keys first, then tables)."""
    d = to_dict(cfg)
    lines = [f"{k} = {toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    for name, table in d.items():
        if isinstance(table, dict):
            lines += ["", f"[{name}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def help_lines(cls, prefix: str = "") -> list[str]:
    """One line per setting: key = default  (type; allowed)  help. Sections in declaration order."""
    lines, hints = [], _hints(cls)
    for f in dataclasses.fields(cls):
        if _is_section(f):
            sub = f.metadata["section"]
            note = " (optional: absent = off)" if f.metadata.get("optional") else ""
            lines += ["", f"[{prefix + f.name}]{note}" + (f"  {f.metadata['help']}" if f.metadata["help"] else "")]
            lines += help_lines(sub, prefix + f.name + ".")
            continue
        m, rules = f.metadata, []
        if m.get("required"):
            rules.append("required")
        if m.get("choices") is not None:
            rules.append("one of " + ", ".join(json.dumps(c) for c in m["choices"]))
        for op, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if m.get(op) is not None:
                rules.append(f"{sym} {m[op]}")
        tail = f"; {'; '.join(rules)}" if rules else ""
        lines.append(f"  {f.name} = {toml_value(_default(f))}  ({type_name(hints[f.name])}{tail})  {m['help']}")
    return lines
