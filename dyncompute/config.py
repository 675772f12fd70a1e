"""gin configuration: parse files and bindings with clear errors, and keep gin's global state scoped."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable

import gin

from .registry import load_plugins


class ConfigError(ValueError):
    """A gin file or binding that cannot be parsed or does not match a configurable."""


def _import_configurables() -> None:
    """Everything that can appear in a gin file must be imported before parsing."""
    load_plugins()
    from . import engine, model, sampling  # noqa: F401  (register their gin configurables)


def parse(files: Iterable[str | Path] = (), bindings: Iterable[str] = ()) -> None:
    """Parse gin files then bindings (later bindings win); errors name the file or binding."""
    _import_configurables()
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"gin file not found: {path}")
        try:
            gin.parse_config_file(str(path))
        except Exception as e:  # gin raises SyntaxError/ValueError/KeyError variants
            raise ConfigError(f"malformed gin file {path}: {e}") from e
    for b in bindings:
        try:
            gin.parse_config(b)
        except Exception as e:
            raise ConfigError(f"bad gin binding {b!r}: {e}") from e


@contextlib.contextmanager
def scoped(files: Iterable[str | Path] = (), bindings: Iterable[str] = ()):
    """Parse a config for the duration of a block, restoring an empty gin state after it."""
    gin.clear_config()
    try:
        parse(files, bindings)
        yield
    finally:
        gin.clear_config()
