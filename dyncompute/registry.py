"""Plugin registries.

One registry per plugin kind, built on fvcore's ``Registry``. Plugins (first-party and third-party
alike) are found through the ``dyncompute.plugins`` entry-point group: each entry point names a
module whose import registers its classes. Registering also makes a class gin-configurable under
``<kind>.<name>``, so every plugin parameter is one gin binding away.
"""
from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from typing import Any

import gin
from fvcore.common.registry import Registry as _FvcoreRegistry

from .errors import UserError

ENTRY_POINT_GROUP = "dyncompute.plugins"
_plugins_loaded = False


class UnknownPluginError(UserError):
    """Raised for a plugin name no registry knows; the message lists the known names."""


class Registry(_FvcoreRegistry):
    """fvcore registry with named registration, gin binding and a helpful unknown-name error."""

    def register(self, name: str | Callable | None = None):  # type: ignore[override]
        if name is None or callable(name):
            return super().register(name)

        def decorator(obj):
            self._do_register(name, gin.configurable(name, module=self._name)(obj))
            return obj

        return decorator

    def get(self, name: str) -> Any:
        load_plugins()
        if name not in self._obj_map:
            known = ", ".join(sorted(self._obj_map)) or "(none registered)"
            raise UnknownPluginError(f"unknown {self._name[:-1]} {name!r}; known {self._name}: {known}")
        return self._obj_map[name]

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._obj_map)

    def build(self, name: str, *args, **kwargs) -> Any:
        return self.get(name)(*args, **kwargs)


TOKENIZERS = Registry("tokenizers")
REDUCERS = Registry("reducers")
SAMPLERS = Registry("samplers")
DATASETS = Registry("datasets")
FEATURE_EXTRACTORS = Registry("feature_extractors")
ALL = {r._name: r for r in (TOKENIZERS, REDUCERS, SAMPLERS, DATASETS, FEATURE_EXTRACTORS)}


def load_plugins() -> None:
    """Import every module advertised under the entry-point group (once)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
