"""Grid files (TOML; YAML with the `yaml` extra) read and checked against their schema before any run:
an unknown table or key, a wrong type or an empty list is named in one line, not found mid-grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flatmin.checks import POSITIVE_INT, check_seeds
from flatmin.errors import ConfigError, FlatminError
from flatmin.experiments.tuning import METRICS, field_name
from flatmin.train.config import check_field
from flatmin.train.methods import METHODS

TABLES = ("grid", "tune", "run")


def load(path: Path) -> dict[str, Any]:
    """The file's tables, parsed and checked; every problem a FlatminError naming the file."""
    if not path.is_file():
        raise FlatminError(f"no grid file at {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise FlatminError(f"{path} is not a text file (not UTF-8); give a TOML or YAML grid file") from None
    if not text.strip():
        raise FlatminError(f"{path} is empty: nothing to run; give it a [grid] table (flatmin grid --help)")
    doc = _parse_yaml(path, text) if path.suffix in (".yaml", ".yml") else _parse_toml(path, text)
    try:
        return check(doc)
    except FlatminError as err:
        raise FlatminError(f"{path}: {err}") from None


def _parse_yaml(path: Path, text: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise FlatminError("YAML grids need PyYAML: pip install flatmin[yaml]") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "parse error"
        raise FlatminError(f"{path}: not valid YAML ({problem}{where})") from None


def _parse_toml(path: Path, text: str) -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise FlatminError("TOML grids on Python 3.10 need tomli: pip install tomli") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise FlatminError(f"{path}: not valid TOML ({err})") from None


def check(doc: Any) -> dict[str, Any]:
    """The schema: [grid] config fields (a list crosses), [tune] fields to choose, [run] out/workers."""
    if not isinstance(doc, dict):
        raise ConfigError(f"expected the tables {', '.join(TABLES)}, got {type(doc).__name__} {doc!r:.40}")
    if unknown := sorted(set(doc) - set(TABLES)):
        raise ConfigError(f"unknown table(s) {', '.join(map(str, unknown))}; valid: {', '.join(TABLES)}")
    for name in TABLES:
        if not isinstance(doc.get(name, {}), dict):
            raise ConfigError(f"[{name}] must be a table of KEY = VALUE, got {doc[name]!r}")
    grid, tune, run = (doc.get(name, {}) for name in TABLES)
    if not grid and not tune:
        raise ConfigError("no [grid] table: nothing to run")
    for key, value in grid.items():
        if key in ("seeds", "seed"):
            check_seeds(value, f"[grid] {key}")
        elif key == "milestones" or not isinstance(value, list):
            check_field(key, value, "[grid] ")
        else:
            _values(key, value, "[grid] ")
    for key, value in tune.items():
        if key == "seeds":
            check_seeds(value, "[tune] seeds")
        elif key == "metric":
            if value not in METRICS:
                raise ConfigError(f"[tune] metric must be one of {', '.join(METRICS)}, got {value!r}")
        elif isinstance(value, dict):
            if key not in METHODS:
                raise ConfigError(f"[tune.{key}]: unknown method; valid methods: {', '.join(METHODS)}")
            for field, values in value.items():
                _values(field_name(str(field), key), values, f"[tune.{key}] ")
        else:
            _values(field_name(str(key)), value, "[tune] ")
    for key, value in run.items():
        if key == "out":
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"[run] out must be a folder name, got {value!r}")
        elif key == "workers":
            POSITIVE_INT.check(value, "[run] workers")
        else:
            raise ConfigError(f"unknown key {key!r} in [run]; valid keys: out, workers")
    return doc


def _values(field: str, values: Any, where: str) -> None:
    """A non-empty list of values for one field, each checked."""
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}{field} must be a non-empty list of values, got {values!r}")
    for v in values:
        check_field(field, v, where)
