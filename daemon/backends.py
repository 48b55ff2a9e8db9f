"""A worker's backends: which decoder, stages device and encoder it uses, and what happens when
the GPU cannot go on (out of memory, NVDEC failing, NVENC refusing a session).

Chosen once per worker from a probe in a child process; encode.codec = "cpu" never touches a GPU.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

from loguru import logger

from daemon.budget import CpuBudget
from daemon.clips import Clip
from daemon.config import Settings
from daemon.encode import X265Encoder
from daemon.frames import ClipEncoder, FrameSource, PictureFormat
from daemon.gpu.probe import BackendChoice, select_backends
from daemon.gpu.slots import GpuSlots, RaySlots, slot_dir
from daemon.messages import ClipResult
from daemon.pipeline import ClipCutter, ProgressSink, VideoOutcome
from daemon.source import VideoSource
from daemon.stages import build_stages


@dataclass
class _Recorder:
    """Passes results on and remembers which clips are done, so a retry only redoes the rest."""

    sink: ProgressSink
    done: set[tuple[int, int]] = field(default_factory=set)
    results: list[ClipResult] = field(default_factory=list)

    def clip_finished(self, result: ClipResult) -> None:
        self.done.add((result.start_frame, result.end_frame))
        self.results.append(result)
        self.sink.clip_finished(result)

    def frames_encoded(self, count: int) -> None:
        self.sink.frames_encoded(count)

    def frame_decoded(self) -> None:
        self.sink.frame_decoded()

    def waiting(self, seconds: float) -> None:
        self.sink.waiting(seconds)

    def unfinished(self, clips: list[Clip]) -> list[Clip]:
        return [clip for clip in clips if (clip.start_frame, clip.end_frame) not in self.done]


class NvencEncoders:
    """NVENC encoders, or libx265 for a clip when NVENC cannot open one.

    GeForce cards allow only a few NVENC sessions at a time, across every process; overlapping clips
    and their alpha streams each hold one. Running out must cost speed, never the clip."""

    # What both NVENC and the libx265 stand-in take: RGB (libx265's is copied to the host).
    accepts = frozenset({PictureFormat.HOST_RGB, PictureFormat.DEVICE_RGB})

    def __init__(self, settings: Settings, budget: CpuBudget) -> None:
        self.settings = settings
        self.budget = budget
        self._refusals: set[str] = set()  # each reason is a warning once, then a debug line

    def __call__(self, path: Path, width: int, height: int, fps: Fraction) -> ClipEncoder:
        from daemon.gpu.nvcodec import NvencEncoder

        try:
            return NvencEncoder(path, width, height, fps, self.settings.encode, self.settings.run.device_id)
        except Exception as exc:  # noqa: BLE001 - whatever the binding raises, libx265 can do the clip
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log = logger.debug if reason in self._refusals else logger.warning
            self._refusals.add(reason)
            log(f"{path.name}: NVENC cannot open an encoder ({reason}); this one is libx265")
            return X265Encoder(path, width, height, fps, self.settings.encode, self.budget.encoder_threads(1))


class Backends:
    """Cuts a source's clips with this worker's backends, inside a GPU slot when the GPU is used."""

    def __init__(
        self,
        settings: Settings,
        choice: BackendChoice,
        device_name: str = "",
        budget: CpuBudget | None = None,
    ) -> None:
        self.settings = settings
        self.budget = budget or CpuBudget.of_process(settings)
        self.choice = choice
        # A device name, not a torch.device: torch is imported only by what computes on tensors.
        self.device = choice.device
        self.slots = choose_slots(settings, choice)
        where = f" on GPU {settings.run.device_id} ({device_name})" if device_name else ""
        logger.info(f"backends: {choice.describe()}{where}")
        for reason in choice.fallbacks:
            logger.info(f"fallback: {reason}")
        self.cutter = ClipCutter(
            settings,
            build_stages(settings, self.device),
            self.device,
            encoders=NvencEncoders(settings, self.budget) if choice.encode == "nvenc" else None,
            open_source=self._nvdec_source if choice.decode == "nvdec" else None,
            budget=self.budget,
        )
        self._cpu_cutter: ClipCutter | None = None

    @classmethod
    def start(cls, settings: Settings, budget: CpuBudget) -> Backends:
        """Probe (in a child process) and choose; raises GpuUnavailable for codec = "gpu" without one."""
        choice, name = select_backends(settings)
        return cls(settings, choice, name, budget)

    def _nvdec_source(self, path: Path) -> FrameSource:
        from daemon.gpu.nvcodec import NvdecSource, nvdec_unsupported_reason

        reason = nvdec_unsupported_reason(path)
        if not reason:
            try:
                return NvdecSource(path, self.settings.run.device_id)
            except Exception as exc:  # noqa: BLE001 - the CPU decoder takes over, the URL goes on
                reason = f"NVDEC unavailable: {exc}"
        logger.info(f"{path.name}: decoded on the CPU and uploaded to the GPU: {reason}")
        return VideoSource(path, threads=self.budget.decoder_threads)

    @contextlib.contextmanager
    def slot(self, what: str, on_wait: Callable[[float], None] | None = None) -> Iterator[None]:
        """A GPU slot for the body, or nothing at all on the CPU path."""
        if self.slots is None:
            yield
            return
        with self.slots.hold(what, on_wait):
            # Wall-clock times, so that slots held on different machines can be compared.
            logger.debug(f"slot taken at {time.time():.3f} for {what}")
            try:
                yield
            finally:
                logger.debug(f"slot given back at {time.time():.3f} for {what}")

    def _cpu_fallback(self) -> ClipCutter:
        if self._cpu_cutter is None:
            self._cpu_cutter = ClipCutter(
                self.settings, build_stages(self.settings, "cpu"), "cpu", budget=self.budget
            )
        return self._cpu_cutter

    def cut(
        self,
        source: Path,
        video_id: str,
        clips: list[Clip],
        output_dir: Path,
        sink: ProgressSink,
        should_stop: Callable[[], bool],
    ) -> VideoOutcome:
        """Every clip of `source`, inside a GPU slot; out of device memory, halve the batch and redo
        the unfinished clips; when that fails at batch size 1, or NVDEC fails, the CPU finishes them."""
        cutter = self.cutter
        if not self.choice.uses_gpu:  # a slot only where run.ray_slot_resource asks for one
            with self.slot(f"{video_id} ({len(clips)} clip(s))", sink.waiting):
                return cutter.run(source, video_id, clips, output_dir, sink, should_stop)
        # The GPU path only: the CPU path of a core install has no torch to import.
        import torch

        from daemon.gpu.nvcodec import NvdecError

        recorder = _Recorder(sink)
        remaining = list(clips)
        reason = ""
        try:
            while True:
                try:
                    with self.slot(f"{video_id} ({len(remaining)} clip(s))", sink.waiting):
                        outcome = cutter.run(source, video_id, remaining, output_dir, recorder, should_stop)
                    return VideoOutcome(results=recorder.results, interrupted=outcome.interrupted)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    remaining = recorder.unfinished(remaining)
                    if cutter.batch_size <= 1:
                        reason = "out of GPU memory at batch size 1"
                        break
                    cutter.batch_size = max(1, cutter.batch_size // 2)
                    logger.warning(
                        f"{video_id}: out of GPU memory; retrying {len(remaining)} clip(s) "
                        f"at batch size {cutter.batch_size}"
                    )
                except NvdecError as exc:
                    remaining = recorder.unfinished(remaining)
                    reason = str(exc)
                    break
        finally:
            cutter.batch_size = self.settings.decode.batch_size
        logger.warning(f"{video_id}: {len(remaining)} clip(s) go to the CPU path: {reason}")
        outcome = self._cpu_fallback().run(source, video_id, remaining, output_dir, recorder, should_stop)
        return VideoOutcome(results=recorder.results, interrupted=outcome.interrupted)


def choose_slots(settings: Settings, choice: BackendChoice) -> GpuSlots | RaySlots | None:
    """What limits GPU work: lock files on one machine; Ray resources on a cluster (a custom
    resource when run.ray_slot_resource names one, a share of a GPU otherwise); nothing on a CPU
    worker without a custom resource."""
    if settings.run.backend == "ray":
        if settings.run.ray_slot_resource:
            return RaySlots({settings.run.ray_slot_resource: 1.0})
        return RaySlots({"GPU": 1.0 / settings.gpu.max_gpu_jobs}) if choice.uses_gpu else None
    if not choice.uses_gpu:
        return None
    gpu = settings.gpu
    return GpuSlots(
        slot_dir(settings),
        settings.run.device_id,
        gpu.max_gpu_jobs,
        gpu.slot_wait_initial_seconds,
        gpu.slot_wait_max_seconds,
        gpu.min_free_memory_mb,
    )
