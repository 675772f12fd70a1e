"""The errors a user can cause, and the exit status the command line gives each.

A `DyncomputeError` is an expected failure with a one-line message that says what to change: the CLI
prints that line and exits with the error's status (2: bad input; 3: training or sampling diverged).
Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import re


class DyncomputeError(Exception):
    """An expected failure: ``str(error)`` is one line naming the file, binding or value at fault."""

    exit_status = 2


class UserError(DyncomputeError, ValueError):
    """Bad input: a config value, a file, a command-line argument."""


class ConfigError(UserError):
    """A gin file, binding or configuration value that cannot be used."""


class DataError(UserError):
    """A dataset file or folder that cannot be read as the configured data."""


class CheckpointError(UserError):
    """A checkpoint file that cannot be used: unreadable, incomplete or holding non-finite weights."""


class RunDirError(UserError):
    """A run directory that cannot be used as asked (a file, in use, trained with another config)."""


class Diverged(DyncomputeError, RuntimeError):
    """Training or sampling produced non-finite numbers; nothing non-finite was saved."""

    exit_status = 3


def one_line(error: BaseException) -> str:
    """The error's own message on one line.

    gin appends "In call to configurable ..." lines, and a DataLoader worker re-raises with the worker's
    traceback as the message; both keep the original message in a known place.
    """
    text = str(error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    if "Original Traceback" in text:  # DataLoader worker: the last line is "module.Class: message"
        match = re.fullmatch(r"[\w.]+: (.*)", lines[-1].strip())
        return match.group(1) if match else lines[-1].strip()
    return lines[0]


# Library loggers that narrate a launch or repeat an error that is raised anyway: the command line
# prints an error once, as one line.
_QUIET = {
    "ignite": logging.WARNING,
    "ignite.distributed.launcher.Parallel": logging.WARNING,  # ignite keeps a logger made before its own
    "ignite.distributed.auto.auto_model": logging.WARNING,
    "ignite.engine.engine.Engine": logging.CRITICAL,  # logs the exception it re-raises
    "torch.multiprocessing.spawn": logging.ERROR,  # "terminating process ..." after a worker failed
}


def quiet_libraries() -> None:
    for name, level in _QUIET.items():
        logging.getLogger(name).setLevel(level)
