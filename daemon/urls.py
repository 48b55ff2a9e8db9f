"""URL lists: one URL or local file per line, `#` comments, duplicates dropped."""

from __future__ import annotations

import io
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from yt_dlp.extractor.generic import GenericIE
from yt_dlp.extractor.youtube import YoutubeIE

from daemon.textfiles import shown, text_lines

# yt-dlp names files after the id; a clip file name must not be able to escape the clip folder.
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class Source:
    """One line of a URL list: what to fetch and the id its clip file is named after."""

    url: str  # the http(s) URL, or the absolute path of a local file
    video_id: str
    line: int
    list_path: str

    @property
    def is_local(self) -> bool:
        return not self.url.startswith(("http://", "https://"))


@dataclass(frozen=True)
class Rejected:
    """A line of a URL list that names nothing to fetch; kept in the ledger so `status` counts it."""

    list_path: str
    line: int
    text: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.list_path}:{self.line}: {self.reason}"
        return f"{where}: {shown(self.text)}" if self.text else where


@dataclass(frozen=True)
class UrlList:
    sources: list[Source]
    rejected: list[Rejected]
    path: str = ""  # the list, as its lines name it ("<stdin>" for standard input)

    @property
    def problems(self) -> list[str]:
        """One `file:line: reason: 'text'` per rejected line."""
        return [str(rejected) for rejected in self.rejected]


def video_id_for(url: str) -> str:
    """The id yt-dlp gives the video, known without any network access."""
    if YoutubeIE.suitable(url):
        video_id = YoutubeIE.get_temp_id(url)
        if video_id:
            return str(video_id)
    parsed = urllib.parse.urlparse(url)
    raw = GenericIE._generic_id(url) if parsed.scheme in ("http", "https") else Path(url).stem
    cleaned = _SAFE_ID.sub("_", raw).strip("._")
    return cleaned or "video"


MAX_URL_LINE_BYTES = 8 * 1024  # the longest URLs browsers and servers take are about this long


def read_url_list(path: Path, handle: BinaryIO, base_dir: Path | None = None) -> UrlList:
    """Read a URL list from an open binary stream (a file, a pipe, stdin), once, to its end.

    Bad lines are reported as `file:line: reason` and skipped; each line is decoded on its own, a
    byte-order mark and CRLF line ends are accepted, and no line is kept past MAX_URL_LINE_BYTES.
    Relative local paths are taken from `base_dir`, by default the list's folder.
    """
    base = base_dir if base_dir is not None else path.parent
    sources: list[Source] = []
    rejected: list[Rejected] = []
    seen: set[str] = set()
    for text_line in text_lines(handle, MAX_URL_LINE_BYTES):
        number = text_line.number
        if text_line.text is None:
            rejected.append(Rejected(str(path), number, "", str(text_line.problem)))
            continue
        line = text_line.text.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("http://", "https://")):
            parsed = urllib.parse.urlparse(line)
            if not parsed.netloc or any(c.isspace() for c in line):
                rejected.append(Rejected(str(path), number, line, "not a valid URL"))
                continue
            url = line
        else:
            try:
                candidate = Path(line).expanduser()
                if not candidate.is_absolute():
                    candidate = (base / candidate).resolve()
                # A named pipe is a source too: another program can stream a video into it.
                exists = candidate.is_file() or candidate.is_fifo()
            except (OSError, ValueError, RuntimeError):  # a name too long, a NUL byte, a symlink loop
                exists = False
            if not exists:
                rejected.append(
                    Rejected(str(path), number, line, "neither an http(s) URL nor an existing file")
                )
                continue
            url = str(candidate)
        if url in seen:
            continue
        seen.add(url)
        sources.append(Source(url=url, video_id=video_id_for(url), line=number, list_path=str(path)))
    return UrlList(sources=sources, rejected=rejected, path=str(path))


def parse_url_list(path: Path, text: str | bytes | None = None) -> UrlList:
    """Read the URL list at `path`, or given as `text` (relative paths then still from path's folder)."""
    if text is None:
        with path.open("rb") as handle:
            return read_url_list(path, handle)
    data = text.encode("utf-8") if isinstance(text, str) else text
    return read_url_list(path, io.BytesIO(data))
