"""The back part of a download, fetched on a second connection while yt-dlp fetches the front.

Many servers pace each connection; near the end of a run, when no URL is left to start and a
worker idles, the link has room that one connection cannot use. A download that yt-dlp writes front
to back (daemon.arrival) is then split where half of what is left begins: `BackPart` asks for the
bytes from there to the end with an HTTP Range request, through yt-dlp's own networking (its
cookies, proxy and headers), into a file beside the download. Once yt-dlp reaches those bytes it is
stopped (`HandedOver`), and the back part's bytes are appended to its file as they come; the whole
file is then what yt-dlp would have written, byte for byte.
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


class HandedOver(DownloadCancelled):
    """Raised in yt-dlp's progress hook: its connection reached the bytes the back part fetches."""


class BackPart:
    """Bytes [first_byte, end_byte) of `media_url`, a file of `total_bytes`, into `path`, on a
    thread of their own."""

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
        self._thread = threading.Thread(
            target=contextvars.copy_context().run, args=(self._run,), name="back-part", daemon=True
        )

    @property
    def size(self) -> int:
        return self.end_byte - self.first_byte

    def before(self, first_byte: int) -> BackPart:
        """The bytes from `first_byte` up to this part, on a connection of their own."""
        path = self.path.with_name(f"{self.path.name}-{first_byte}")
        return BackPart(
            self.media_url,
            self._plain_headers,
            first_byte,
            self.first_byte,
            self.total_bytes,
            path,
            self._options,
            self._cancelled,
        ).start()

    def start(self) -> BackPart:
        self.path.write_bytes(b"")  # there from the start, for `append_to` to open
        self._thread.start()
        return self

    def give_up(self, wait_seconds: float = 0.0) -> None:
        """Not needed after all: the thread stops at its next read (waited for up to `wait_seconds`:
        a read may wait up to the socket timeout), and the file goes."""
        self._given_up.set()
        if wait_seconds:
            self._thread.join(wait_seconds)
        self.path.unlink(missing_ok=True)  # a thread still writing writes to no name

    def _run(self) -> None:
        try:
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
