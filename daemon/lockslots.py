"""Slots held as exclusive `flock`s on files, one file a slot: the GPU's slots and the processing
slots of a run's workers.

The kernel drops a lock when the holding process ends for any reason, SIGKILL included, so a dead
worker never keeps a slot; there is no counter that could leak.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from loguru import logger


class LockSlots:
    """`count` slots, the files `<folder>/<prefix>-<k>.lock`."""

    def __init__(self, folder: Path, prefix: str, count: int) -> None:
        self.folder = folder
        self.prefix = prefix
        self.count = count
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, index: int) -> Path:
        return self.folder / f"{self.prefix}-{index}.lock"

    def _lock(self, index: int) -> int | None:
        fd = os.open(self.path(index), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def try_take(self) -> tuple[int, int] | None:
        """(slot index, open fd holding its lock), or None when every slot is held."""
        for index in range(self.count):
            fd = self._lock(index)
            if fd is not None:
                # Only for people looking at the files: who holds it. The lock is what counts, so a
                # write that fails (a full disk) must not keep the lock from being handed back.
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                return index, fd
        return None

    def busy(self) -> int:
        """How many slots are held right now (by anyone, this process included)."""
        held = 0
        for index in range(self.count):
            fd = self._lock(index)
            if fd is None:
                held += 1
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        return held

    @staticmethod
    def give_back(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class ProcessingSlots:
    """At most `count` of a run's workers process (decode, run the stages, encode) at once; the
    others download meanwhile. A worker that has its source waits here for a slot, polling, since
    a core left idle while a source waits costs more than the polling."""

    POLL_SECONDS = 0.05

    def __init__(self, folder: Path, count: int, sleep: Callable[[float], None] = time.sleep) -> None:
        self.slots = LockSlots(folder, "processing-slot", count)
        self._sleep = sleep
        self._held: int | None = None  # the lock of the slot this process holds

    @property
    def count(self) -> int:
        return self.slots.count

    def busy(self) -> int:
        """How many of the slots are held now, this process's included."""
        return self.slots.busy()

    @contextlib.contextmanager
    def hold(
        self,
        what: str,
        on_wait: Callable[[float], None] | None = None,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Iterator[int | None]:
        """Holds a slot for the body; yields how many slots were held when it was taken (this one
        included): the processing workers that share the cores from then on. Tells `on_wait`, about
        once a second, that the wait is deliberate (the stall watchdog must not take it for one),
        and says in the log, once a minute, that it still waits. A stop asked for while waiting
        ends the wait without a slot: the body gets None and must cut nothing."""
        started = time.monotonic()
        fd = self._wait(what, on_wait, should_stop)
        waited = time.monotonic() - started
        if fd is None:
            logger.info(f"stopped while waiting {waited:.1f}s for a processing slot for {what}")
            yield None
            return
        if waited >= 1:
            logger.info(f"got a processing slot for {what} after waiting {waited:.1f}s")
        self._held = fd
        try:
            yield self.slots.busy()
        finally:
            if self._held is not None:
                self.slots.give_back(self._held)
                self._held = None

    @contextlib.contextmanager
    def lent(self, what: str, on_wait: Callable[[float], None] | None = None) -> Iterator[None]:
        """The slot `hold` holds goes back for the body (its holder waits for something else and
        burns no CPU meanwhile), and a slot is taken again after, waiting as `hold` does but with
        no stop: the holder is in the middle of a source. When the body raises, no slot is taken
        again: the holder is on its way out."""
        fd, self._held = self._held, None
        if fd is None:
            yield
            return
        self.slots.give_back(fd)
        yield
        started = time.monotonic()
        self._held = self._wait(what, on_wait, lambda: False)
        waited = time.monotonic() - started
        if waited >= 1:
            logger.debug(f"took a processing slot back for {what} after waiting {waited:.1f}s")

    def _wait(
        self, what: str, on_wait: Callable[[float], None] | None, should_stop: Callable[[], bool]
    ) -> int | None:
        """A slot's lock (its fd) once one is free, or None if a stop came first."""
        started = time.monotonic()
        tell_at, say_at = 0.0, 60.0  # seconds into the wait
        taken = self.slots.try_take()
        while taken is None and not should_stop():
            waited = time.monotonic() - started
            if waited >= tell_at:
                if on_wait is not None:
                    on_wait(2.0)
                tell_at = waited + 1.0
            if waited >= say_at:
                say_at = waited + 60.0
                logger.info(
                    f"waiting for a processing slot for {what}: all {self.count} busy for {waited:.0f}s"
                )
            self._sleep(self.POLL_SECONDS)
            taken = self.slots.try_take()
        return None if taken is None else taken[1]
