"""Worker processes of a multi-process run: started through ignite.distributed, tied to their launcher,
and their expected errors brought back to it as one line.

A launcher that is killed takes its workers with it (else "kill and run again" leaves two trainers
writing one run directory); a worker's `DyncomputeError` reaches the launcher as the same error.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import time

import ignite.distributed as idist
import torch.multiprocessing as mp

from . import errors as error_kinds
from .errors import DyncomputeError, UserError, one_line

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port free now, for the workers' rendezvous (ignite's fixed default collides between runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(fn, args: tuple, backend: str, nproc_per_node: int) -> None:
    """``fn(local_rank, *args, launcher_pid, errors)`` on ``nproc_per_node`` spawned processes; wrap its
    body in `worker`. A worker's expected error is raised here again, as the same kind with the same line."""
    errors = mp.get_context("spawn").SimpleQueue()
    port = None if "MASTER_PORT" in os.environ else free_port()
    try:
        with idist.Parallel(backend=backend, nproc_per_node=nproc_per_node, master_port=port) as parallel:
            parallel.run(fn, *args, os.getpid(), errors)
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        if errors.empty():
            raise
        name, message = errors.get()
        raise getattr(error_kinds, name, UserError)(message) from None


@contextlib.contextmanager
def worker(launcher_pid: int | None, errors=None):
    """The body of a spawned worker: it exits when its launcher dies, and an expected error goes to the
    launcher as one line (this process then exits with the error's status, without a traceback)."""
    if launcher_pid is not None:
        exit_with(launcher_pid)
    try:
        yield
    except DyncomputeError as e:
        if errors is None:
            raise
        errors.put((type(e).__name__ if hasattr(error_kinds, type(e).__name__) else "UserError", one_line(e)))
        sys.stderr.flush()
        os._exit(e.exit_status)  # skip interpreter teardown: the launcher is already stopping the others


def exit_with(parent_pid: int) -> None:
    """Die when ``parent_pid`` (the launcher) dies: the kernel's parent-death signal on Linux, and a
    watcher thread everywhere (it also covers a parent that died before the signal was set)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid,), daemon=True, name="exit-with-launcher").start()


def _watch(parent_pid: int, every: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(every)
    os._exit(1)
