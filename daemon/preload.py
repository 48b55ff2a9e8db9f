"""Imported once, in the process local workers are forked from (daemon.links): what every worker
loads before its first URL, loaded there instead of in each worker.

A spawned worker spent about 0.4 CPU-seconds importing the pipeline and, at its first URL, about
0.4 more in yt-dlp, which compiles the URL pattern of each of its ~1,900 extractors until one
matches (a URL no site claims goes through all of them to the generic one). Done once here, a
forked worker has them at no cost. Nothing here touches a GPU: CUDA must not be started in a
process that forks.
"""

from __future__ import annotations

import atexit
import importlib
import signal

# Loaded here in this order: yt-dlp with its networking (a worker's first URL), then the worker's
# own modules (PyAV, numpy, loguru, the cutter).
MODULES = ("yt_dlp", "yt_dlp.networking", "daemon.worker")


def _outlive_group_signals() -> None:
    """The server outlives no run (it ends when the supervisor does), but a signal to the whole
    process group (the hang-up of a closed terminal, `kill` of a session) must not end it before:
    the supervisor learns through it how each worker ended. Forked workers set their own."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _compile_extractor_patterns() -> None:
    from yt_dlp.extractor import gen_extractor_classes

    for extractor in gen_extractor_classes():
        # Compiles and keeps the class's URL pattern; the URL itself matters not.
        extractor.suitable("https://example.invalid/video")


def _end_without_teardown() -> None:
    """The server ends when its run closes it, at the end of every run and after its last clip:
    freeing what was loaded here took it 0.17 s, which the run waited for. Nothing in it is left to
    save, so it leaves at once: after the exit handlers registered later (those run first), before
    those registered earlier (multiprocessing's own, which have nothing of the server's to do).
    Workers forked from it never run this: each ends with os._exit."""
    from daemon.logs import close_and_leave  # here: after the signals are set

    atexit.register(close_and_leave)


_outlive_group_signals()  # first, before the second or so the rest takes
_end_without_teardown()
for name in MODULES:
    importlib.import_module(name)
_compile_extractor_patterns()
