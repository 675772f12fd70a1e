"""Worker processes of a multi-process run: started through ignite.distributed, tied to their launcher,
and their expected errors brought back to it as one line.

Workers are forked from a fork server that has imported the framework once (``forkserver``: fork-safe
for CUDA and OpenMP, and no per-worker import of torch), or spawned where there is no fork server.
A launcher that is killed takes its workers with it (else "kill and run again" leaves two trainers
writing one run directory); a worker's `DyncomputeError` reaches the launcher as the same error.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from importlib.metadata import entry_points
from multiprocessing import forkserver

from . import errors as error_kinds
from .errors import DyncomputeError, UserError, one_line, quiet_libraries
from .registry import ENTRY_POINT_GROUP

# torch and ignite are imported where they are used: `start_method` runs before a launcher imports them

_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    """A TCP port free now, for the workers' rendezvous (ignite's fixed default collides between runs)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_method(preload=()) -> str:
    """``forkserver`` (preloading ``preload`` modules and the plugins) where the platform has one, else
    ``spawn``. The fork server starts now: its imports overlap with whatever the launcher does next."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    plugins = [ep.module for ep in entry_points(group=ENTRY_POINT_GROUP)]
    multiprocessing.set_forkserver_preload([*preload, *plugins])
    forkserver.ensure_running()
    return "forkserver"


def run(fn, args: tuple, backend: str, nproc_per_node: int) -> None:
    """``fn(local_rank, *args, launcher_pid, errors)`` on ``nproc_per_node`` processes; wrap its body in
    `worker`. A worker's expected error is raised here again, as the same kind with the same line."""
    import ignite.distributed as idist
    import torch.multiprocessing as mp

    method = start_method([fn.__module__])
    errors = mp.get_context(method).SimpleQueue()
    port = None if "MASTER_PORT" in os.environ else free_port()
    try:
        with idist.Parallel(backend=backend, nproc_per_node=nproc_per_node, master_port=port,
                            start_method=method) as parallel:
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
    import ignite.distributed as idist
    import torch

    if launcher_pid is not None:
        exit_with(launcher_pid)
    quiet_libraries()  # as in the CLI: an error reaches the launcher and is printed there, once
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: the node's cores shared, not oversubscribed
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // idist.get_nproc_per_node()))
    try:
        yield
    except DyncomputeError as e:
        if errors is None:
            raise
        errors.put((type(e).__name__ if hasattr(error_kinds, type(e).__name__) else "UserError", one_line(e)))
        sys.stderr.flush()
        os._exit(e.exit_status)  # skip interpreter teardown: the launcher is already stopping the others


def exit_with(launcher_pid: int) -> None:
    """Die when the launcher dies. On Linux the kernel kills this process when its parent (the launcher,
    or the fork server, which exits with the launcher) dies; everywhere a watcher thread checks both."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent == 1 or not _alive(launcher_pid):  # orphaned before the signal was set
        os._exit(1)
    threading.Thread(target=_watch, args=(parent, launcher_pid), daemon=True, name="exit-with-launcher").start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(parent: int, launcher_pid: int, every: float = 0.2) -> None:
    while os.getppid() == parent and _alive(launcher_pid):
        time.sleep(every)
    os._exit(1)


_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters


def tune_allocator() -> bool:
    """Keep freed tensor memory in this process's heap for reuse (glibc only; ``DYNCOMPUTE_MALLOC_TUNING=0``
    leaves the allocator alone).

    By default glibc hands every large (multi-MiB) CPU tensor its own fresh pages and returns them on
    free, so a loop that allocates and frees activations page-faults its way through them on every step;
    step caches (TaylorSeer's forecasts) made that ~20% of a sampling call here. Tensors up to 32 MiB are
    then served from the heap, and the heap keeps up to 1 GiB of freed memory. Returns whether it applied.
    """
    if os.environ.get("DYNCOMPUTE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        settings = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20))
        return all(libc.mallopt(param, value) == 1 for param, value in settings)
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False

