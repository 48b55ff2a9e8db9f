"""A worker process: ask for a URL, download it, cut its clips, delete the source, ask again.

Workers talk to the supervisor over their own pipe, in the messages of daemon.messages; they never
touch the ledger.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from daemon import logs
from daemon.arrival import Arrival, BackgroundDownload, arriving
from daemon.budget import CpuBudget, processing_workers
from daemon.clips import Clip
from daemon.config import Settings
from daemon.cutting import CutJob, VideoOutcome
from daemon.diskspace import DiskGate, Floor
from daemon.download import DownloadFailure
from daemon.failures import Scope, from_exception, permanent
from daemon.lockslots import ProcessingSlots
from daemon.messages import (
    Assign,
    ClipFinished,
    ClipResult,
    FramesEncoded,
    FromWorker,
    Heartbeat,
    OutputFormat,
    PhaseChanged,
    Ready,
    SourceProbed,
    SpareConnection,
    Stop,
    Task,
    ToWorker,
    UrlFinished,
    WorkerChannel,
    WorkerPaths,
)
from daemon.source import SourceError, probe

# Heartbeats go to the supervisor at most this often; its watchdog waits minutes, not seconds.
HEARTBEAT_SECONDS = 1.0


@dataclass(frozen=True)
class Cores:
    """What a source is cut on: `budget` (None: the worker's own), or nothing at all when a stop
    came while the worker waited for its turn (`stopped`)."""

    budget: CpuBudget | None
    stopped: bool = False
    lanes_now: Callable[[], int] | None = None  # lanes for a clip starting now (see CutJob)


class _SharedChannel:
    """The worker's channel used from two threads, one send and one receive at a time: a download
    thread sends signs of life and reads what the supervisor said (a stop, a spare connection)
    while the worker's own thread cuts."""

    def __init__(self, conn: WorkerChannel) -> None:
        self._conn = conn
        self._sending = threading.Lock()
        self._receiving = threading.Lock()

    def send(self, message: FromWorker) -> None:
        with self._sending:
            self._conn.send(message)

    def recv(self) -> ToWorker:
        with self._receiving:
            return self._conn.recv()

    def poll(self) -> bool:
        return self._conn.poll()

    def take(self) -> ToWorker | None:
        """A message already waiting, or None: never waits."""
        with self._receiving:
            return self._conn.recv() if self._conn.poll() else None


class _Reporter:
    """Sends clip results, frame counts and signs of life to the supervisor as they happen."""

    def __init__(self, conn: WorkerChannel, url: str, video_id: str, output: OutputFormat) -> None:
        self.conn = conn
        self.url = url
        self.video_id = video_id
        self.output = output
        self._frames = 0
        self._last_sent = time.monotonic()
        self._last_heartbeat = 0.0
        self.download_left: Callable[[], int | None] = lambda: None  # the download's, while it runs

    def heartbeat(self) -> None:
        """Work moved (bytes arrived, a frame was decoded): tells the watchdog, now and then, and
        the supervisor how much is left to download (it lends idle connections by that)."""
        now = time.monotonic()
        if now - self._last_heartbeat >= HEARTBEAT_SECONDS:
            self._last_heartbeat = now
            self.conn.send(Heartbeat(self.url, download_bytes_left=self.download_left()))

    def frame_decoded(self) -> None:
        self.heartbeat()

    def waiting(self, seconds: float) -> None:
        """A deliberate wait (retry back-off, a GPU slot): the watchdog allows for it."""
        self._last_heartbeat = time.monotonic()
        self.conn.send(Heartbeat(self.url, waiting_seconds=seconds, download_bytes_left=self.download_left()))

    def clip_finished(self, result: ClipResult) -> None:
        message = ClipFinished(self.url, self.video_id, result)
        if result.path and not result.error:
            # Read back once while the file is still in the page cache; the manifest lists it.
            with open(result.path, "rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            message = ClipFinished(self.url, self.video_id, result, sha256=digest, output=self.output)
        self.conn.send(message)
        if result.error:
            logger.warning(result.error)
        else:
            logger.info(
                f"wrote {Path(result.path or '').name} ({result.frames} frames, {result.bytes} bytes)"
            )

    def frames_encoded(self, count: int) -> None:
        self._frames += count
        now = time.monotonic()
        if now - self._last_sent >= 0.5:
            self.flush()
            self._last_sent = now

    def flush(self) -> None:
        if self._frames:
            self.conn.send(FramesEncoded(self._frames))
            self._frames = 0


class Worker:
    def __init__(
        self,
        index: int,
        conn: WorkerChannel,
        settings: Settings,
        paths: WorkerPaths,
        budget: CpuBudget | None,
        disk: DiskGate,
        slots: ProcessingSlots | None = None,
    ) -> None:
        self.index = index
        self.conn = _SharedChannel(conn)
        self.settings = settings
        self.output_dir = Path(paths.output_dir)
        self.temp_dir = Path(paths.temp_dir)
        self.stop_requested = False
        self.disk = disk  # its temp folder's free-space floor, checked before each download
        self.slots = slots  # the run's processing slots on this machine; None: a Ray actor's own CPUs
        self._arrival: Arrival | None = None  # the source being cut while it still downloads
        self._download: BackgroundDownload | None = None  # the download in flight
        output = settings.output
        self.output_format = OutputFormat(output.width, output.height, float(settings.fps))
        # The backends module pulls in the pipeline, which the supervisor importing this never needs.
        from daemon.backends import Backends

        # Chosen once, by a probe in a child process; encode.codec = "cpu" never touches a GPU.
        self.backends = Backends.start(settings, budget)
        # A source is cut while it arrives where PyAV decodes it and the cut holds a processing
        # slot, which it lends while it waits for bytes. A GPU slot or a Ray resource is not lent:
        # those workers wait for the whole file, as NVDEC (which reads a path) must.
        choice = self.backends.choice
        self._cuts_arriving_sources = choice.decode == "cpu" and not choice.uses_gpu and slots is not None

    def serve(self) -> None:
        logger.info(f"worker {self.index} ready (pid {os.getpid()}, device {self.backends.device})")
        while not self.stop_requested:
            self.conn.send(Ready(node=socket.gethostname()))
            message = self.conn.recv()
            while isinstance(message, SpareConnection):  # meant for the URL just finished
                message = self.conn.recv()
            match message:
                case Assign(task=task):
                    with logger.contextualize(video_id=task.video_id):
                        self.handle(task)
                case Stop():
                    break

    def _read_messages(self) -> None:
        """What the supervisor said while the worker works: a stop, or a connection to spare. Read
        by the worker's thread between clips and by its download thread between reads."""
        while not self.stop_requested and (message := self.conn.take()) is not None:
            match message:
                case Stop():
                    self.stop_requested = True
                    logger.info("stop requested: finishing the clips in progress")
                case SpareConnection():
                    if self._download is not None:
                        self._download.offer_connection()

    def _should_stop(self) -> bool:
        self._read_messages()
        return self.stop_requested

    def _phase(self, url: str, phase: str) -> None:
        self.conn.send(PhaseChanged(url, phase))

    def handle(self, task: Task) -> None:
        """One URL: fetch it, read what it is, cut its clips, delete it; then say how it went."""
        reporter = _Reporter(self.conn, task.url, task.video_id, self.output_format)
        download_seconds = process_seconds = 0.0
        download: BackgroundDownload | None = None
        phase = "download"
        try:
            # A log record's `stage` field is the worker's phase (its name in every log line and in
            # the JSON logs scripts read, as in the ledger's column).
            with contextlib.ExitStack() as fetching:
                with logger.contextualize(stage="download"):
                    self._phase(task.url, "download")
                    source, download = fetching.enter_context(self._source(task, reporter))
                    self._probe(task, source)
                phase = "process"
                outcome, process_seconds = self._cut(task, source, reporter)
            if download is not None:
                download_seconds = download.seconds
            state = "interrupted" if outcome.interrupted else "done"
            result = UrlFinished(task.url, state, None, download_seconds, process_seconds)
        except DownloadFailure as exc:
            logger.error(f"{task.url}: download failed ({exc.kind}): {exc.reason}")
            result = UrlFinished(task.url, "failed", exc.failure(self.temp_dir))
        except SourceError as exc:
            logger.error(f"{task.url}: {exc}")
            result = UrlFinished(task.url, "failed", permanent(Scope.URL, f"source: {exc}"))
        except Exception as exc:  # noqa: BLE001 - one bad video must not end the worker
            folder = self.temp_dir if phase == "download" else self.output_dir / task.video_id
            failure = from_exception(exc, Scope.URL, folder, phase)
            trace = f"\n{traceback.format_exc()}" if failure.bug else ""
            logger.error(f"{task.url}: {failure.reason}{trace}")
            result = UrlFinished(task.url, "failed", failure)
        finally:
            self._clear_temp()
        self.conn.send(result)

    def _cut(self, task: Task, source: Path, reporter: _Reporter) -> tuple[VideoOutcome, float]:
        """Every clip of the source, once it has its turn; and how long that took."""
        with logger.contextualize(stage="process"), self._cores(task, reporter) as cores:
            if cores.stopped:  # stopped while waiting its turn: every clip stays pending
                return VideoOutcome(results=[], interrupted=True), 0.0
            self._phase(task.url, "process")
            started = time.monotonic()
            clips = [Clip(start, end) for start, end in task.clips]
            job = CutJob(
                source,
                task.video_id,
                clips,
                self.output_dir,
                reporter,
                self._should_stop,
                arriving=self._arrival is not None,
                lanes_now=cores.lanes_now,
            )
            outcome = self.backends.cut(job, cores.budget)
            reporter.flush()
            return outcome, time.monotonic() - started

    @contextlib.contextmanager
    def _cores(self, task: Task, reporter: _Reporter) -> Iterator[Cores]:
        """A processing slot for the body, and the cores this source is cut on: shared by the
        workers holding a slot when it was taken. None (the worker's own budget) for a Ray actor
        and for a worker whose backends are on a GPU, where the GPU's slots say who goes."""
        if self.slots is None or self.backends.choice.uses_gpu:
            yield Cores(None)
            return
        what = f"{task.video_id} ({len(task.clips)} clip(s))"
        with self.slots.hold(what, reporter.waiting, self._should_stop) as processing_now:
            if processing_now is None:
                yield Cores(None, stopped=True)
                return
            budget = CpuBudget.of_source(self.settings, processing_now)
            arriving_note = ""
            arrival, slots = self._arrival, self.slots
            if arrival is not None:
                # A cut that waits for bytes burns no CPU: the slot goes to another worker meanwhile.
                arrival.lend_slot = lambda: slots.lent(what, reporter.waiting)
                arriving_note = ", while it downloads"
            logger.info(
                f"cutting on {budget.cpus} core(s) ({processing_now} of {self.slots.count} "
                f"processing slots busy){arriving_note}"
            )
            settings, slots_now = self.settings, self.slots

            def lanes_now() -> int:
                # The cores over the workers processing now: more once others finished.
                return CpuBudget.of_source(settings, slots_now.busy()).lanes

            try:
                yield Cores(budget, lanes_now=None if budget.parallel_clips else lanes_now)
            finally:
                if arrival is not None:
                    arrival.lend_slot = None

    @contextlib.contextmanager
    def _source(self, task: Task, reporter: _Reporter) -> Iterator[tuple[Path, BackgroundDownload | None]]:
        """The source to cut, and its download: a local file as it is; a URL's download, cut while
        it still arrives where yt-dlp writes it front to back and PyAV decodes it (daemon.arrival),
        whole otherwise. On the way out a download still running is ended (every clip is cut: the
        rest is not needed, or the cut failed) and its thread waited for, before the temp folder
        is emptied."""
        if task.local:
            logger.info(f"processing local file {task.url} in place")
            yield Path(task.url), None
            return
        self._wait_for_disk(reporter)
        logger.info(f"downloading {task.url}")
        download = BackgroundDownload(
            task.url,
            self.temp_dir,
            self.settings.download,
            self.settings.output,
            lambda failure, attempt, delay: self._on_retry(failure, attempt, delay, reporter),
            on_bytes=reporter.heartbeat,
            between_reads=self._read_messages,
        ).start()
        arrival = download.arrival
        ending = False  # a signal ends the worker: its download thread is not waited for
        self._download, reporter.download_left = download, download.bytes_left
        try:
            arrival.wait_for_start(self._read_messages)
            if arrival.readable and not arrival.ended and self._cuts_arriving_sources:
                # Named as the whole file will be (messages name it so); read through `arrival`.
                assert arrival.final_path is not None
                with arriving(arrival.final_path, arrival):
                    self._arrival = arrival
                    yield arrival.final_path, download
            else:
                arrival.wait_for_end(self._read_messages)
                if arrival.error is not None:
                    raise arrival.error
                assert arrival.final_path is not None
                yield arrival.final_path, download
        except Exception:
            raise
        except BaseException:
            # SystemExit from SIGTERM: a download stuck in a read would hold the exit up to a socket
            # timeout; the thread is a daemon and ends with the process.
            ending = True
            download.cancelled.set()
            raise
        finally:
            self._arrival, self._download = None, None
            reporter.download_left = lambda: None
            if not ending:
                running = not arrival.ended
                download.stop()
                if running and download.cancelled_early:
                    with logger.contextualize(stage="download"):
                        logger.info(f"stopped downloading {task.url}: the rest of the file is not needed")

    def _wait_for_disk(self, reporter: _Reporter) -> None:
        """Waits while this machine's temp folder is below its floor (the gate logs why, once)."""
        while self.disk.blocked() and not self._should_stop():
            reporter.waiting(self.disk.recheck_seconds)
            time.sleep(self.disk.recheck_seconds)

    def _probe(self, task: Task, source: Path) -> None:
        """Fails a file that is not a decodable video here, and records what the source is."""
        info = probe(source)
        self.conn.send(SourceProbed(task.url, info.codec, info.width, info.height, info.average_fps))
        logger.info(info.describe())  # with how it is shown, where that is not as stored

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


# glibc's mallopt parameter: allocations at least this large get their own mapping.
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 128 * 1024


def _unmap_large_blocks() -> None:
    """Allocations of 128 KiB and more (pictures waiting for a clip thread, libx265's frame
    buffers) get their own mapping, returned to the system when freed. By default glibc raises this
    threshold as such blocks are freed and then carves them out of its heaps, where pictures freed
    on one thread and encoders freed on another leave holes the resident size keeps (the README's
    memory section gives the figure). Elsewhere than on glibc this does nothing."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
    except (OSError, AttributeError, TypeError):
        pass


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def start_worker(
    index: int,
    conn: WorkerChannel,
    settings: Settings,
    paths: WorkerPaths,
    budget: CpuBudget | None,
    slots: ProcessingSlots | None = None,
) -> Worker:
    """What every worker does before it takes a URL, in a process or a Ray actor alike: its log
    file, an empty temp folder (what a dead predecessor with this index left goes first), the
    free-space floor of that folder (checked before each download: on a Ray node the driver cannot
    see this disk), and its backends on `budget`'s CPUs."""
    logs.configure_from_settings(
        f"worker-{index}", logs.worker_log_path(Path(paths.log_dir), index), settings.run
    )
    temp = Path(paths.temp_dir)
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True, exist_ok=True)
    service = settings.service
    disk = DiskGate([Floor("temp", temp, service.min_free_temp_mb)], service.disk_check_seconds)
    return Worker(index, conn, settings, paths, budget, disk, slots)


def worker_main(index: int, conn: WorkerChannel, settings: Settings, paths: WorkerPaths) -> None:
    """Entry point of a worker process (forked from daemon.workerserver's server, which never
    touches a GPU: nothing CUDA-related is inherited)."""
    # Ctrl-C, and the hang-up of a closed terminal or SSH session, reach the whole process group;
    # the supervisor decides how workers stop (in-flight clips first).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminate)
    _unmap_large_blocks()
    try:
        # The run's workers on this machine share its processing slots (a folder of lock files).
        slots = ProcessingSlots(Path(paths.slot_dir), processing_workers(settings))
        # Its CPU budget follows from where its backends run (CpuBudget.of_process, after the probe).
        worker = start_worker(index, conn, settings, paths, None, slots)
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
        shutil.rmtree(paths.temp_dir, ignore_errors=True)
        logger.info(f"worker {index} stopped")
    # Without the interpreter's teardown: freeing the codecs' and modules' memory took 0.4 s of
    # every run's end here (all workers at once, on the run's last step), and nothing is left to
    # save: every clip was renamed into place and every message sent (the pipe keeps what was written).
    logs.close_and_leave()
