"""The CPUs a worker may use, and how its decoder and encoders share them: the one home of every
thread and lane rule.

A worker process gets its share of this machine's cores (the workers together use each core once);
a Ray actor gets the CPUs it asked Ray for, whatever the node it lands on has. Either way the rules
below turn those CPUs into lanes (clips written at once, each by its own libx265 encoder), encoder
threads and decoder threads. This is the only module that reads the machine's core count.
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
    def of_process(cls, settings: Settings) -> CpuBudget:
        """A worker process: its share of this machine's cores."""
        return cls._with(settings, max(1, machine_cores() // settings.run.workers))

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


def auto_workers(gpu_present: bool, max_gpu_jobs: int) -> int:
    """Workers for `--workers auto`: enough that downloads overlap processing, and with a GPU one
    more than its slots, so a worker is always downloading while the others keep the GPU busy.
    Each worker then writes its share of the cores in clips at once (CpuBudget.lanes)."""
    workers = max(2, machine_cores() // 4)
    if gpu_present:
        workers = max(workers, max_gpu_jobs + 1)
    return min(workers, 256)
