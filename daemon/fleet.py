"""The fleet: the worker processes (or Ray actors) of a run, started staggered, watched for stalls,
stopped and cleaned up after. What they are given and what their messages mean is the supervisor's.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from loguru import logger

from daemon.budget import processing_workers
from daemon.config import Settings, gpu_usable
from daemon.failures import Failure
from daemon.folders import RunPaths
from daemon.links import Launcher, ProcessLauncher, WorkerLink
from daemon.messages import FromWorker, SpareConnection, Stop, Task, WorkerPaths


@dataclass
class WorkerHandle:
    index: int
    link: WorkerLink
    task: Task | None = None
    idle: bool = False
    phase: str = "starting"  # what it is doing: starting, queued, download, process
    stop_sent: bool = False
    # Watchdog: when the worker last showed progress, and how long it said it would wait on purpose.
    last_progress: float = field(default_factory=time.monotonic)
    announced_wait: float = 0.0
    stalled: str | None = None  # why the watchdog killed it
    ready_seen: bool = False  # asked for work at least once
    node: str = ""  # the machine it runs on, as it said when ready
    # The task's clips settled in this try (made, or impossible), and those that failed for a
    # passing reason: what is left of the task if it has to be tried again.
    settled: set[tuple[int, int]] = field(default_factory=set)
    clip_failures: list[Failure] = field(default_factory=list)
    download_bytes_left: int | None = None  # as its last heartbeat said; None: not downloading
    connection_lent: bool = False  # an idle worker's connection was offered to its download

    def take(self, task: Task) -> None:
        self.task, self.idle, self.phase = task, False, "queued"
        self.settled, self.clip_failures = set(), []
        self.download_bytes_left, self.connection_lent = None, False
        self.last_progress, self.announced_wait = time.monotonic(), 0.0

    def stop(self) -> None:
        """Finish the clips in progress, then exit (asked once)."""
        if not self.stop_sent:
            self.stop_sent = True
            self.link.send(Stop())


def start_launcher(settings: Settings) -> Launcher:
    """Local worker processes, or Ray actors on the cluster run.ray_address names."""
    if settings.run.backend == "ray":
        from daemon.ray_links import RayLauncher

        return RayLauncher(settings)
    return ProcessLauncher()


class Fleet:
    def __init__(self, settings: Settings, paths: RunPaths) -> None:
        self.settings = settings
        self.paths = paths
        self.workers: dict[int, WorkerHandle] = {}
        self.launcher: Launcher | None = None  # started by `open`
        self._started_at = time.monotonic()
        self._cutting_seen = False  # a worker has begun cutting: the downloaders may start
        # Workers wait for processing slots only on the CPU path of local workers; on a GPU the
        # GPU's slots say who goes, and a Ray actor has the CPUs it asked for.
        on_gpu = gpu_usable(settings.encode.codec)
        self.cutters = (
            settings.run.workers if settings.run.backend == "ray" or on_gpu else processing_workers(settings)
        )

    def open(self) -> None:
        self.launcher = start_launcher(self.settings)

    def close(self) -> None:
        if self.launcher is not None:
            self.launcher.close()

    def __iter__(self) -> Iterator[WorkerHandle]:
        return iter(list(self.workers.values()))

    def __bool__(self) -> bool:
        return bool(self.workers)

    @property
    def busy(self) -> bool:
        return any(handle.task is not None for handle in self.workers.values())

    @property
    def running(self) -> int:
        return sum(1 for handle in self.workers.values() if handle.task is not None)

    def start(self, index: int) -> None:
        assert self.launcher is not None
        paths = WorkerPaths(
            output_dir=str(self.paths.output_dir),
            temp_dir=str(self.paths.worker_temp(index)),
            log_dir=str(self.paths.log_dir),
            slot_dir=str(self.paths.slot_dir),
        )
        self.workers[index] = WorkerHandle(index, self.launcher.start(index, self.settings, paths))

    def start_due(self, waiting: int, downloads_waiting: bool) -> None:
        """Workers whose start is due: staggered, so they do not hit the same site at the same
        moment; the first at once, the others only for URLs no worker already started will take
        (`waiting`: URLs ready now). Local workers beyond the processing slots only ever download
        while others cut: they start only while a URL to download waits, and once a worker is
        cutting (until then they would only share the first downloads' bandwidth, and the cores
        would wait longer for a first source)."""
        elapsed = time.monotonic() - self._started_at
        run = self.settings.run
        free = sum(1 for handle in self.workers.values() if handle.task is None)  # starting or idle
        for index in range(run.workers):
            if index in self.workers or elapsed < index * run.start_delay:
                continue
            wanted = index == 0 or waiting > free
            if index >= self.cutters:
                wanted = wanted and downloads_waiting and self._cutting_seen
            if wanted:
                self.start(index)
                free += 1

    def lend_idle_connections(self) -> None:
        """When no URL waits, each idle worker's connection goes to a download in flight, the one
        with the most bytes left first, for the back part of its file (daemon.backpart): the end
        of a list then does not wait on one paced connection while the link has room. One extra
        connection per download at most, and never more connections than workers."""
        least_bytes = self.settings.download.spare_connection_min_mb * 1024 * 1024
        if not least_bytes:
            return
        handles = list(self.workers.values())
        idle = sum(1 for handle in handles if handle.idle)
        lent = sum(1 for handle in handles if handle.connection_lent and handle.download_bytes_left)
        wanting = sorted(
            (
                handle
                for handle in handles
                if handle.task is not None
                and not handle.connection_lent
                and (handle.download_bytes_left or 0) >= least_bytes
            ),
            key=lambda handle: -(handle.download_bytes_left or 0),
        )
        for handle in wanting[: max(0, idle - lent)]:
            handle.connection_lent = True
            handle.link.send(SpareConnection())
            logger.info(
                f"no URL waits and {idle} worker(s) idle: worker {handle.index} may fetch the rest of "
                f"its download ({(handle.download_bytes_left or 0) / 1e6:.1f} MB) on a second connection"
            )

    def cutting_began(self) -> None:
        """A worker said it is cutting: from now on the workers that only download may start."""
        self._cutting_seen = True

    def wait(self, timeout: float, wake_fds: list[int]) -> None:
        """Until a worker says something, a wake descriptor is ready, or `timeout` seconds."""
        assert self.launcher is not None
        self.launcher.wait([handle.link for handle in self.workers.values()], timeout, wake_fds)

    def receive(self, handle: WorkerHandle, on_message: Callable[[WorkerHandle, FromWorker], None]) -> None:
        for message in handle.link.receive():
            # Every message is a sign of life.
            handle.last_progress = time.monotonic()
            on_message(handle, message)

    def forget(self, handle: WorkerHandle) -> str:
        """A worker that died: out of the fleet, its temp folder removed; returns how it died."""
        del self.workers[handle.index]
        how = handle.link.death()
        handle.link.close()
        shutil.rmtree(self.paths.worker_temp(handle.index), ignore_errors=True)
        return how

    def kill_stalled(self) -> None:
        """Defence in depth: a worker with work and no sign of life for run.stall_seconds (beyond
        a wait it announced) is killed; its death is then handled like a crash, with the stall as
        the reason."""
        limit = self.settings.run.stall_seconds
        if not limit:
            return
        now = time.monotonic()
        for handle in self.workers.values():
            if handle.task is None or handle.stalled or not handle.link.alive():
                continue
            if now - handle.last_progress <= limit + handle.announced_wait:
                continue
            handle.stalled = f"stalled: no progress for {limit:g} s in {handle.phase}"
            logger.error(f"worker {handle.index} {handle.stalled} on {handle.task.url}; killing it")
            handle.link.kill()

    def stop_all(self, force: bool, on_stopped: Callable[[WorkerHandle], None]) -> None:
        """Every worker stops (at once with `force`, else after its clips in progress; killed if it
        has not within seconds); `on_stopped` reads what each said last."""
        for handle in self.workers.values():
            if force:
                handle.link.stop_now()
            else:
                handle.stop()
        deadline = time.monotonic() + (10 if not force else 5)
        for handle in self.workers.values():
            handle.link.join(timeout=max(0.1, deadline - time.monotonic()))
            if handle.link.alive():
                handle.link.kill()
                handle.link.join(timeout=5)
            on_stopped(handle)
            handle.link.close()
            shutil.rmtree(self.paths.worker_temp(handle.index), ignore_errors=True)
        self.workers.clear()
