"""gin configuration: parse files and bindings with clear errors, and keep gin's global state scoped."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterable

import gin

from .registry import load_plugins

# gin `include` paths resolve against the gin file's folder and the project root
# (so `include 'experiments/quickstart/dit.gin'` works from any working directory)
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class _QuietSearchMisses(logging.Filter):
    """gin logs an error for every search-path prefix that misses an include; only the last miss matters."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.module == "resource_reader" and record.getMessage().startswith("Path not found"))


logging.getLogger().addFilter(_QuietSearchMisses())


class ConfigError(ValueError):
    """A gin file or binding that cannot be parsed or does not match a configurable."""


def _import_configurables() -> None:
    """Everything that can appear in a gin file must be imported before parsing."""
    load_plugins()
    from . import engine, model, sampling  # noqa: F401  (register their gin configurables)
    from .sweeps import evaluate  # noqa: F401  (CellSettings, in every sweep cell's config)


def parse(files: Iterable[str | Path] = (), bindings: Iterable[str] = ()) -> None:
    """Parse gin files then bindings (later bindings win); errors name the file or binding."""
    _import_configurables()
    gin.add_config_file_search_path(str(PROJECT_ROOT))
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"gin file not found: {path}")
        gin.add_config_file_search_path(str(path.resolve().parent))
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
