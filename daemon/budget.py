"""The CPUs a worker may use, and how its decoder and encoders share them: the one home of every
thread and lane rule.

On one machine, a run's workers download side by side, but at most `processing_workers` of them
process at once (daemon.lockslots.ProcessingSlots); the cores are shared by the workers processing,
not split among all of them, so a worker that downloads leaves its share to those that cut. A Ray
actor gets the CPUs it asked Ray for, whatever the node it lands on has. Either way the rules below
turn those CPUs into lanes (clips written at once, each by its own libx265 encoder), encoder threads
and decoder threads. This is the only module that reads the machine's core count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config imports this module (run.workers = "auto"), never the other way round
    from daemon.config import Settings


def machine_cores() -> int:
    """The cores this process may run on (its affinity, not every core the machine has)."""
    return len(os.sched_getaffinity(0))


@dataclass(frozen=True)
class CpuBudget:
    """One worker's CPUs and the settings that override the rules sharing them (0: the rule)."""

    cpus: int
    parallel_clips: int = 0  # encode.parallel_clips
    threads_per_encoder: int = 0  # encode.threads
    threads_per_decoder: int = 0  # decode.threads

    @classmethod
    def of_process(cls, settings: Settings, uses_gpu: bool = False) -> CpuBudget:
        """A worker process. On the CPU path, its even share among the workers cutting at once
        (every processing slot busy); with its work on a GPU, where every worker may hold a GPU
        slot and none waits for a processing slot, the cores over all the workers."""
        sharing = settings.run.workers if uses_gpu else processing_workers(settings)
        return cls._with(settings, max(1, machine_cores() // sharing))

    @classmethod
    def of_source(cls, settings: Settings, processing_now: int) -> CpuBudget:
        """A worker process for one source, taken when `processing_now` workers (itself included)
        hold a processing slot: the cores over those, so that a worker cutting while the others
        download uses the cores they leave. At most twice the even share: when the others start
        processing, a source cut on more threads than its share stays until it is done."""
        cores = machine_cores()
        even = max(1, cores // processing_workers(settings))
        return cls._with(settings, max(1, min(cores // max(1, processing_now), 2 * even)))

    @classmethod
    def of_ray_actor(cls, settings: Settings) -> CpuBudget:
        """A Ray actor: the CPUs it asked for (run.ray_worker_cpus), not its node's cores."""
        return cls._with(settings, settings.run.ray_worker_cpus)

    @classmethod
    def _with(cls, settings: Settings, cpus: int) -> CpuBudget:
        return cls(cpus, settings.encode.parallel_clips, settings.encode.threads, settings.decode.threads)

    @property
    def lanes(self) -> int:
        """Clips written at once by CPU encoders: one per CPU, so that the workers together run one
        encoder per core and never more."""
        return self.parallel_clips or self.cpus

    def lanes_for(self, cpu_encoder: bool, gpu_stages: bool) -> int:
        """Lanes for a worker's backends: side by side only for an encoder on the CPU's cores with
        the stages on the CPU too (NVENC has an engine of its own, and stages on a GPU run batch
        after batch on one device); otherwise one, on the decoding thread."""
        return self.lanes if cpu_encoder and not gpu_stages else 1

    def encoder_threads(self, lanes: int) -> int:
        """Threads of each libx265 encoder when `lanes` of them run at once: the CPUs over the lanes
        (one, with a lane per CPU). libx265's own choice would be every core, in each encoder."""
        return self.threads_per_encoder or max(1, self.cpus // lanes)

    @property
    def decoder_threads(self) -> int:
        """Threads of the worker's one CPU decoder: all its CPUs. FFmpeg's own choice would be every
        core plus one, in each worker, switching places with the encoders."""
        return self.threads_per_decoder or self.cpus

    def part_decoder_threads(self, lanes: int) -> int:
        """Threads of each of `lanes` decoders cutting parts of one source side by side: they share
        the decoder's threads (one each, by default)."""
        return max(1, self.decoder_threads // lanes)


def even_processing_workers(cores: int) -> int:
    """Workers processing at once when nothing says otherwise: a quarter of the cores, at least 2,
    so that each writes several clips at once on a big machine and a small one still overlaps two
    sources' decoding and encoding."""
    return max(2, cores // 4)


def processing_workers(settings: Settings) -> int:
    """How many of a run's workers process at once on this machine (run.processing_workers; 0:
    the rule above), never more than there are workers."""
    wanted = settings.run.processing_workers or even_processing_workers(machine_cores())
    return max(1, min(settings.run.workers, wanted))


def auto_workers(gpu_present: bool, max_gpu_jobs: int) -> int:
    """Workers for `--workers auto`: two for each processing slot, so that while one cuts a source
    the other downloads the next (a list of local files starts only as many as process; see
    daemon.fleet); with a GPU, at least one more than its slots."""
    workers = 2 * even_processing_workers(machine_cores())
    if gpu_present:
        workers = max(workers, max_gpu_jobs + 1)
    return min(workers, 256)
