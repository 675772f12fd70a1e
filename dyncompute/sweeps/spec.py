"""Sweep files: base gin configs + named axes of labelled gin bindings, expanded into cells.

A sweep file is ordinary gin that binds one configurable, ``sweep``::

    sweep.name = 'smoke'
    sweep.base = ['experiments/quickstart/dit.gin']    # parsed first, in order (paths: project root)
    sweep.axes = {                                      # the grid: one value of every axis per cell
        'model': {'DiT/2': [], 'DiT/4': ['tokenizers.patchify.patch_size = 4']},
        'sampler': {'DDIM-5': ['generate.sampler = "ddim"', 'generate.num_steps = 5']},
    }
    sweep.points = {'DiT/2 deep': ['DiffusionTransformer.depth = 8']}   # extra cells outside the grid
    sweep.bindings = ['train.steps = 4']                # every cell, after its axis values or point
    sweep.seeds = [0, 1]                                # training seeds: cross every cell (train.seed)
    sweep.reference = ['generate.num_steps = 50']       # sampling settings of the reference samples
    sweep.requires = ['reducers.token_merging']         # plugins the sweep needs (checked first)
    sweep.calibrate = {'teacache': {'num_steps': 50}}   # reducers fitted to each trained run (below)
    sweep.slurm = {'partition': 'gpu', 'gpus_per_node': 1, 'timeout_min': 600}
    sweep.panels_by = 'model'                           # report: one row of quality panels per value of this axis

Axis values and points are lists of gin bindings (``include '...'`` lines too). A cell parses the
base files, then its axis values in axis order (or its point), then sweep.bindings (so they hold over
files an axis includes), then ``train.seed``. A binding is a
*sampling* binding when it only changes how a trained model is sampled or evaluated (see
:func:`is_sampling_binding`); every other binding is a *training* binding. A cell's identity is a
hash of its resolved gin config (every binding after parsing, base files included) and of its
reference settings; its training identity hashes the training part only, so cells that differ in
sampling bindings alone share one trained checkpoint.

``sweep.calibrate`` names reducers whose settings are fitted to the trained model (``Reducer.calibrate``,
what ``dyncompute calibrate NAME RUN_DIR`` runs), with the calibration's keyword arguments: a cell
that uses such a reducer calibrates it on its trained run once (cached in the run folder by those
arguments) and parses the gin file it writes after the cell's config. The arguments are part of the
identity of the cells that use the reducer.

Everything is checked before any cell runs: the base files exist, no axis is empty, no label repeats,
every binding parses, every plugin a cell names is registered. Errors name the file, axis and label.
"""
from __future__ import annotations

import ast
import hashlib
import io
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import gin
from gin import config_parser

from .. import engine, sampling  # noqa: F401  (register `train` and `generate`: sweep files bind them)
from ..config import PROJECT_ROOT, ConfigError, parse, scoped
from ..registry import ALL, DATASETS, REDUCERS, SAMPLERS, TOKENIZERS, UnknownPluginError
from . import evaluate  # noqa: F401  (registers `CellSettings`)

# Configurables whose bindings change only sampling/evaluation: a cell that differs from another in
# these alone reuses the other's trained checkpoint.
SAMPLING_CONFIGURABLES = ("generate", "CellSettings")
SAMPLING_PARAMETERS = ("DiffusionTransformer.reducers",)  # reducers attach to a trained model
SEED_AXIS = "seed"
RESERVED = {SEED_AXIS, "point", "cell", "config", "cell_id", "train_id", "seeds"}  # result-table columns


class SweepError(ConfigError):
    """A sweep file that cannot run; the message names the file, axis, label or binding."""


@gin.configurable("sweep")
def sweep(name: str | None = None, base=(), bindings=(), axes=None, points=None, seeds=(0,), reference=(),
          requires=(), slurm=None, calibrate=None, panels_by=None) -> dict:
    """The ``sweep`` configurable of a sweep file: returns what the file binds."""
    return {"name": name, "base": list(base), "bindings": list(bindings), "axes": axes or {}, "points": points or {},
            "seeds": list(seeds), "reference": list(reference), "requires": list(requires), "slurm": dict(slurm or {}),
            "calibrate": calibrate or {}, "panels_by": panels_by}


@dataclass(frozen=True)
class Cell:
    """One point of a sweep: its labels, bindings and resolved configs."""

    labels: dict  # axis -> label (grid order), or {"point": label}; then "seed"
    training: tuple[str, ...]  # training bindings (after the base files)
    sampling: tuple[str, ...]  # sampling bindings
    training_config: str  # resolved gin of base files + training bindings
    config: str  # resolved gin of the whole cell
    reference: tuple[str, ...]  # sampling bindings of the reference samples (empty: none)
    cell_id: str
    train_id: str
    calibrate: tuple[tuple[str, str], ...] = ()  # (reducer, its calibration arguments as JSON) the cell uses
    reference_is_self: bool = False  # the cell samples exactly as the reference does: its samples are the reference

    @property
    def label(self) -> str:
        return " · ".join(f"seed {v}" if k == SEED_AXIS else str(v) for k, v in self.labels.items())


@dataclass
class Sweep:
    name: str
    source: Path
    base: list[Path]
    axes: dict
    cells: list[Cell]
    slurm: dict = field(default_factory=dict)
    bindings: list[str] = field(default_factory=list)  # sweep.bindings (+ command-line extras)
    panels_by: str | None = None  # the axis whose values get a row of quality panels each in reports

    @property
    def train_ids(self) -> list[str]:
        return list(dict.fromkeys(c.train_id for c in self.cells))


# --------------------------------------------------------------------------- loading


def load_sweep(path: str | Path, extra_bindings=()) -> Sweep:
    """Read, check and expand a sweep file (``extra_bindings`` follow sweep.bindings); raises `SweepError`."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path}")
    _check_statements(path)
    _check_duplicate_keys(path)
    try:
        with scoped([path]):
            raw = sweep()
    except ConfigError as e:
        raise SweepError(_line(e)) from e
    where = f"sweep file {path}"
    _check_requires(raw["requires"], where)
    calibrate = _check_calibrate(raw["calibrate"], where)
    base = [_resolve_base(b, path) for b in raw["base"]]
    axes = _check_axes(raw["axes"], raw["points"], where)
    common = raw["bindings"] + list(extra_bindings)
    cells = expand(base, common, axes, raw["points"], raw["seeds"], raw["reference"], where, calibrate)
    if raw["panels_by"] is not None and raw["panels_by"] not in axes:
        raise SweepError(f"{where}: sweep.panels_by = {raw['panels_by']!r} is not an axis ({', '.join(axes)})")
    return Sweep(raw["name"] or path.stem, path, base, axes, cells, raw["slurm"], common, raw["panels_by"])


def _statements(path: Path):
    text = path.read_text()
    delegate = gin.config.ParserDelegate(skip_unknown=True)
    try:
        return text, list(config_parser.ConfigParser(io.StringIO(text), delegate))
    except SyntaxError as e:
        raise SweepError(f"malformed sweep file {path}: {e}") from e


def _check_statements(path: Path) -> None:
    """Only ``sweep.*`` bindings: cell bindings belong in sweep.bindings, axes or points."""
    _, statements = _statements(path)
    for s in statements:
        binding = isinstance(s, config_parser.BindingStatement)
        if binding and s.selector == "sweep" and not s.scope:
            continue
        what = (f"{s.selector}.{s.arg_name}" if binding else
                f"include {s.filename!r}" if isinstance(s, config_parser.IncludeStatement) else type(s).__name__)
        raise SweepError(f"sweep file {path}, line {s.location.line_num}: {what} is not a `sweep.*` binding; "
                         "put cell bindings in sweep.bindings, sweep.axes or sweep.points")


def _check_duplicate_keys(path: Path) -> None:
    """gin builds dicts silently keeping the last of repeated keys; a repeated label is an error."""
    text, statements = _statements(path)
    lines = text.splitlines()
    starts = [s.location.line_num for s in statements] + [len(lines) + 1]
    for s, (a, b) in zip(statements, itertools.pairwise(starts)):
        try:
            tree = ast.parse("\n".join(lines[a - 1:b - 1]))
        except SyntaxError:
            continue  # gin-only syntax (@references, %macros): gin parsed it; nothing to compare
        for node in ast.walk(tree):
            if isinstance(node, ast.Dict):
                keys = [k.value for k in node.keys if isinstance(k, ast.Constant)]
                dup = next((k for k in keys if keys.count(k) > 1), None)
                if dup is not None:
                    raise SweepError(f"sweep file {path}, sweep.{s.arg_name}: duplicate label {dup!r}")


def _check_requires(requires, where: str) -> None:
    missing = []
    for item in requires:
        kind, _, name = str(item).partition(".")
        registry = ALL.get(kind)
        if registry is None:
            raise SweepError(f"{where}: sweep.requires entry {item!r} is not '<kind>.<name>' (kinds: {', '.join(ALL)})")
        if name not in registry.names():
            missing.append((item, kind, registry))
    if missing:
        kind, registry = missing[0][1], missing[0][2]
        raise SweepError(f"{where} needs plugins that are not installed: {', '.join(m[0] for m in missing)} "
                         f"(installed {kind}: {', '.join(registry.names()) or 'none'})")


def _check_calibrate(calibrate, where: str) -> dict[str, str]:
    """sweep.calibrate: {registered reducer: {keyword: value}}; the arguments as JSON (they hash into cells)."""
    if not isinstance(calibrate, dict):
        raise SweepError(f"{where}: sweep.calibrate must map reducer names to dicts of calibration arguments")
    out = {}
    for name, kwargs in calibrate.items():
        if name not in REDUCERS.names():
            raise SweepError(f"{where}: sweep.calibrate names reducer {name!r}, which is not installed "
                             f"(installed reducers: {', '.join(REDUCERS.names()) or 'none'})")
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise SweepError(f"{where}: sweep.calibrate[{name!r}] must be a dict of keyword arguments, got {kwargs!r}")
        out[name] = json.dumps(kwargs, sort_keys=True)
    return out


def _resolve_base(name: str, sweep_file: Path) -> Path:
    p = Path(name)
    candidates = [p] if p.is_absolute() else [PROJECT_ROOT / p, sweep_file.parent / p, Path.cwd() / p]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise SweepError(f"sweep file {sweep_file}: base file {name!r} not found "
                     f"(looked in: {', '.join(str(c.parent) for c in candidates)})")


def _check_axes(axes, points, where: str) -> dict:
    if not isinstance(axes, dict) or not isinstance(points, dict):
        raise SweepError(f"{where}: sweep.axes and sweep.points must be dicts of labelled binding lists")
    for axis, values in axes.items():
        if axis in RESERVED:
            raise SweepError(f"{where}: axis name {axis!r} is reserved ({', '.join(sorted(RESERVED))})")
        if not isinstance(values, dict):
            raise SweepError(f"{where}: axis {axis!r} must map labels to lists of bindings, "
                             f"got {type(values).__name__}")
        if not values:
            raise SweepError(f"{where}: axis {axis!r} has no values")
        for label, bindings in values.items():
            _check_bindings(bindings, f"{where}: axis {axis!r} value {label!r}")
    for label, bindings in points.items():
        _check_bindings(bindings, f"{where}: point {label!r}")
    if not axes and not points:
        raise SweepError(f"{where}: no cells (sweep.axes and sweep.points are both empty)")
    return axes


def _check_bindings(bindings, where: str) -> None:
    if not isinstance(bindings, (list, tuple)) or not all(isinstance(b, str) for b in bindings):
        raise SweepError(f"{where}: expected a list of gin binding strings, got {bindings!r}")


# --------------------------------------------------------------------------- expansion


def expand(base: list[Path], common, axes: dict, points: dict, seeds, reference, where: str,
           calibrate: dict[str, str] | None = None) -> list[Cell]:
    """Every grid combination (axes in file order), then the extra points, each crossed with the seeds."""
    combos = [tuple(zip(axes, values)) for values in itertools.product(*axes.values())] if axes else []
    combos += [(("point", label),) for label in points]
    if not seeds:
        raise SweepError(f"{where}: sweep.seeds is empty")
    cells = []
    for combo, seed in itertools.product(combos, seeds):
        labelled = []
        for axis, label in combo:
            values = points if axis == "point" else axes[axis]
            origin = f"point {label!r}" if axis == "point" else f"axis {axis!r} value {label!r}"
            labelled += [(b, origin) for b in values[label]]
        labelled += [(b, "sweep.bindings") for b in common]  # last: they hold over files an axis includes
        labelled.append((f"train.seed = {int(seed)}", "sweep.seeds"))
        cells.append(_cell(base, dict(combo) | {SEED_AXIS: int(seed)}, labelled, tuple(reference), where,
                           calibrate or {}))
    ids = [c.cell_id for c in cells]
    dup = next((c for c in cells if ids.count(c.cell_id) > 1), None)
    if dup is not None:
        twins = [c.label for c in cells if c.cell_id == dup.cell_id]
        raise SweepError(f"{where}: cells {twins} resolve to the same config (an axis value changes nothing)")
    return cells


def _cell(base, labels: dict, labelled: list[tuple[str, str]], reference: tuple, where: str,
          calibrate: dict[str, str]) -> Cell:
    training = [(b, o) for b, o in labelled if not is_sampling_binding(b)]
    sampling_only = [(b, o) for b, o in labelled if is_sampling_binding(b)]
    name = " · ".join(map(str, labels.values()))
    training_config, _ = _resolve(base, training, where, name)
    config, reducers = _resolve(base, training + sampling_only, where, name, check_plugins=True)
    calibrated = tuple((r, calibrate[r]) for r in reducers if r in calibrate)
    if reference:  # the reference samples: sweep.bindings' sampling part, then sweep.reference
        reference = tuple(b for b, o in sampling_only if o == "sweep.bindings") + reference
        reference_config, _ = _resolve(base, training + [(b, "sweep.reference") for b in reference], where, name,
                                       check_plugins=True)
    return Cell(labels, tuple(b for b, _ in training), tuple(b for b, _ in sampling_only), training_config, config,
                reference, identity(config, *reference, *(f"calibrate {r} {a}" for r, a in calibrated)),
                identity(training_config), calibrated,
                bool(reference) and _sampling(config) == _sampling(reference_config))


def _sampling(config: str) -> list[str]:
    """A resolved config without CellSettings (which sample the reference too: its seed and count)."""
    return [line for line in config.splitlines() if "CellSettings" not in line]


def _resolve(base, labelled, where: str, name: str, check_plugins: bool = False) -> tuple[str, list[str]]:
    """The resolved gin config of base files + bindings, and its reducers; errors name the binding's origin."""
    gin.clear_config()
    try:
        try:
            parse(base)
        except ConfigError as e:
            raise SweepError(f"{where}: base config: {_line(e)}") from e
        for binding, origin in labelled:
            try:
                parse([], [binding])
            except ConfigError as e:
                raise SweepError(f"{where}: {origin}: {_line(e)}") from e
        if check_plugins:
            try:
                check_plugin_names()
            except UnknownPluginError as e:
                raise SweepError(f"{where}: cell {name!r}: {e}") from e
        return gin.config_str(), [r for r in _query("DiffusionTransformer.reducers") or () if isinstance(r, str)]
    finally:
        gin.clear_config()


def _line(e: Exception) -> str:
    """gin's messages go on with the offending source; the first line names the problem."""
    return str(e).strip().splitlines()[0]


def check_plugin_names() -> None:
    """The registered names a parsed config refers to (tokenizer, reducers, sampler, dataset) exist."""
    for registry, key in ((TOKENIZERS, "DiffusionTransformer.tokenizer"), (SAMPLERS, "generate.sampler"),
                          (DATASETS, "train.dataset")):
        value = _query(key)
        if isinstance(value, str):
            registry.get(value)
    for reducer in _query("DiffusionTransformer.reducers") or ():
        if isinstance(reducer, str):
            REDUCERS.get(reducer)


def _query(key: str):
    try:
        return gin.query_parameter(key)
    except ValueError:
        return None


def is_sampling_binding(binding: str) -> bool:
    """True for bindings of sampling/evaluation configurables, reducer plugins and the reducer list,
    except those of trained reducers (`Reducer.trained`, e.g. DyDiT): their settings shape training."""
    target = binding.split("=", 1)[0].strip()
    if target.startswith("include") or "=" not in binding:
        return False
    target = target.rsplit("/", 1)[-1]  # drop a gin scope
    configurable, _, _ = target.rpartition(".")
    short = configurable.rsplit(".", 1)[-1]
    trained = [n for n in REDUCERS.names() if REDUCERS.get(n).trained]
    if short in trained or (target in SAMPLING_PARAMETERS and any(repr(n) in binding or f'"{n}"' in binding
                                                                  for n in trained)):
        return False
    return (target in SAMPLING_PARAMETERS or short in SAMPLING_CONFIGURABLES
            or configurable.startswith("reducers.") or short in REDUCERS.names())


def identity(*parts: str) -> str:
    """A short, stable hash of resolved configs: the folder name of a cell or training run."""
    return hashlib.sha256("\n\0\n".join(parts).encode()).hexdigest()[:12]
