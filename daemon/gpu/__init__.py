"""GPU path: device probing, GPU slots, NVDEC/NVENC backends and NV12 colour conversion.

Nothing here imports PyNvVideoCodec at import time: a machine without an NVIDIA driver imports the
project as usual and runs the CPU path.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from daemon.config import Settings
from daemon.gpu.slots import GpuSlots

if TYPE_CHECKING:
    # daemon.gpu.probe is imported where it is used, not here: `python -m daemon.gpu.probe` runs it
    # as __main__, and a copy already imported by this package would make runpy warn. torch too is
    # imported where used: a CPU worker with only a resize stage never imports it.
    from daemon.clips import Clip
    from daemon.encode import ClipEncoder
    from daemon.gpu.probe import BackendChoice
    from daemon.pipeline import ClipCutter, ClipResult, FrameSource, ProgressSink, VideoOutcome
    from daemon.stages import Stage

__all__ = ["GpuRuntime", "select_backends", "slot_dir"]


def slot_dir(settings: Settings) -> Path:
    if settings.gpu.slot_dir:
        return Path(settings.gpu.slot_dir).expanduser()
    return Path(tempfile.gettempdir()) / "download_and_process-gpu"


def select_backends(settings: Settings) -> tuple[BackendChoice, str]:
    """(backends, device name); probes in a child process unless encode.codec = "cpu"."""
    from daemon.gpu.probe import choose_backends, probe_gpu

    if settings.encode.codec == "cpu":
        return choose_backends("cpu", None), ""
    probe = probe_gpu(settings.run.device_id, settings.gpu.probe_timeout_seconds)
    return choose_backends(settings.encode.codec, probe), probe.device_name


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

    def frames_written(self, count: int) -> None:
        self.sink.frames_written(count)

    def frame_decoded(self) -> None:
        self.sink.frame_decoded()

    def waiting(self, seconds: float) -> None:
        self.sink.waiting(seconds)

    def unfinished(self, clips: list[Clip]) -> list[Clip]:
        return [clip for clip in clips if (clip.start_frame, clip.end_frame) not in self.done]


class GpuRuntime:
    """A worker's backends: which decoder, device and encoder it uses, and the GPU slot around them."""

    def __init__(self, settings: Settings, choice: BackendChoice, device_name: str = "") -> None:
        self.settings = settings
        self.choice = choice
        # A device name, not a torch.device: torch is imported only by what computes on tensors.
        self.device = choice.device
        self.device_id = settings.run.device_id
        self.slots: GpuSlots | None = None
        if choice.uses_gpu:
            self.slots = GpuSlots(
                slot_dir(settings),
                self.device_id,
                settings.gpu.max_gpu_jobs,
                settings.gpu.slot_wait_initial_seconds,
                settings.gpu.slot_wait_max_seconds,
                settings.gpu.min_free_memory_mb,
            )
        where = f" on GPU {self.device_id} ({device_name})" if device_name else ""
        logger.info(f"backends: {choice.describe()}{where}")
        for reason in choice.fallbacks:
            logger.info(f"fallback: {reason}")
        self._cpu_cutter: ClipCutter | None = None
        self._nvenc_refusals: set[str] = set()  # each reason is a warning once, then a debug line

    @classmethod
    def start(cls, settings: Settings) -> GpuRuntime:
        """Probe (in a child process) and choose; raises GpuUnavailable for codec = "gpu" without one."""
        choice, name = select_backends(settings)
        return cls(settings, choice, name)

    def cutter(self, stages: list[Stage]) -> ClipCutter:
        from daemon.pipeline import ClipCutter

        return ClipCutter(
            self.settings,
            stages,
            self.device,
            encoder_factory=self._nvenc if self.choice.encode == "nvenc" else None,
            source_factory=self._source if self.choice.decode == "nvdec" else None,
        )

    def _nvenc(self, path: Path, width: int, height: int, fps: Fraction) -> ClipEncoder:
        """An NVENC encoder, or libx265 for this clip when NVENC cannot open one.

        GeForce cards allow only a few NVENC sessions at a time, across every process; overlapping
        clips and their alpha streams each hold one. Running out must cost speed, never the clip."""
        from daemon.encode import X265Encoder
        from daemon.gpu.nvcodec import NvencEncoder

        try:
            return NvencEncoder(path, width, height, fps, self.settings.encode, self.device_id)
        except Exception as exc:  # noqa: BLE001 - whatever the binding raises, libx265 can do the clip
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            log = logger.debug if reason in self._nvenc_refusals else logger.warning
            self._nvenc_refusals.add(reason)
            log(f"{path.name}: NVENC cannot open an encoder ({reason}); this one is libx265")
            return X265Encoder(path, width, height, fps, self.settings.encode)

    def _source(self, path: Path) -> FrameSource:
        from daemon.gpu.nvcodec import NvdecSource, nvdec_unsupported_reason
        from daemon.source import VideoSource

        reason = nvdec_unsupported_reason(path)
        if not reason:
            try:
                return NvdecSource(path, self.device_id)
            except Exception as exc:  # noqa: BLE001 - the CPU decoder takes over, the URL goes on
                reason = f"NVDEC unavailable: {exc}"
        logger.info(f"{path.name}: decoded on the CPU and uploaded to the GPU: {reason}")
        return VideoSource(path, threads=self.settings.decode.threads)

    @contextlib.contextmanager
    def slot(self, what: str, on_wait: Callable[[float], None] | None = None) -> Iterator[None]:
        """A GPU slot for the body, or nothing at all on the CPU path."""
        if self.slots is None:
            yield
            return
        with self.slots.hold(what, on_wait):
            yield

    def _cpu_fallback(self, cutter: ClipCutter) -> ClipCutter:
        if self._cpu_cutter is None:
            from daemon.pipeline import ClipCutter
            from daemon.stages import build_stages

            self._cpu_cutter = ClipCutter(self.settings, build_stages(self.settings, "cpu"), "cpu")
            self._cpu_cutter.write_alpha = cutter.write_alpha
        return self._cpu_cutter

    def process(
        self,
        cutter: ClipCutter,
        source: Path,
        video_id: str,
        clips: list[Clip],
        output_dir: Path,
        sink: ProgressSink,
        should_stop: Callable[[], bool],
    ) -> VideoOutcome:
        """cutter.run inside a GPU slot; out of device memory, halve the batch and redo the unfinished
        clips; when that fails at batch size 1, or NVDEC fails, the CPU path finishes them."""
        if self.slots is None:
            return cutter.run(source, video_id, clips, output_dir, sink, should_stop)
        # The GPU path only: the CPU path of a core install has no torch to import.
        import torch

        from daemon.gpu.nvcodec import NvdecError
        from daemon.pipeline import VideoOutcome

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
        cpu_cutter = self._cpu_fallback(cutter)
        outcome = cpu_cutter.run(source, video_id, remaining, output_dir, recorder, should_stop)
        return VideoOutcome(results=recorder.results, interrupted=outcome.interrupted)
