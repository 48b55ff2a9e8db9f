"""Workers as Ray actors: the same worker, on any machine of a Ray cluster (`run.backend = "ray"`).

The supervisor stays the driver and keeps the queue, the ledger and every rule; only the transport
changes. One actor per worker runs a whole URL (download, decode, stages, encode, delete) in one
call, `handle`, which streams the worker's messages back as it goes; frames never leave the actor.
One URL is in flight per actor. Actors are never restarted and their calls never retried by Ray
(`max_restarts = 0`, `max_task_retries = 0`): a URL must not run twice behind the ledger's back. An
actor that dies, or whose node does, counts as a worker crash under the supervisor's usual rules.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loguru import logger

from daemon.budget import CpuBudget
from daemon.config import Settings
from daemon.extras import require
from daemon.gpu.slots import slot_group_name
from daemon.messages import Assign, FromWorker, Ready, Stop, Task, ToWorker, WorkerPaths
from daemon.worker import start_worker

# How often the driver looks at its wake-up fds while it waits on the actors.
_POLL_SECONDS = 0.05
# An idle actor is asked to answer this often, so that its death is seen before a URL is given to it.
_WATCH_SECONDS = 10.0
# A worker not yet placed on a node after this long is reported (once): no node may have room for it.
_UNPLACED_SECONDS = 60.0


def import_ray() -> Any:
    require("ray", 'run.backend = "ray"', "ray")
    import ray

    return ray


class _Mailbox:
    """The worker's channel inside an actor: what it says is kept until `handle` streams it out."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outbox: list[FromWorker] = []
        self.stop_requested = threading.Event()
        self._stop_delivered = False

    def send(self, message: FromWorker) -> None:
        with self._lock:
            self._outbox.append(message)

    def take(self) -> list[FromWorker]:
        with self._lock:
            taken, self._outbox = self._outbox, []
        return taken

    def poll(self) -> bool:
        return self.stop_requested.is_set() and not self._stop_delivered

    def recv(self) -> ToWorker:
        self._stop_delivered = True
        return Stop()


class WorkerActor:
    """One worker in a Ray actor; made a Ray actor class by RayLauncher."""

    def __init__(self, index: int, settings: Settings, paths: WorkerPaths) -> None:
        self.mailbox = _Mailbox()
        # Its CPUs are the ones it asked Ray for, whatever the node it landed on has.
        self.worker = start_worker(index, self.mailbox, settings, paths, CpuBudget.of_ray_actor(settings))
        self.node = socket.gethostname()
        logger.info(f"worker {index} ready as a Ray actor (pid {os.getpid()} on {self.node})")

    def node_name(self) -> str:
        """The machine it runs on; answered once the actor is constructed."""
        return self.node

    def handle(self, task: Task) -> Iterator[list[FromWorker]]:
        """Runs the URL on a thread of its own and streams what the worker says, in order."""
        done = threading.Event()

        def run() -> None:
            try:
                with logger.contextualize(video_id=task.video_id):
                    self.worker.handle(task)
            finally:
                done.set()

        thread = threading.Thread(target=run, name="url", daemon=True)
        thread.start()
        while not done.wait(0.2):
            said = self.mailbox.take()
            if said:
                yield said
        thread.join()
        yield self.mailbox.take()  # the last words: the URL's result among them

    def stop(self) -> None:
        """Finish the clips in progress, then end the URL early (it stays pending)."""
        self.mailbox.stop_requested.set()

    def watch(self, seconds: float) -> None:
        """Answers after `seconds`: while idle, the driver keeps one of these calls open, and a
        failed one tells it the actor (or its node) is gone."""
        time.sleep(seconds)


class RayLink:
    """The driver's side of one worker actor."""

    def __init__(self, index: int, actor: Any, ray: Any) -> None:
        self.index = index
        self._actor = actor
        self._ray = ray
        self._ready: Any = actor.node_name.remote()  # answered once the actor is constructed
        self._unplaced_since: float | None = time.monotonic()  # None once placed, or once reported
        self._stream: Any = None  # the URL in flight: a stream of message batches
        self._watch: Any = None  # while idle: a call that fails if the actor dies
        self._inbox: list[FromWorker] = []
        self._node = ""
        self._stop_sent = False
        self._death: str | None = None

    def pending(self) -> list[Any]:
        return [ref for ref in (self._ready, self._stream, self._watch) if ref is not None]

    def send(self, message: ToWorker) -> None:
        if self._death is not None:
            return
        match message:
            case Assign(task=task):
                self._stream = self._actor.handle.options(num_returns="streaming").remote(task)
            case Stop():
                self._stop_sent = True
                if self._stream is None:
                    self._end("stopped")
                else:
                    self._actor.stop.remote()

    def receive(self) -> list[FromWorker]:
        self._pump()
        said, self._inbox = self._inbox, []
        return said

    def _pump(self) -> None:
        """Moves whatever the actor has said into the inbox, without waiting."""
        ray = self._ray
        if self._ready is not None and ray.wait([self._ready], timeout=0)[0]:
            try:
                self._node = ray.get(self._ready)
                self._ready_now()
            except ray.exceptions.RayError as exc:
                self._end(f"cannot start: {_reason(exc)}")
            self._ready = self._unplaced_since = None
        elif self._unplaced_since is not None and time.monotonic() - self._unplaced_since > _UNPLACED_SECONDS:
            logger.warning(
                f"worker {self.index} is not placed on any Ray node after {_UNPLACED_SECONDS:g}s: "
                "no node may have the CPUs it asks for (run.ray_worker_cpus); it waits"
            )
            self._unplaced_since = None  # said once
        if self._watch is not None and ray.wait([self._watch], timeout=0)[0]:
            try:
                ray.get(self._watch)
                self._watch = None
                self._ready_now(again=True)
            except ray.exceptions.RayError as exc:
                self._watch = None
                self._end(f"actor died: {_reason(exc)}")
        while self._stream is not None and ray.wait([self._stream], timeout=0)[0]:
            try:
                self._inbox.extend(ray.get(next(self._stream)))
            except StopIteration:
                self._stream = None
                if self._stop_sent:
                    self._end("stopped")
                else:
                    self._ready_now()
            except ray.exceptions.RayError as exc:
                self._stream = None
                self._end(f"actor died: {_reason(exc)}")

    def _ready_now(self, again: bool = False) -> None:
        """Idle: asks for a URL (unless only the watch came back) and keeps a watch open."""
        if self._death is not None or self._stream is not None:
            return
        if not again:
            self._inbox.append(Ready(node=self._node))
        self._watch = self._actor.watch.remote(_WATCH_SECONDS)

    def _end(self, how: str) -> None:
        if self._death is not None:
            return
        self._death = how
        self._ray.kill(self._actor, no_restart=True)
        # A slot the actor held is not given back by Ray while this driver lives: given back here.
        from ray.util.placement_group import get_placement_group, remove_placement_group

        name = slot_group_name(self._actor._actor_id.hex())
        for _ in range(3):  # at most one at a time; a few tries for one being made as it died
            try:
                remove_placement_group(get_placement_group(name))
            except ValueError:
                break  # none by that name

    def alive(self) -> bool:
        return self._death is None

    def death(self) -> str:
        return self._death or "alive"

    def stop_now(self) -> None:
        self._pump()  # what it already said is kept
        self._end("stopped at once")

    def kill(self) -> None:
        self._end("killed")

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._death is None and time.monotonic() < deadline:
            pending = self.pending()
            if not pending:
                return
            self._ray.wait(pending, num_returns=1, timeout=min(0.2, max(0.0, deadline - time.monotonic())))
            self._pump()

    def close(self) -> None:
        self._end("closed")


def _reason(exc: BaseException) -> str:
    """The first line that says something: Ray's errors carry the cause after a preamble."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    cause = next((line for line in reversed(lines) if "Error" in line or "error" in line), None)
    return (cause or (lines[0] if lines else type(exc).__name__))[:300]


class RayLauncher:
    """Starts worker actors on the Ray cluster at run.ray_address, or on a Ray instance it starts."""

    def __init__(self, settings: Settings) -> None:
        ray = import_ray()
        self._ray = ray
        self._owned = False
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        address = settings.run.ray_address or None
        # Workers import this package: from an install, or from this checkout when it runs from one.
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
        env = {"PYTHONPATH": path, "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2")}
        if not ray.is_initialized():
            options: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,  # workers write their own log files
                "runtime_env": {"env_vars": env},
            }
            if address is None:
                # Nothing large goes through the object store: messages only, never frames.
                options["object_store_memory"] = 100 * 2**20
            ray.init(address=address, **options)
            self._owned = True
        resources = ray.cluster_resources()
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        logger.info(
            f"Ray: {address or 'a local instance'}; {nodes} node(s), {resources.get('CPU', 0):g} CPU(s), "
            f"{resources.get('GPU', 0):g} GPU(s)"
        )
        self._actor_class = ray.remote(WorkerActor)

    def start(self, index: int, settings: Settings, paths: WorkerPaths) -> RayLink:
        cpus = settings.run.ray_worker_cpus  # the actor shares them out itself (daemon.budget)
        actor = self._actor_class.options(
            num_cpus=cpus,
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=3,  # `stop` and `watch` must reach it while `handle` runs
            name=f"download_and_process-worker-{index}-{os.getpid()}-{time.monotonic_ns()}",
        ).remote(index, settings, paths)
        logger.info(f"started worker {index} (Ray actor)")
        return RayLink(index, actor, self._ray)

    def wait(self, links: list[Any], timeout: float, wake_fds: list[int]) -> None:
        deadline = time.monotonic() + timeout
        while True:
            pending = [ref for link in links for ref in link.pending()]
            remaining = deadline - time.monotonic()
            step = max(0.0, min(_POLL_SECONDS, remaining))
            if pending and self._ray.wait(pending, num_returns=1, timeout=step)[0]:
                return
            if wake_fds and select.select(wake_fds, [], [], 0 if pending else step)[0]:
                return
            if not pending and not wake_fds:
                time.sleep(step)
            if time.monotonic() >= deadline or any(not link.alive() for link in links):
                return

    def close(self) -> None:
        if self._owned:
            # Flushed first: Ray's shutdown can take the driver's stderr lines with it.
            sys.stderr.flush()
            self._ray.shutdown()
