"""A worker's backends and the one place that assembles the cutter: which decoder, stages device
and encoder it uses, how many clips it writes at once on how many threads, and what happens when
the GPU cannot go on (out of memory, NVDEC failing, NVENC refusing a session).

The backend choice is made once per worker from a probe in a child process (encode.codec, the
device the work runs on: "cpu" never touches a GPU). `assemble` turns the settings, that choice
and the worker's CPU budget (daemon.budget) into the cutter's parts; nothing past it reads a setting.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

from loguru import logger

from daemon.budget import CpuBudget
from daemon.clips import Clip
from daemon.config import Settings
from daemon.cutter import ClipCutter
from daemon.cutting import CutJob, CutterParts, ForwardingSink, ProgressSink, VideoOutcome
from daemon.encode import X265Encoder, X265Encoders
from daemon.frames import ClipEncoder, EncoderFactory, FrameSource, PictureFormat
from daemon.gpu.probe import BackendChoice, select_backends
from daemon.gpu.slots import GpuSlots, RaySlots, slot_dir
from daemon.messages import ClipResult
from daemon.partfile import final_name
from daemon.source import VideoSource
from daemon.stages import build_stages
from daemon.stages.base import Stage

# Every backend on the CPU: the fallback when the GPU cannot go on, and encode.codec = "cpu".
CPU_BACKENDS = BackendChoice(decode="cpu", encode="x265", device="cpu")


@dataclass(frozen=True)
class Encoding:
    """One encoder as the assembly knows it: how to open its factory from the settings, the budget
    and the lanes; and whether it runs on the CPU's cores (then clips are written side by side, a
    lane each, and its threads come out of the worker's CPU budget)."""

    factory: Callable[[Settings, CpuBudget, int], EncoderFactory]
    on_cpu: bool


# The encoders, by the name the backend choice gives them.
ENCODINGS: dict[str, Encoding] = {
    "x265": Encoding(
        lambda settings, budget, lanes: X265Encoders(settings.encode, budget.encoder_threads(lanes)), True
    ),
    "nvenc": Encoding(lambda settings, budget, lanes: NvencEncoders(settings, budget), False),
}


def open_cpu_source(path: Path, threads: int) -> VideoSource:
    return VideoSource(path, threads=threads)


class NvdecOpener:
    """NVDEC on the worker's GPU, or PyAV for a source NVDEC cannot decode (frames then uploaded)."""

    def __init__(self, device_id: int) -> None:
        self.device_id = device_id

    def __call__(self, path: Path, threads: int) -> FrameSource:
        from daemon.gpu.nvcodec import NvdecSource, nvdec_unsupported_reason

        reason = nvdec_unsupported_reason(path)
        if not reason:
            try:
                return NvdecSource(path, self.device_id)
            except Exception as exc:  # noqa: BLE001 - the CPU decoder takes over, the URL goes on
                reason = f"NVDEC unavailable: {exc}"
        logger.info(f"{path.name}: decoded on the CPU and uploaded to the GPU: {reason}")
        return open_cpu_source(path, threads)


def assemble(
    settings: Settings, choice: BackendChoice, budget: CpuBudget, stages: list[Stage] | None = None
) -> CutterParts:
    """The cutter's parts for these backends (stages built on the choice's device unless given)."""
    encoding = ENCODINGS[choice.encode]
    lanes = budget.lanes_for(cpu_encoder=encoding.on_cpu, gpu_stages=choice.uses_gpu)
    decode = settings.decode
    return CutterParts(
        open_source=NvdecOpener(settings.run.device_id) if choice.decode == "nvdec" else open_cpu_source,
        encoders=encoding.factory(settings, budget, lanes),
        stages=tuple(build_stages(settings, choice.device) if stages is None else stages),
        device=choice.device,
        width=settings.output.width,
        height=settings.output.height,
        fps=settings.fps,
        clip_fps=settings.clip_fps,
        seek_threshold_seconds=Fraction(decode.seek_threshold_seconds),
        lanes=lanes,
        batch_size=decode.batch_size,
        buffer_bytes=int(decode.buffer_mb * 2**20),
        write_alpha="matte" in settings.stages and settings.matte.alpha_stream,
        decoder_threads=budget.decoder_threads,
        part_decoder_threads=budget.part_decoder_threads(lanes),
        # Parts each open a decoder of their own: only where that decoder is PyAV's.
        decodes_in_parts=choice.decode == "cpu" and lanes > 1,
    )


def cpu_parts(settings: Settings, stages: list[Stage] | None = None) -> CutterParts:
    """The parts of a worker process whose backends are all on the CPU."""
    return assemble(settings, CPU_BACKENDS, CpuBudget.of_process(settings), stages)


class _Recorder(ForwardingSink):
    """Passes results on and remembers which clips are done, so a retry only redoes the rest."""

    def __init__(self, sink: ProgressSink) -> None:
        super().__init__(sink)
        self.done: set[tuple[int, int]] = set()
        self.results: list[ClipResult] = []

    def clip_finished(self, result: ClipResult) -> None:
        self.done.add((result.start_frame, result.end_frame))
        self.results.append(result)
        self.sink.clip_finished(result)

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
            log(f"{final_name(path)}: NVENC cannot open an encoder ({reason}); this one is libx265")
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
        self.choice = choice
        self.budget = budget or CpuBudget.of_process(settings, choice.uses_gpu)
        # A device name, not a torch.device: torch is imported only by what computes on tensors.
        self.device = choice.device
        self.slots = choose_slots(settings, choice)
        where = f" on GPU {settings.run.device_id} ({device_name})" if device_name else ""
        logger.info(f"backends: {choice.describe()}{where}")
        for reason in choice.fallbacks:
            logger.info(f"fallback: {reason}")
        self.parts = assemble(settings, choice, self.budget)
        # Parts for other budgets (a source cut on the cores other workers leave), sharing the stages.
        self._parts_by_cpus: dict[int, CutterParts] = {self.budget.cpus: self.parts}
        self._cpu_parts: CutterParts | None = None

    @classmethod
    def start(cls, settings: Settings, budget: CpuBudget | None = None) -> Backends:
        """Probe (in a child process) and choose; raises GpuUnavailable for codec = "gpu" without one."""
        choice, name = select_backends(settings)
        return cls(settings, choice, name, budget)

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
        if self._cpu_parts is None:
            self._cpu_parts = assemble(self.settings, CPU_BACKENDS, self.budget)
        return ClipCutter(self._cpu_parts)

    def parts_for(self, budget: CpuBudget | None) -> CutterParts:
        """The cutter's parts on `budget`'s CPUs (None: the worker's own budget)."""
        if budget is None:
            return self.parts
        if budget.cpus not in self._parts_by_cpus:
            self._parts_by_cpus[budget.cpus] = assemble(
                self.settings, self.choice, budget, list(self.parts.stages)
            )
        return self._parts_by_cpus[budget.cpus]

    def cut(self, job: CutJob, budget: CpuBudget | None = None) -> VideoOutcome:
        """Every clip of the job's source, on `budget`'s CPUs (the worker's own when None), inside a
        GPU slot; out of device memory, halve the batch and redo the unfinished clips; when that
        fails at batch size 1, or NVDEC fails, the CPU finishes them."""
        what = f"{job.video_id} ({len(job.clips)} clip(s))"
        if not self.choice.uses_gpu:  # a slot only where run.ray_slot_resource asks for one
            with self.slot(what, job.sink.waiting):
                return ClipCutter(self.parts_for(budget)).run(job)
        # The GPU path only: the CPU path of a core install has no torch to import.
        import torch

        from daemon.gpu.nvcodec import NvdecError

        recorder = _Recorder(job.sink)
        remaining = list(job.clips)
        parts = self.parts
        reason = ""
        while True:
            try:
                with self.slot(f"{job.video_id} ({len(remaining)} clip(s))", job.sink.waiting):
                    outcome = ClipCutter(parts).run(replace(job, clips=remaining, sink=recorder))
                return VideoOutcome(results=recorder.results, interrupted=outcome.interrupted)
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                remaining = recorder.unfinished(remaining)
                if parts.batch_size <= 1:
                    reason = "out of GPU memory at batch size 1"
                    break
                parts = replace(parts, batch_size=max(1, parts.batch_size // 2))
                logger.warning(
                    f"{job.video_id}: out of GPU memory; retrying {len(remaining)} clip(s) "
                    f"at batch size {parts.batch_size}"
                )
            except NvdecError as exc:
                remaining = recorder.unfinished(remaining)
                reason = str(exc)
                break
        logger.warning(f"{job.video_id}: {len(remaining)} clip(s) go to the CPU path: {reason}")
        outcome = self._cpu_fallback().run(replace(job, clips=remaining, sink=recorder))
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
