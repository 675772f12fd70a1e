"""gin configuration: parse files and bindings with clear errors, and keep gin's global state scoped."""
from __future__ import annotations

import contextlib
import inspect
import logging
import re
from collections.abc import Iterable
from pathlib import Path

import gin

from .errors import ConfigError, one_line
from .model import DiffusionTransformer
from .registry import load_plugins

# gin `include` paths resolve against the gin file's folder and the project root
# (so `include 'experiments/quickstart/dit.gin'` works from any working directory)
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class _QuietSearchMisses(logging.Filter):
    """gin logs an error for every search-path prefix that misses an include; only the last miss matters."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.module == "resource_reader" and record.getMessage().startswith("Path not found"))


logging.getLogger().addFilter(_QuietSearchMisses())


# Configurables of the layers above the model (trainer, sampler): a parse that only rebuilds the model
# skips their bindings; any other unknown name is still an error.
RUN_CONFIGURABLES = ["train", "train_evaluator", "fine_tune", "upcycling", "generate", "CellSettings", "sweep"]


def parse(files: Iterable[str | Path] = (), bindings: Iterable[str] = (), skip_unknown: bool | list = False) -> None:
    """Parse gin files then bindings (later bindings win); errors name the file or binding.

    Plugins and the model are registered here; a caller that reads other configurables (the trainer's
    ``train``, the sampler's ``generate``) has imported their modules already. ``skip_unknown`` (a list
    of names, or True for all) ignores bindings of configurables not imported.
    """
    load_plugins()
    gin.add_config_file_search_path(str(PROJECT_ROOT))
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"gin file not found: {path}")
        gin.add_config_file_search_path(str(path.resolve().parent))
        try:
            gin.parse_config_file(str(path), skip_unknown=skip_unknown)
        except Exception as e:  # gin raises SyntaxError/ValueError/KeyError variants
            raise ConfigError(f"malformed gin file {path}: {_gin_problem(e)}") from e
    for b in bindings:
        try:
            gin.parse_config(b, skip_unknown=skip_unknown)
        except Exception as e:
            raise ConfigError(f"bad gin binding {b!r}: {_gin_problem(e)}") from e


def _gin_problem(error: Exception) -> str:
    """gin's message on one line, with the position of a syntax error."""
    where = f" (line {error.lineno}, column {error.offset})" if isinstance(error, SyntaxError) and error.lineno else ""
    if isinstance(error, SyntaxError) and error.msg:
        return error.msg + where
    if len(error.args) == 2 and isinstance(error.args[0], str) and isinstance(error.args[1], tuple):
        return error.args[0]  # tokenize.TokenError: (message, (line, column))
    return one_line(error)


@contextlib.contextmanager
def scoped(files: Iterable[str | Path] = (), bindings: Iterable[str] = (), skip_unknown: bool | list = False):
    """Parse a config for the duration of a block, restoring an empty gin state after it."""
    gin.clear_config()
    try:
        parse(files, bindings, skip_unknown)
        yield
    finally:
        gin.clear_config()


def bound_arguments(configurable, name: str) -> dict:
    """The keyword arguments gin will call ``configurable`` with: its defaults, then the bindings of ``name``."""
    defaults = {k: p.default for k, p in inspect.signature(configurable).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **gin.get_bindings(name)}


def bindings_of(config_text: str) -> dict[str, str]:
    """``{"train.lr": "0.001", ...}`` from a config string as `gin.config_str` writes it (values may
    continue over indented lines); comments and blank lines are skipped."""
    out: dict[str, str] = {}
    key = None
    for line in config_text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        start = re.match(r"(\S+) = ?(.*)$", line)
        if start and not line[0].isspace():
            key = start.group(1)
            out[key] = start.group(2).rstrip("\\").strip()
        elif key is not None:
            out[key] += line.strip()
    return out


def build_model(config: str | Path, bindings: Iterable[str] = ()):
    """The `DiffusionTransformer` a gin file configures, and the file's latent folder (if it names one)."""
    from .validate import check_model

    with scoped([config], bindings, skip_unknown=RUN_CONFIGURABLES):
        model = check_model(bound_arguments(DiffusionTransformer, "DiffusionTransformer"), meta=False)
        try:
            root = gin.query_parameter("datasets.latent_folder.root")
        except (ValueError, KeyError):
            root = None
    return model, root
