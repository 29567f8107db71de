"""Typed configuration from TOML, and the provenance every run records.

Every command builds one frozen dataclass from defaults, a TOML file and command-line overrides, and writes
the resolved values back into its run directory, so a run can always be reproduced from what it left behind.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import tomllib
import types
import typing
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import tomli_w

__all__ = [
    "ConfigError", "config_from_dict", "read_toml", "load_config", "config_to_dict", "dump_config", "provenance",
    "launched_by_mpi", "launched_world_size",
]

# Set by MPI launchers for their ranks: Hydra/MPICH and Slurm's PMI, PMIx, Open MPI, MVAPICH, Cray PALS.
_LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "PALS_RANKID")
# Of those, the world sizes (Hydra/MPICH and Slurm's PMI, Open MPI, MVAPICH).
_LAUNCHER_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_by_mpi() -> bool:
    """Whether an MPI launcher started this process (asked without importing MPI, which cannot always start
    without a launcher, and without torch: the PCA and ingest processes stay small)."""
    return any(name in os.environ for name in _LAUNCHER_VARIABLES)


def launched_world_size() -> int:
    """How many ranks the launcher says it started (1 when it does not say)."""
    return max(int(os.environ.get(name) or 1) for name in _LAUNCHER_SIZES)

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or value is wrong; the message names the file and the key."""


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _convert(value, non_none[0], where)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return config_from_dict(annotation, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def config_from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from ``values``, rejecting unknown keys and converting nested tables."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    kwargs = {name: _convert(v, hints[name], f"{where}.{name}") for name, v in values.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A config file's tables; a missing file or bad TOML is a ConfigError naming the file."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def load_config(cls: type[T], path: str | os.PathLike[str] | None, overrides: dict[str, Any] | None = None) -> T:
    """Defaults, then the TOML file at ``path`` (if given), then ``overrides`` (keys with None are skipped)."""
    values: dict[str, Any] = read_toml(path) if path is not None else {}
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return config_from_dict(cls, values, where=str(path) if path else cls.__name__)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain TOML-serialisable dict (tuples become lists, None values are left out: TOML has no null)."""

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return clean(dataclasses.asdict(config))


def dump_config(config: Any, extra: dict[str, Any] | None = None) -> str:
    """TOML text of a config, with an optional ``[provenance]`` table."""
    data = config_to_dict(config)
    if extra:
        data["provenance"] = {k: v for k, v in extra.items() if v is not None}
    return tomli_w.dumps(data)


def _git_sha() -> tuple[str | None, bool | None]:
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None, None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain"], capture_output=True, text=True, timeout=5)
        return sha.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


def provenance(argv: list[str] | None = None, packages: tuple[str, ...] = ()) -> dict[str, Any]:
    """What produced a run: argv, sagepairs version, git sha and dirty flag, Python and package versions."""
    sha, dirty = _git_sha()
    versions = {}
    for name in ("sagepairs", *packages):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return {
        "argv": list(argv if argv is not None else sys.argv),
        "git_sha": sha,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "host": platform.node(),
        "versions": versions,
    }
