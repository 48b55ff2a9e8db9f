"""GPU slots: at most `max_gpu_jobs` processes use one device at a time, across every worker and run.

A slot is an exclusive `flock` on its own file, `<slot dir>/gpu-<device>-slot-<k>.lock`
(daemon.lockslots): a dead worker never keeps one.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from daemon.lockslots import LockSlots

if TYPE_CHECKING:
    from daemon.config import Settings


def slot_dir(settings: Settings) -> Path:
    """Where the slot files live: gpu.slot_dir, else one folder in the temp dir for every run."""
    if settings.gpu.slot_dir:
        return Path(settings.gpu.slot_dir).expanduser()
    return Path(tempfile.gettempdir()) / "download_and_process-gpu"


def free_memory_mb(device_id: int) -> float | None:
    """Free memory on the device as NVML reports it (all processes counted), or None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_id)
            return float(pynvml.nvmlDeviceGetMemoryInfo(handle).free) / 2**20
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no library, no driver, no device: the check is skipped
        return None


class GpuSlots:
    """Hands out one of `count` slots of a device; `hold()` waits, with backoff, until one is free."""

    def __init__(
        self,
        slot_dir: Path,
        device_id: int,
        count: int,
        wait_initial_seconds: float = 1.0,
        wait_max_seconds: float = 30.0,
        min_free_memory_mb: float = 0.0,
        free_memory: Callable[[int], float | None] = free_memory_mb,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.slot_dir = slot_dir
        self.device_id = device_id
        self.count = count
        self.wait_initial_seconds = wait_initial_seconds
        self.wait_max_seconds = wait_max_seconds
        self.min_free_memory_mb = min_free_memory_mb
        self._free_memory = free_memory
        self._sleep = sleep
        self.slots = LockSlots(slot_dir, f"gpu-{device_id}-slot", count)

    def path(self, index: int) -> Path:
        return self.slots.path(index)

    def try_take(self) -> tuple[int, int] | None:
        """(slot index, open fd holding its lock), or None when every slot is held."""
        return self.slots.try_take()

    def _memory_short(self) -> str:
        if self.min_free_memory_mb <= 0:
            return ""
        free = self._free_memory(self.device_id)
        if free is None or free >= self.min_free_memory_mb:
            return ""
        return f"{free:.0f} MiB free, {self.min_free_memory_mb:.0f} MiB wanted"

    @contextlib.contextmanager
    def hold(self, what: str = "GPU work", on_wait: Callable[[float], None] | None = None) -> Iterator[int]:
        """Hold a slot for the body of the `with`; yields its index. Waits while none is free,
        telling `on_wait` how long each wait will be (a watchdog must not take it for a stall)."""
        started = time.monotonic()
        delay = self.wait_initial_seconds
        waits = 0
        while True:
            short = self._memory_short()
            taken = None if short else self.try_take()
            if taken is not None:
                break
            why = short or f"all {self.count} slot(s) of GPU {self.device_id} are busy"
            if waits == 0:
                logger.info(f"waiting for a GPU slot for {what}: {why}")
            waits += 1
            if on_wait is not None:
                on_wait(delay)
            self._sleep(delay)
            delay = min(max(delay * 2, 0.01), self.wait_max_seconds)
        index, fd = taken
        waited = time.monotonic() - started
        if waits:
            logger.info(f"got GPU {self.device_id} slot {index} for {what} after waiting {waited:.1f}s")
        else:
            logger.debug(f"got GPU {self.device_id} slot {index} for {what}")
        try:
            yield index
        finally:
            LockSlots.give_back(fd)


def slot_group_name(actor_id: str) -> str:
    """The name of the placement group an actor holds as its slot."""
    return f"download_and_process-slot-{actor_id}"


class RaySlots:
    """Slots as Ray resources: the cluster's scheduler, not lock files, says when a worker may use
    the GPU. Held as a one-bundle placement group on the worker's own node, made for the body of
    `hold` and removed after it. Ray keeps the group of an actor that dies holding it for as long as
    the driver lives, so it is named for the actor (`slot_group_name`) and the driver removes it."""

    # Each wait for the placement group is announced to the watchdog with this length.
    WAIT_STEP_SECONDS = 5.0

    def __init__(self, bundle: dict[str, float]) -> None:
        self.bundle = bundle

    @contextlib.contextmanager
    def hold(self, what: str = "GPU work", on_wait: Callable[[float], None] | None = None) -> Iterator[int]:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group

        # Pinned to this node: a slot of another machine's GPU would not limit this one's. Named for
        # the actor, so that the driver can give it back if the actor dies holding it.
        node = f"node:{ray.util.get_node_ip_address()}"
        name = slot_group_name(ray.get_runtime_context().get_actor_id() or "driver")
        group = placement_group([{**self.bundle, node: 0.001}], strategy="STRICT_PACK", name=name)
        started = time.monotonic()
        try:
            ready = group.ready()
            next_line = 0.0  # a line when the wait starts, then one a minute
            while not ray.wait([ready], timeout=0)[0]:
                waited = time.monotonic() - started
                if waited >= next_line:
                    logger.info(
                        f"waiting for a slot ({self.bundle}) for {what}: {waited:.0f}s so far "
                        "(a resource no node offers is waited for forever)"
                    )
                    next_line = waited + 60
                if on_wait is not None:
                    on_wait(self.WAIT_STEP_SECONDS)
                ray.wait([ready], timeout=self.WAIT_STEP_SECONDS)
            waited = time.monotonic() - started
            if waited >= 1:
                logger.info(f"got a slot ({self.bundle}) for {what} after waiting {waited:.1f}s")
            yield 0
        finally:
            remove_placement_group(group)
