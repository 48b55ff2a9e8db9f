"""Signals that stop a run or the service: SIGTERM, SIGINT and SIGHUP (a closed terminal or SSH
session) stop it the same way: in-flight clips finish, then the workers stop and their downloads
are removed. A second signal stops at once."""

from __future__ import annotations

import os
import signal
from typing import Any, Protocol

from loguru import logger


class Stoppable(Protocol):
    draining: bool

    def request_stop(self, urgent: bool = False) -> None: ...


def install_signal_handlers(target: Stoppable) -> None:
    # Known now: once the terminal hangs up, isatty() on it fails too.
    terminal_fds = [fd for fd in (1, 2) if os.isatty(fd)]

    def detach_hung_up_terminal() -> None:
        # Writes to a hung-up terminal fail (EIO): what was the terminal goes to /dev/null from here
        # on, so the stop goes on quietly and the log file still gets every line.
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            for fd in terminal_fds:
                os.dup2(devnull, fd)
        finally:
            os.close(devnull)

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            detach_hung_up_terminal()
        if target.draining:
            logger.warning(f"{name} again: stopping at once")
            target.request_stop(urgent=True)
        else:
            logger.warning(f"{name}: finishing in-flight clips, then stopping (send again to stop at once)")
            target.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, handler)
