"""What every configuration file shares: strict pydantic tables, size fields, and the
one-line ``ConfigError`` naming the file and key (scenarios, the daemon's host.toml).
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, ValidationError

from balloonist.errors import ConfigError, SizeError
from balloonist.units import parse_size_bytes

Model = TypeVar("Model", bound=BaseModel)


#: Settings renamed to say what they count; a file or request written with the old
#: name (``cpu_min``, ``cpu_max``) is still read.
MIN_CPUS_NAMES: Final = AliasChoices("min_cpus", "cpu_min")
MAX_CPUS_NAMES: Final = AliasChoices("max_cpus", "cpu_max")


def add_former_cpu_flags(parser: argparse.ArgumentParser) -> None:
    """Accept ``--cpu-min``/``--cpu-max``, the old spellings of ``--min-cpus`` and
    ``--max-cpus`` (which the parser must have), without listing them in the help."""
    for old, dest in (("--cpu-min", "min_cpus"), ("--cpu-max", "max_cpus")):
        parser.add_argument(
            old, type=int, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )


class Strict(BaseModel):
    """A table of a config file: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_size(value: Any) -> Any:
    """Field validator: a size string with a unit, or None; anything else is an error.

    Raises ``ValueError`` because pydantic turns only that into an error located at
    the field, which is what names the key in the message.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f'sizes are strings with a unit, like "512MiB"; got {value!r}')
    try:
        parse_size_bytes(value)
    except SizeError as exc:
        raise ValueError(exc.message) from None
    return value


def check_policy_name(value: str, known: Sequence[str]) -> str:
    """Field validator body: one of ``known`` (raises ValueError, as check_size)."""
    if value not in known:
        raise ValueError(f"unknown policy {value!r} (choose from {', '.join(known)})")
    return value


def read_toml(path: Path) -> dict[str, Any]:
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", where=where) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", where=where) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", where=where) from None


def validate(model: type[Model], data: Any, *, where: str) -> Model:
    """``model.model_validate(data)``, with the first problem as one located ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise config_error(exc, where) from None


def config_error(exc: ValidationError, where: str) -> ConfigError:
    err = exc.errors()[0]
    key = format_loc(err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "missing":
        message = "required key is missing"
    else:
        message = str(err["msg"]).removeprefix("Value error, ")
    return ConfigError(message, where=f"{where}: {key}" if key else where)


def format_loc(loc: tuple[int | str, ...]) -> str:
    """``("guests", 1, "min")`` -> ``guests[1].min``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out
