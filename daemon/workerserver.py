"""Where local worker processes come from: forked from a server process that loaded, once, what
every worker runs (daemon.preload), instead of each worker spawned afresh and loading it again.

The server is a fresh interpreter (nothing CUDA-related is ever started in it, so a fork of it
holds nothing of a GPU), started as early as a run knows it will have local workers, so that it
loads on another core while the supervisor starts. A worker forked from it is ready in
milliseconds. It ends with the run (`stop`), or by itself once the supervisor is gone.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import multiprocess as mp
from multiprocess import forkserver

PRELOAD = ["daemon.preload"]


def worker_context() -> Any:
    """The multiprocessing context local workers start in."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def start() -> None:
    """Starts the server now, if it is not running (it loads what workers need meanwhile)."""
    # Frames are made on the decoding thread and freed on clip threads; glibc's default of an arena
    # per thread then keeps ~50 MB more resident per worker (measured). glibc reads it once, when
    # the server starts, and forks keep it; a value the user set is kept.
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    worker_context()
    forkserver.ensure_running()


def stop() -> None:
    """Ends the server and waits for it: its workers' CPU time then counts as the run's, and no
    process is left behind. Every worker has ended before (the fleet joined them)."""
    with contextlib.suppress(Exception):
        forkserver._forkserver._stop()  # noqa: SLF001 - the module's own way to end its server
