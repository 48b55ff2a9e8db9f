"""URL lists: one URL or local file per line, `#` comments, duplicates dropped."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from yt_dlp.extractor.generic import GenericIE
from yt_dlp.extractor.youtube import YoutubeIE

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
        return f"{self.list_path}:{self.line}: {self.reason}: {self.text!r}"


@dataclass(frozen=True)
class UrlList:
    sources: list[Source]
    rejected: list[Rejected]

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


def parse_url_list(path: Path, text: str | None = None) -> UrlList:
    """Read a URL list. Bad lines are reported as `file:line: reason` and skipped."""
    if text is None:
        text = path.read_text(encoding="utf-8")
    sources: list[Source] = []
    rejected: list[Rejected] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("http://", "https://")):
            parsed = urllib.parse.urlparse(line)
            if not parsed.netloc or any(c.isspace() for c in line):
                rejected.append(Rejected(str(path), number, line, "not a valid URL"))
                continue
            url = line
        else:
            candidate = Path(line).expanduser()
            if not candidate.is_absolute():
                candidate = (path.parent / candidate).resolve()
            # A named pipe is a source too: another program can stream a video into it.
            if not (candidate.is_file() or candidate.is_fifo()):
                rejected.append(
                    Rejected(str(path), number, line, "neither an http(s) URL nor an existing file")
                )
                continue
            url = str(candidate)
        if url in seen:
            continue
        seen.add(url)
        sources.append(Source(url=url, video_id=video_id_for(url), line=number, list_path=str(path)))
    return UrlList(sources=sources, rejected=rejected)
