"""The distribution ships every package and registers first-party plugins through entry points."""
import importlib.metadata
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_package_folder_is_listed():
    """plugins/ installs as dyncompute_plugins, so packages are listed by hand: none may be missing."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in (("dyncompute", "dyncompute"), ("plugins", "dyncompute_plugins")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert found == listed


def test_first_party_plugins_use_the_public_entry_point_group():
    declared = _pyproject()["project"]["entry-points"]["dyncompute.plugins"]
    installed = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="dyncompute.plugins")}
    assert declared == installed
    assert any(v.startswith("dyncompute_plugins.") for v in declared.values())
