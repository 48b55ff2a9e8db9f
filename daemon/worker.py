"""A worker process: ask for a URL, download it, cut its clips, delete the source, ask again.

Workers talk to the supervisor over their own pipe, in plain dicts; they never touch the ledger.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from daemon import logs
from daemon.clips import Clip
from daemon.config import Settings
from daemon.download import DownloadFailure, download
from daemon.source import SourceError, probe

if TYPE_CHECKING:  # the pipeline pulls in torch, which the supervisor importing this module never needs
    from daemon.pipeline import ClipResult


@dataclass(frozen=True)
class Task:
    url: str
    video_id: str
    clips: list[tuple[int, int]]
    local: bool


@dataclass(frozen=True)
class WorkerPaths:
    output_dir: str
    temp_dir: str  # this worker's own folder, emptied after every URL
    log_dir: str


# Heartbeats go to the supervisor at most this often; its watchdog waits minutes, not seconds.
HEARTBEAT_SECONDS = 1.0


class _Reporter:
    """Sends clip results, frame counts and signs of life to the supervisor as they happen."""

    def __init__(self, conn: Any, url: str, output: dict[str, Any] | None = None) -> None:
        self.conn = conn
        self.url = url
        self.output = output or {}  # width, height and fps of every clip, for the manifest
        self._frames = 0
        self._last_sent = time.monotonic()
        self._last_heartbeat = 0.0

    def heartbeat(self) -> None:
        """Work moved (bytes arrived, a frame was decoded): tells the watchdog, now and then."""
        now = time.monotonic()
        if now - self._last_heartbeat >= HEARTBEAT_SECONDS:
            self._last_heartbeat = now
            self.conn.send({"type": "progress", "url": self.url, "waiting_seconds": 0.0})

    def frame_decoded(self) -> None:
        self.heartbeat()

    def waiting(self, seconds: float) -> None:
        """A deliberate wait (retry back-off, a GPU slot): the watchdog allows for it."""
        self._last_heartbeat = time.monotonic()
        self.conn.send({"type": "progress", "url": self.url, "waiting_seconds": seconds})

    def clip_finished(self, result: ClipResult) -> None:
        extra: dict[str, Any] = {}
        if result.path and not result.error:
            # Read back once while the file is still in the page cache; the manifest lists it.
            with open(result.path, "rb") as handle:
                extra = {"sha256": hashlib.file_digest(handle, "sha256").hexdigest(), **self.output}
        self.conn.send({"type": "clip", "url": self.url, **asdict(result), **extra})
        if result.error:
            logger.warning(result.error)
        else:
            logger.info(
                f"wrote {Path(result.path or '').name} ({result.frames} frames, {result.bytes} bytes)"
            )

    def frames_written(self, count: int) -> None:
        self._frames += count
        now = time.monotonic()
        if now - self._last_sent >= 0.5:
            self.flush()
            self._last_sent = now

    def flush(self) -> None:
        if self._frames:
            self.conn.send({"type": "frames", "count": self._frames})
            self._frames = 0


class Worker:
    def __init__(self, index: int, conn: Any, settings: Settings, paths: WorkerPaths) -> None:
        self.index = index
        self.conn = conn
        self.settings = settings
        self.output_dir = Path(paths.output_dir)
        self.temp_dir = Path(paths.temp_dir)
        self.stop_requested = False
        from daemon.gpu import GpuRuntime
        from daemon.stages import build_stages

        # Chosen once, by a probe in a child process; encode.codec = "cpu" never touches a GPU.
        self.gpu = GpuRuntime.start(settings)
        self.device = self.gpu.device
        self.cutter = self.gpu.cutter(build_stages(settings, self.device))

    def serve(self) -> None:
        logger.info(f"worker {self.index} ready (pid {os.getpid()}, device {self.device})")
        while not self.stop_requested:
            self.conn.send({"type": "ready"})
            message = self.conn.recv()
            if message["type"] == "stop":
                break
            task = Task(**message["task"])
            with logger.contextualize(video_id=task.video_id):
                self.handle(task)

    def _should_stop(self) -> bool:
        while not self.stop_requested and self.conn.poll():
            if self.conn.recv().get("type") == "stop":
                self.stop_requested = True
                logger.info("stop requested: finishing the clips in progress")
        return self.stop_requested

    def _stage(self, url: str, stage: str) -> None:
        self.conn.send({"type": "stage", "url": url, "stage": stage})

    def handle(self, task: Task) -> None:
        started = time.monotonic()
        download_seconds = 0.0
        result: dict[str, Any] = {"type": "result", "url": task.url}
        output = self.settings.output
        reporter = _Reporter(
            self.conn,
            task.url,
            {"width": output.width, "height": output.height, "fps": float(self.settings.fps)},
        )
        try:
            with logger.contextualize(stage="download"):
                self._stage(task.url, "download")
                if task.local:
                    source = Path(task.url)
                    logger.info(f"processing local file {source} in place")
                else:
                    logger.info(f"downloading {task.url}")
                    source = download(
                        task.url,
                        self.temp_dir,
                        self.settings.download,
                        self.settings.output,
                        lambda failure, attempt, delay: self._on_retry(failure, attempt, delay, reporter),
                        on_bytes=reporter.heartbeat,
                    )
                    download_seconds = time.monotonic() - started
                    logger.info(
                        f"downloaded {source.name} ({source.stat().st_size} bytes) in {download_seconds:.1f}s"
                    )
                info = probe(source)
                self.conn.send(
                    {
                        "type": "source",
                        "url": task.url,
                        "codec": info.codec,
                        "width": info.width,
                        "height": info.height,
                        "fps": info.average_fps,
                    }
                )
                logger.info(
                    f"source {info.codec} {info.width}x{info.height} "
                    f"{info.average_fps or 0:.3f} fps, {info.duration_seconds or 0:.1f}s"
                )
            with logger.contextualize(stage="process"):
                self._stage(task.url, "process")
                process_started = time.monotonic()
                clips = [Clip(start, end) for start, end in task.clips]
                # Only this part takes a GPU slot, and only when the GPU is used.
                outcome = self.gpu.process(
                    self.cutter, source, task.video_id, clips, self.output_dir, reporter, self._should_stop
                )
                reporter.flush()
                result["process_seconds"] = time.monotonic() - process_started
            result["download_seconds"] = download_seconds
            result["state"] = "interrupted" if outcome.interrupted else "done"
        except DownloadFailure as exc:
            logger.error(f"{task.url}: download failed ({exc.kind}): {exc.reason}")
            result.update(state="failed", error=f"download: {exc.reason}", retryable=exc.transient)
        except SourceError as exc:
            logger.error(f"{task.url}: {exc}")
            result.update(state="failed", error=f"source: {exc}", retryable=False)
        except Exception as exc:  # noqa: BLE001 - one bad video must not end the worker
            logger.error(f"{task.url}: unexpected {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            result.update(state="failed", error=f"internal: {type(exc).__name__}: {exc}", retryable=True)
        finally:
            self._clear_temp()
        self.conn.send(result)

    def _on_retry(self, failure: DownloadFailure, attempt: int, delay: float, reporter: _Reporter) -> None:
        logger.warning(
            f"attempt {attempt} failed ({failure.kind}): {failure.reason}; retrying in {delay:.1f}s"
        )
        reporter.waiting(delay)

    def _clear_temp(self) -> None:
        """The source goes before the next URL is taken: disk use stays at one source per worker."""
        if self.temp_dir.exists():
            for entry in self.temp_dir.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def worker_main(index: int, conn: Any, settings: Settings, paths: WorkerPaths) -> None:
    """Entry point of a worker process (spawned, so nothing CUDA-related is inherited)."""
    # Ctrl-C reaches the whole process group; the supervisor decides how workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminate)
    temp = Path(paths.temp_dir)
    try:
        logs.configure_from_settings(
            f"worker-{index}", logs.worker_log_path(Path(paths.log_dir), index), settings.run
        )
        temp.mkdir(parents=True, exist_ok=True)
        worker = Worker(index, conn, settings, paths)
    except Exception as exc:  # noqa: BLE001 - one line on stderr; the supervisor decides what follows
        print(
            f"download_and_process: worker {index} cannot start: {type(exc).__name__}: {exc}", file=sys.stderr
        )
        logger.opt(exception=True).debug("worker start-up failed")
        raise SystemExit(3) from None
    try:
        worker.serve()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        logger.warning("supervisor went away; stopping")
    finally:
        shutil.rmtree(temp, ignore_errors=True)
        logger.info(f"worker {index} stopped")
