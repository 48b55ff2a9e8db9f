"""The rest of a download on two connections, while a decoder reads it front to back.

Many servers pace each connection; near the end of a run, when no URL is left to start and a
worker idles, the link has room that one connection cannot use. A download that yt-dlp writes front
to back (daemon.arrival) then takes a second connection: `BackPart` asks for the next chunk past
yt-dlp's position with an HTTP Range request, through yt-dlp's own networking (its cookies, proxy
and headers), into a file beside the download. Once yt-dlp reaches that chunk it is stopped
(`HandedOver`), and `RestOfFile` fetches the rest in chunks on two connections, each taking the
next chunk when its last is in, and appends them to the file in order as they arrive: the file
grows front to back at the pace of both, which is what a decoder reading it as it arrives needs
(two halves fetched side by side would give it the second only at the end). The whole file is
then what yt-dlp would have written, byte for byte.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from daemon.download import DownloadCancelled

READ_BYTES = 256 * 1024
# A chunk: a second of a 4 MB/s connection, against one request's latency (tens of milliseconds).
CHUNK_BYTES = 4 * 1024 * 1024


class HandedOver(DownloadCancelled):
    """Raised in yt-dlp's progress hook: its connection reached the chunk a second one fetches."""


class BackPart:
    """Bytes [first_byte, end_byte) of `media_url`, a file of `total_bytes`, into `path`: fetched
    by `run` on the caller's thread, or by `start` on a thread of its own."""

    def __init__(
        self,
        media_url: str,
        headers: dict[str, str],
        first_byte: int,
        end_byte: int,
        total_bytes: int,
        path: Path,
        ytdlp_options: dict[str, Any],
        cancelled: threading.Event,
    ) -> None:
        self.media_url = media_url
        self.first_byte = first_byte
        self.end_byte = end_byte
        self.total_bytes = total_bytes
        self.path = path
        self.received = 0  # bytes of the part in `path`
        self.answered = False  # the server answered with exactly these bytes
        self.ended = False
        self.error: BaseException | None = None
        self._headers = {**headers, "Range": f"bytes={first_byte}-{end_byte - 1}"}
        self._plain_headers = headers
        self._options = ytdlp_options
        self._cancelled = cancelled
        self._given_up = threading.Event()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        # What the thread of `start` fetches once this part is in (RestOfFile's next chunks).
        self._then: Callable[[], None] | None = None
        self._own_part_done = False
        path.write_bytes(b"")  # there from the start, for `append_to` to open

    @property
    def size(self) -> int:
        return self.end_byte - self.first_byte

    def chunk(self, first_byte: int, end_byte: int) -> BackPart:
        """Another range of the same file, not started."""
        return BackPart(
            self.media_url,
            self._plain_headers,
            first_byte,
            end_byte,
            self.total_bytes,
            self.path.with_name(f"{self.path.name}-{first_byte}"),
            self._options,
            self._cancelled,
        )

    def start(self) -> BackPart:
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._run_then,), name="back-part", daemon=True
        )
        self._thread.start()
        return self

    def then(self, more: Callable[[], None]) -> None:
        """Once this part is in, the thread of `start` goes on with `more` (at once, on a thread of
        its own, when it is in already)."""
        with self._changed:
            if not self._own_part_done:
                self._then = more
                return
        threading.Thread(target=contextvars.copy_context().run, args=(more,), daemon=True).start()

    def _run_then(self) -> None:
        self.run()
        with self._changed:
            self._own_part_done = True
            more = self._then
        if more is not None:
            more()

    def give_up(self, wait_seconds: float = 0.0) -> None:
        """Not needed after all: the fetch stops at its next read (waited for up to `wait_seconds`:
        a read may wait up to the socket timeout), and the file goes."""
        self._given_up.set()
        if wait_seconds and self._thread is not None:
            self._thread.join(wait_seconds)
        self.path.unlink(missing_ok=True)  # a thread still writing writes to no name

    def run(self) -> None:
        try:
            if self._given_up.is_set() or self._cancelled.is_set():
                raise DownloadCancelled(self.media_url)
            self._fetch()
        except BaseException as exc:  # noqa: BLE001 - kept for the one who appends the bytes
            self.error = exc
        with self._changed:
            self.ended = True
            self._changed.notify_all()

    def _fetch(self) -> None:
        import yt_dlp
        from yt_dlp.networking import Request

        with yt_dlp.YoutubeDL({**self._options, "quiet": True, "noprogress": True}) as ydl:
            response = ydl.urlopen(Request(self.media_url, headers=self._headers))
            with contextlib.closing(response):
                self._check(response.status, response.headers.get("Content-Range"))
                with self._changed:
                    self.answered = True
                    self._changed.notify_all()
                with open(self.path, "r+b") as out:
                    while self.received < self.size:
                        if self._cancelled.is_set() or self._given_up.is_set():
                            raise DownloadCancelled(self.media_url)
                        block = response.read(min(READ_BYTES, self.size - self.received))
                        if not block:
                            raise ConnectionError(
                                f"the server ended the back part after {self.received} of {self.size} bytes"
                            )
                        out.write(block)
                        out.flush()
                        with self._changed:
                            self.received += len(block)
                            self._changed.notify_all()

    def _check(self, status: int, content_range: str | None) -> None:
        """Exactly the bytes asked for, of a file of the size yt-dlp was told: else nothing is used."""
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", (content_range or "").strip())
        expected = (str(self.first_byte), str(self.end_byte - 1), str(self.total_bytes))
        if status != 206 or match is None or match.groups() != expected:
            raise ConnectionError(
                f"the server did not send the range asked for (HTTP {status}, {content_range})"
            )

    def wait_for_answer(self, timeout: float) -> bool:
        """Whether the server answered with exactly the range asked for, within `timeout` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self.answered or self.ended, timeout)
            return self.answered and self.error is None

    def wait(self, beyond: int, timeout: float) -> None:
        """Until more than `beyond` bytes are in, it ended, or `timeout` seconds."""
        with self._changed:
            if self.received <= beyond and not self.ended:
                self._changed.wait(timeout)

    def append_to(self, part_path: Path, on_grown: Callable[[int], None], cancelled: threading.Event) -> None:
        """Appends the bytes past the end of `part_path` (which holds at least the bytes before
        this part) as they arrive, until it holds all up to `end_byte`; raises the part's failure."""
        with open(part_path, "ab") as out, open(self.path, "rb") as side:
            have, first = out.tell(), self.first_byte
            if have < self.first_byte:
                raise ConnectionError(f"{part_path} ends at {have}, before the back part at {first}")
            while have < self.end_byte:
                if cancelled.is_set():
                    raise DownloadCancelled(self.media_url)
                offset = have - self.first_byte
                if self.received <= offset:
                    if self.ended:
                        raise self.error or ConnectionError("the back part ended early")
                    self.wait(offset, 0.5)
                    continue
                data = os.pread(side.fileno(), min(4 * READ_BYTES, self.received - offset), offset)
                out.write(data)
                out.flush()
                have += len(data)
                on_grown(have)
        logger.debug(f"appended bytes {first}-{self.end_byte - 1} to {part_path.name}")


class RestOfFile:
    """The bytes of a file from `have` on, in chunks: the one `running` fetches already (a gap
    before it, if yt-dlp stopped short of it, comes first), then `chunk_bytes` at a time, fetched by
    two connections, each taking the next chunk when its last is in, and appended in order."""

    def __init__(self, running: BackPart, have: int, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.chunks: list[BackPart] = []
        if have < running.first_byte:
            self.chunks.append(running.chunk(have, running.first_byte))
        self.chunks.append(running)
        first = running.end_byte
        while first < running.total_bytes:
            end = min(running.total_bytes, first + chunk_bytes)
            self.chunks.append(running.chunk(first, end))
            first = end
        self._waiting = [chunk for chunk in self.chunks if chunk is not running]
        self._lock = threading.Lock()
        self._stopped = False
        running.then(self._fetch_waiting)  # its connection goes on with the next chunks
        threading.Thread(  # and a second one, from the first chunk not yet asked for
            target=contextvars.copy_context().run, args=(self._fetch_waiting,), name="back-part", daemon=True
        ).start()

    def _take(self) -> BackPart | None:
        with self._lock:
            if self._stopped or not self._waiting:
                return None
            return self._waiting.pop(0)

    def _fetch_waiting(self) -> None:
        while (chunk := self._take()) is not None:
            chunk.run()
            if chunk.error is not None:
                return  # the appender raises it; the chunks after it are not asked for

    def append_to(self, part_path: Path, on_grown: Callable[[int], None], cancelled: threading.Event) -> None:
        for chunk in self.chunks:
            chunk.append_to(part_path, on_grown, cancelled)
            chunk.path.unlink(missing_ok=True)

    def give_up(self, wait_seconds: float = 0.0) -> None:
        with self._lock:
            self._stopped = True
        for chunk in self.chunks:
            chunk.give_up(wait_seconds)
