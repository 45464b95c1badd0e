"""Strict TOML loading of scenarios into typed configs, `--set` overrides, and saving.

Unknown keys, wrong types and impossible values all become one `ConfigError` whose message
starts with the dotted key (``train.lr: expected a number, got 'fast'``). `--set key=value`
edits the raw TOML table before validation, so it goes through exactly the same checks.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import tomli_w

from edgeddl.config.custom import (
    CustomDataRecord,
    CustomModelRecord,
    Recorded,
    record_table,
    take_records,
)
from edgeddl.config.schema import Scenario
from edgeddl.config.suggest import suggest_key

T = TypeVar("T")

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "scenarios"
DEFAULT_SCENARIO = "paper_fleet"


class ConfigError(ValueError):
    """A scenario, override or profile file that cannot be used; the message is one line."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """The gist of an exception for a one-line error: its message's first line."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    if get_origin(tp) is list:
        return "a list"
    return "a table"


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table, got {value!r}")
        return from_dict(typing.cast(type, tp), value, path)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = get_args(tp)
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table, got {value!r}")
        _, item = get_args(tp)
        return {k: _convert(item, v, f"{path}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):  # of scalars: a layer's name or index
        members = get_args(tp)
        for member in members:
            if member not in (int, str):
                raise TypeError(f"{path}: only unions of int and str are supported in configs")
        if isinstance(value, bool) or not isinstance(value, members):
            raise ConfigError(f"{path}: expected a string or an integer, got {value!r}")
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if tp is float:
        if abs(value) > 1e300 or not math.isfinite(value):  # TOML allows nan and inf
            raise ConfigError(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    return value


def from_dict(cls: type[T], data: dict[str, Any], path: str = "") -> T:
    """Build dataclass `cls` from a TOML table, refusing unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            close = suggest_key(key, fields)
            hint = f"did you mean {close!r}? " if close else ""
            raise ConfigError(f"{prefix}{key}: unknown key; {hint}allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(hints[name], data[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}: missing; expected {_type_name(hints[name])}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        # Section checks name the field; the root Scenario's checks name the whole key.
        raise ConfigError(f"{path}.{e}" if path else str(e)) from None


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word such as `ring` is a string


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `dotted.key=value` to a raw scenario table (list items by index: devices.0)."""
    key, sep, text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. train.lr=0.1")
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {where} is not an index below {len(node)}")
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {key}: {where} is not a table")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {key}: {last} is not an index below {len(node)}")
        node[int(last)] = _parse_value(text.strip())
    elif isinstance(node, dict):
        node[last] = _parse_value(text.strip())
    else:
        raise ConfigError(f"--set {key}: the parent of {last!r} is not a table")


def resolve_path(spec: str | Path | None) -> Path:
    """A scenario path, or the name of a bundled scenario (`edgeddl run paper_fleet`)."""
    if spec is None:
        spec = DEFAULT_SCENARIO
    path = Path(spec)
    if path.is_file():
        return path
    bundled = BUNDLED_DIR / f"{path.stem if path.suffix == '.toml' else spec}.toml"
    if path.parent == Path(".") and bundled.is_file():
        return bundled
    names = ", ".join(bundled_names())
    if path.is_dir():
        raise ConfigError(
            f"scenario {str(spec)!r}: is a directory; expected a scenario .toml file or a bundled "
            f"name ({names})"
        )
    raise ConfigError(
        f"scenario {str(spec)!r}: no such file and no bundled scenario; bundled: {names}"
    )


def bundled_names() -> list[str]:
    """The bundled scenarios' names (src/edgeddl/scenarios/NAME.toml), sorted."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.toml"))


def scenario_description(path: Path) -> str:
    """The first sentence of a scenario file's leading comment ("" without one)."""
    lines = []
    for line in read_text(path).splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(line for line in lines if line)
    return re.split(r"(?<=[.!?])\s+(?=[A-Z])", text, maxsplit=1)[0]


def read_text(path: Path) -> str:
    """A scenario or profile file's text (UTF-8, as TOML must be); one-line errors."""
    try:
        return path.read_bytes().decode("utf-8")  # as tomllib.load reads: no newline rewriting
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def read_toml(path: Path) -> dict[str, Any]:
    text = read_text(path)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def load_scenario(
    spec: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    own_model: bool = False,
    own_data: bool = False,
) -> Scenario:
    """Load a scenario file (or bundled name), apply `--set` overrides, validate everything.

    A run folder's record of your own model or data set (config/custom.py) loads only for
    a caller that brings its own (`own_model`, `own_data`); else one line says how to."""
    path = resolve_path(spec)
    return require_own(load_recorded(path, overrides), own_model, own_data, str(path))


def load_recorded(spec: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recorded:
    """`load_scenario`, with the records of your own model and data set it may hold."""
    path = resolve_path(spec)
    raw = read_toml(path)
    _merge_includes(raw, path)
    for assignment in overrides:
        apply_override(raw, assignment)
    return recorded_from_dict(raw)


def _merge_includes(raw: dict[str, Any], path: Path) -> None:
    """Merge `include = ["profiles.toml"]`: files of [profiles.*] and [links.*] tables
    (e.g. written by `edgeddl calibrate`), relative to the scenario; the scenario wins."""
    includes = raw.pop("include", [])
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise ConfigError(f"include: expected a list of file names, got {includes!r}")
    for name in includes:
        inc_path = path.parent / name
        if not inc_path.is_file():
            raise ConfigError(f"include: {inc_path}: no such file")
        inc = read_toml(inc_path)
        extra = sorted(set(inc) - {"profiles", "links"})
        if extra:
            raise ConfigError(
                f"{inc_path}: an included file may hold only [profiles.*] and "
                f"[links.*] tables, not {', '.join(extra)}"
            )
        for table in ("profiles", "links"):
            for where, value in ((inc_path, inc.get(table, {})), ("scenario", raw.get(table, {}))):
                if not isinstance(value, dict):
                    raise ConfigError(
                        f"{where}: {table}: expected a table of named profiles, got {value!r}"
                    )
            merged = dict(inc.get(table, {}))
            merged.update(raw.get(table, {}))
            if merged:
                raw[table] = merged


def scenario_from_dict(raw: dict[str, Any]) -> Scenario:
    return require_own(recorded_from_dict(raw), own_model=False, own_data=False)


def recorded_from_dict(raw: dict[str, Any]) -> Recorded:
    """A raw scenario table, strictly validated, and its records (see config/custom.py)."""
    raw, model, data = take_records(raw)
    return Recorded(
        scenario=from_dict(Scenario, raw),
        model=None if model is None else from_dict(CustomModelRecord, model, "model"),
        data=None if data is None else from_dict(CustomDataRecord, data, "data"),
    )


def require_own(rec: Recorded, own_model: bool, own_data: bool, source: str = "") -> Scenario:
    """`rec`'s scenario, or one line naming the recorded model or data set the caller does
    not bring, and how to rerun the run."""
    missing = [
        f"{what} ({record.describe()})"
        for what, record, own in (("model", rec.model, own_model), ("data", rec.data, own_data))
        if record is not None and not own
    ]
    if not missing:
        return rec.scenario
    args = ["model=..."] if rec.model is not None else []
    if rec.data is not None:
        args.append("train_set=..., test_set=...")
    where = f"{source}: " if source else ""
    config = repr(source) if source else "scenario"
    raise ConfigError(
        f"{where}this run used your own {' and '.join(missing)}, which a scenario file cannot "
        f"rebuild; rerun it from Python: edgeddl.run({config}, {', '.join(args)})"
    )


def to_toml(
    scenario: Scenario,
    model: CustomModelRecord | None = None,
    data: CustomDataRecord | None = None,
) -> str:
    """The resolved scenario as TOML, [model] and [data] the records of your own model and
    data set where given; loading it back gives an equal Scenario (and records)."""
    return tomli_w.dumps(record_table(scenario, model, data))
