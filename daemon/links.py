"""How the supervisor reaches its workers: the transport, and nothing else.

A `WorkerLink` carries the messages of daemon.messages to one worker and back and says when the
worker is gone; a `Launcher` starts workers and waits until one of them has news. The supervisor's
rules (queue, ledger, crashes, stalls) are the same whichever launcher it has: local processes
here, Ray actors in daemon.ray_links.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

from loguru import logger
from multiprocess.connection import wait as wait_any

from daemon import workerserver
from daemon.config import Settings
from daemon.messages import FromWorker, ToWorker, WorkerPaths
from daemon.worker import worker_main


class WorkerLink(Protocol):
    index: int

    def send(self, message: ToWorker) -> None: ...

    def receive(self) -> list[FromWorker]:
        """What the worker said since the last call, in order, without waiting."""

    def alive(self) -> bool: ...

    def death(self) -> str:
        """How it ended ("signal 9", "exit code 3", "actor died: …"); once it is not alive."""

    def stop_now(self) -> None:
        """Ask it to stop at once (SIGTERM); it may still say its last words."""

    def kill(self) -> None:
        """End it without a word (SIGKILL)."""

    def join(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for it to end."""

    def close(self) -> None:
        """Release what the link holds; the worker has ended."""


class Launcher(Protocol):
    def start(self, index: int, settings: Settings, paths: WorkerPaths) -> WorkerLink: ...

    def wait(self, links: list[WorkerLink], timeout: float, wake_fds: list[int]) -> None:
        """Return when a link may have news or has ended, a wake fd is readable, or after `timeout`."""

    def close(self) -> None: ...


class ProcessLink:
    """A worker process on this machine (forked from daemon.workerserver's server), and its pipe."""

    def __init__(self, index: int, process: Any, conn: Any) -> None:
        self.index = index
        self.process = process
        self.conn = conn

    def send(self, message: ToWorker) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(message)

    def receive(self) -> list[FromWorker]:
        messages: list[FromWorker] = []
        try:
            while self.conn.poll():
                messages.append(self.conn.recv())
        except (EOFError, OSError):
            pass  # it died; `alive` says so
        return messages

    def alive(self) -> bool:
        return bool(self.process.is_alive())

    def death(self) -> str:
        code = self.process.exitcode
        return f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"

    def stop_now(self) -> None:
        if self.process.is_alive():
            self.process.terminate()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()

    def join(self, timeout: float) -> None:
        self.process.join(timeout=timeout)

    def close(self) -> None:
        self.conn.close()


class ProcessLauncher:
    """Workers as processes on this machine, each with its own pipe."""

    def __init__(self) -> None:
        workerserver.start()  # if the run did not start it earlier
        self._ctx = workerserver.worker_context()

    def start(self, index: int, settings: Settings, paths: WorkerPaths) -> WorkerLink:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_main,
            args=(index, child, settings, paths),
            name=f"download_and_process-worker-{index}",
            daemon=False,
        )
        process.start()
        child.close()
        logger.info(f"started worker {index} (pid {process.pid})")
        return ProcessLink(index, process, parent)

    def wait(self, links: list[WorkerLink], timeout: float, wake_fds: list[int]) -> None:
        waitables: list[Any] = list(wake_fds)
        for link in links:
            assert isinstance(link, ProcessLink)
            waitables += [link.conn, link.process.sentinel]
        wait_any(waitables, timeout=timeout)

    def close(self) -> None:
        workerserver.stop()
