"""A source read while it downloads.

yt-dlp writes a plain HTTP download front to back into one file. The bytes before the file's
current end are final, so a decoder may read them before the rest arrives: a read past the end waits
for the download to write more, or to end. Nothing is read that the finished file would not hold,
so what is cut from the arriving file is what would be cut from the whole one; a container whose
index comes last (an MP4 with its `moov` at the end) just makes the first read wait for the whole
file.

`BackgroundDownload` runs the download on a thread and tells an `Arrival` what it wrote; decoders
open an `ArrivingFile` on it, through `media_input`, which gives a plain path for any file that is
not arriving.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from loguru import logger

from daemon.backpart import CHUNK_BYTES, BackPart, HandedOver, RestOfFile
from daemon.config import DownloadSettings, OutputSettings
from daemon.download import DownloadCancelled, DownloadFailure, download, ytdlp_options

# How long yt-dlp's connection waits, where the back part begins, for the server to answer the
# back part's request before it fetches the rest itself.
ANSWER_SECONDS = 5.0

# How long a waiting reader sleeps at most between looks at the file: writes are announced, but a
# write yt-dlp buffers reaches the file only at its next flush.
LOOK_SECONDS = 0.05


class ReadInterrupted(Exception):
    """A signal's exception (SystemExit from SIGTERM) raised while a read waited for bytes. FFmpeg
    calls the read, and PyAV carries only Exceptions back out of it: the signal's would end the
    process on the spot, or be lost. VideoSource raises `reason` again, as itself."""

    def __init__(self, reason: BaseException) -> None:
        super().__init__(repr(reason))
        self.reason = reason


class Arrival:
    """What one download has written so far: the file, whether it ended and how. Shared by the
    thread that downloads and the threads that decode meanwhile."""

    def __init__(self, url: str = "", on_bytes: Callable[[], None] | None = None) -> None:
        self.url = url
        self._changed = threading.Condition()
        self.part_path: Path | None = None  # the file being written (yt-dlp's `.part`)
        self.final_path: Path | None = None  # its name once whole
        # Its whole size, where the server said it: an MP4 demuxer stops looking for more of the
        # index at the end of the file it knows of, instead of reading on to the end to see.
        self.total_bytes: int | None = None
        self.readable = False  # written front to back by one writer: may be read as it arrives
        self.format_id: str | None = None
        self.ended = False
        self.error: BaseException | None = None
        # Set when the download starts again as another file: what was read may not be in it.
        self.abandoned: DownloadFailure | None = None
        self._on_bytes = on_bytes  # a sign of life for the stall watchdog, from a waiting reader
        # Gives the worker's processing slot back while a reader waits for bytes (see `starving`).
        self.lend_slot: Callable[[], AbstractContextManager[None]] | None = None
        self._lending = threading.Lock()

    # The download thread's side.

    def wrote(
        self,
        part_path: Path,
        final_path: Path,
        readable: bool,
        total_bytes: int | None,
        format_id: str | None = None,
    ) -> None:
        with self._changed:
            if self.part_path is None:
                self.part_path, self.final_path, self.readable = part_path, final_path, readable
                self.total_bytes, self.format_id = total_bytes, format_id
            elif (part_path, total_bytes, format_id) != (self.part_path, self.total_bytes, self.format_id):
                # A retry that looked the URL up again and got another format: the bytes read so
                # far may not be this file's. (A retry that resumes the same file goes on.)
                self.abandoned = self.abandoned or DownloadFailure(
                    self.url, "the download started again as another file while it was cut", "transient"
                )
            self._changed.notify_all()

    def end(self, final_path: Path | None, error: BaseException | None) -> None:
        with self._changed:
            self.ended, self.error = True, error
            if final_path is not None:
                self.final_path = final_path
            self._changed.notify_all()

    # The readers' side.

    def wait_for_start(self, meanwhile: Callable[[], object] = lambda: None) -> None:
        """Until the file exists or the download ended; `meanwhile` is called between looks (the
        worker reads what the supervisor said)."""
        with self._changed:
            while self.part_path is None and not self.ended:
                meanwhile()
                self._changed.wait(LOOK_SECONDS)

    def wait_for_end(self, meanwhile: Callable[[], object] = lambda: None) -> None:
        with self._changed:
            while not self.ended:
                meanwhile()
                self._changed.wait(LOOK_SECONDS)

    def grew(self) -> None:
        """More bytes are in the file (written by another hand than yt-dlp's: daemon.backpart)."""
        with self._changed:
            self._changed.notify_all()

    def open(self) -> ArrivingFile:
        return ArrivingFile(self)

    def _wait(self, enough: Callable[[], bool]) -> None:
        """Until `enough()` or the download ended; its failure is raised here, in the reader (and
        inside `starving`, so that a failing reader takes no slot back)."""
        with self.starving():
            try:
                with self._changed:
                    while not enough() and not self.ended and self.abandoned is None:
                        self._changed.wait(LOOK_SECONDS)
            except Exception:
                raise
            except BaseException as exc:
                raise ReadInterrupted(exc) from exc
            if self.abandoned is not None:
                raise self.abandoned
            if not enough() and self.error is not None:
                raise self.error
        if self._on_bytes is not None:
            self._on_bytes()

    @contextlib.contextmanager
    def starving(self) -> Iterator[None]:
        """While a reader waits for bytes its worker burns no CPU: the processing slot goes back for
        the wait, so that a worker with a whole source cuts meanwhile, and is taken again after."""
        lend = self.lend_slot
        if lend is None or not self._lending.acquire(blocking=False):
            yield  # no slot to lend, or another reader of this worker has lent it already
            return
        try:
            with lend():
                yield
        finally:
            self._lending.release()


class ArrivingFile:
    """A read-only file object over an arriving file: reads wait for bytes not yet written, and
    the end of the file is the end of the download."""

    def __init__(self, arrival: Arrival) -> None:
        self.arrival = arrival
        self.name = str(arrival.final_path)  # what FFmpeg's messages call it
        self._fd = self._open()
        self._position = 0

    def _open(self) -> int:
        arrival = self.arrival
        for path in (arrival.part_path, arrival.final_path):  # renamed when whole
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    return os.open(path, os.O_RDONLY)
        raise FileNotFoundError(f"{arrival.part_path}: the download's file is gone")

    def _size(self) -> int:
        return os.fstat(self._fd).st_size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        arrival = self.arrival
        if size < 0:
            arrival._wait(lambda: False)  # all of it: the download's end
            size = max(0, self._size() - self._position)
        while True:
            if arrival.abandoned is not None:
                raise arrival.abandoned
            if self._size() <= self._position:
                arrival._wait(lambda: self._size() > self._position)
            data = os.pread(self._fd, size, self._position)
            if data or arrival.ended:
                break
            # Nothing where the file had bytes: yt-dlp started it again from the beginning (a
            # server without ranges); the same bytes come back.
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            self._position = offset
        elif whence == os.SEEK_CUR:
            self._position += offset
        elif self.arrival.ended:
            self._position = self._size() + offset
        elif self.arrival.total_bytes is not None:
            self._position = self.arrival.total_bytes + offset
        else:
            # From an end not known yet. FFmpeg asks for the file's size this way and takes -1 as
            # "unknown"; waiting here would make opening the file wait for all of it.
            return -1
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ArrivingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# The files being read as they arrive, in this process (a worker cuts one source at a time).
_arriving: dict[str, Arrival] = {}
_arriving_lock = threading.Lock()


@contextlib.contextmanager
def arriving(path: Path, arrival: Arrival) -> Iterator[None]:
    """While the body runs, decoders opening `path` read it through `arrival`."""
    with _arriving_lock:
        _arriving[str(path)] = arrival
    try:
        yield
    finally:
        with _arriving_lock:
            _arriving.pop(str(path), None)


def media_input(path: Path) -> str | ArrivingFile:
    """What a decoder opens for `path`: the arriving file while it downloads, else the path."""
    with _arriving_lock:
        arrival = _arriving.get(str(path))
    if arrival is None:
        return str(path)
    return arrival.open()


def readable_as_it_arrives(status: dict[str, Any], options: dict[str, Any]) -> bool:
    """Whether yt-dlp writes this download front to back, as the file it keeps: one plain HTTP
    stream (not fragments, not an external downloader writing pieces out of order), not one of
    several formats merged later, and not a file it rewrites after (a stretched picture's fix)."""
    info = status.get("info_dict") or {}
    return (
        info.get("protocol") in ("http", "https")
        and not options.get("external_downloader")
        and not info.get("requested_formats")
        and info.get("stretched_ratio") in (None, 1)
        and not options.get("postprocessors")  # remuxing or recoding asked for in extra_options
        and bool(status.get("tmpfilename"))
    )


class BackgroundDownload:
    """`download` on a thread of its own, its file readable as it arrives (daemon.arrival).

    The thread runs in a copy of the caller's logging context (its log lines name the video), and
    never talks to the supervisor: the caller sends what there is to send."""

    def __init__(
        self,
        url: str,
        folder: Path,
        settings: DownloadSettings,
        output: OutputSettings,
        on_retry: Callable[[DownloadFailure, int, float], None] | None = None,
        on_bytes: Callable[[], None] | None = None,
        between_reads: Callable[[], None] = lambda: None,
    ) -> None:
        self.url = url
        self.arrival = Arrival(url, on_bytes)
        self._between_reads = between_reads  # the worker reads what the supervisor said
        self.cancelled = threading.Event()
        self._on_bytes = on_bytes
        self._options = ytdlp_options(settings, output, folder)
        # A second connection for the back part of the file, when the supervisor has one to spare
        # (daemon.backpart); never past a rate limit or request pacing the user set.
        # Below download.spare_connection_min_mb a request's latency would eat what it saves.
        self._split_min_bytes = int(settings.spare_connection_min_mb * 1024 * 1024)
        self._may_split = bool(
            self._split_min_bytes and not settings.rate_limit and not settings.sleep_interval_seconds
        )
        self._connection_offered = threading.Event()
        self._back: BackPart | None = None
        self._downloaded = 0
        self._thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._run, folder, settings, output, on_retry),
            name="download",
            daemon=True,
        )
        self.started = time.monotonic()
        self.seconds = 0.0  # how long it took, once ended

    def start(self) -> BackgroundDownload:
        self._thread.start()
        return self

    def _run(
        self,
        folder: Path,
        settings: DownloadSettings,
        output: OutputSettings,
        on_retry: Callable[[DownloadFailure, int, float], None] | None,
    ) -> None:
        def fetch() -> Path:
            return download(
                self.url,
                folder,
                settings,
                output,
                on_retry,
                on_progress=self._progress,
                retry_site_blocks=False,  # the supervisor pauses the site for every worker at once
                cancelled=self.cancelled,
            )

        try:
            handed_over = False
            try:
                path = fetch()
            except HandedOver:
                handed_over = True
            if handed_over:
                # Out of the handler: the exception's frames held yt-dlp's response open, and the
                # server kept filling the socket's buffers with bytes the back part brings.
                gc.collect()
                path = self._join_back_part(fetch)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, who raises it
            self.seconds = time.monotonic() - self.started
            self.arrival.end(None, exc)
        else:
            self.seconds = time.monotonic() - self.started
            logger.info(f"downloaded {path.name} ({path.stat().st_size} bytes) in {self.seconds:.1f}s")
            self.arrival.end(path, None)

    def _progress(self, status: dict[str, Any]) -> None:
        if self._on_bytes is not None:
            self._on_bytes()
        self._between_reads()
        if status.get("status") == "downloading" and status.get("tmpfilename"):
            total = status.get("total_bytes")
            before, self._downloaded = self._downloaded, int(status.get("downloaded_bytes") or 0)
            readable = readable_as_it_arrives(status, self._options)
            self.arrival.wrote(
                Path(status["tmpfilename"]),
                Path(status.get("filename") or status["tmpfilename"]),
                readable,
                int(total) if total else None,
                (status.get("info_dict") or {}).get("format_id"),
            )
            if readable:
                self._split(status, self._downloaded - before)

    # The back part on a second connection (daemon.backpart).

    def offer_connection(self) -> None:
        """The supervisor has a connection to spare (no URL waits, a worker idles): the download
        takes it for its back part at its next progress report, if enough is left."""
        self._connection_offered.set()

    def bytes_left(self) -> int | None:
        """What is left to download, where known; None once it ended."""
        total = self.arrival.total_bytes
        if self.arrival.ended or total is None:
            return None
        return max(0, total - self._downloaded)

    def _split(self, status: dict[str, Any], block: int) -> None:
        """In yt-dlp's progress hook (after a read of `block` bytes): when a connection was offered,
        it fetches the chunk past yt-dlp's next read; yt-dlp is stopped (HandedOver) before its next
        read would reach that chunk. Its reads wait for a whole block of up to 4 MiB: one read into
        the chunk would fetch that much twice. The few bytes left before the chunk come on a
        request of their own, then the rest in chunks on two connections (`_join_back_part`)."""
        back, downloaded = self._back, self._downloaded
        if back is not None:
            if downloaded + block >= back.first_byte:
                # Its answer is due (a request's latency): the front waits a moment for it.
                if back.wait_for_answer(ANSWER_SECONDS):
                    raise HandedOver(self.url)
                back.give_up()  # it never got going: this connection fetches the rest
                self._back = None
            return
        if not self._connection_offered.is_set():
            return
        self._connection_offered.clear()
        info = status.get("info_dict") or {}
        total = self.arrival.total_bytes
        if not self._may_split or total is None or not info.get("url"):
            return
        # The chunk past yt-dlp's next read (up to twice its last), which has begun.
        first = downloaded + 2 * block
        if total - downloaded < self._split_min_bytes or first >= total:
            logger.info(f"no second connection for {self.url}: {(total - downloaded) / 1e6:.1f} MB left")
            return
        self._back = BackPart(
            info["url"],
            dict(info.get("http_headers") or {}),
            first,
            min(total, first + CHUNK_BYTES),
            total,
            Path(f"{status['tmpfilename']}.back"),
            self._options,
            self.cancelled,
        ).start()
        logger.info(
            f"a spare connection joins the download of {self.url} from byte {first} "
            f"({(total - downloaded) / 1e6:.1f} MB left): the rest comes on two connections"
        )

    def _join_back_part(self, fetch: Callable[[], Path]) -> Path:
        """yt-dlp stopped before the chunk the spare connection fetches: the rest comes in chunks on
        two connections, appended in order as it arrives, and the file takes its final name as
        yt-dlp would give it. If a chunk fails, yt-dlp goes on from the end of the file (it resumes
        a `.part` file) on its own connection."""
        back, arrival = self._back, self.arrival
        assert back is not None and arrival.part_path is not None and arrival.final_path is not None
        self._back = None
        # yt-dlp closed its file on the way out: it holds every byte before `have`.
        rest = RestOfFile(back, arrival.part_path.stat().st_size)
        try:
            rest.append_to(arrival.part_path, self._appended, self.cancelled)
        except DownloadCancelled:
            rest.give_up()
            raise
        except Exception as exc:  # noqa: BLE001 - the download goes on without it
            rest.give_up(wait_seconds=5)
            logger.warning(f"{self.url}: the second connection failed ({exc}); yt-dlp fetches the rest")
            return fetch()
        # The rename yt-dlp would do at its end, within the worker's temp folder: not an output.
        arrival.part_path.replace(arrival.final_path)
        return arrival.final_path

    def _appended(self, have: int) -> None:
        self._downloaded = have
        self.arrival.grew()
        if self._on_bytes is not None:
            self._on_bytes()

    def stop(self) -> None:
        """Ends the download if it still runs (its bytes are not needed) and waits for the thread."""
        if self._thread.is_alive():
            self.cancelled.set()
            self._thread.join()
        back = self._back
        if back is not None:
            back.give_up(wait_seconds=5)

    @property
    def cancelled_early(self) -> bool:
        return isinstance(self.arrival.error, DownloadCancelled)
