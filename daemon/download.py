"""Fetching one URL with yt-dlp, retrying what is transient and failing fast on what is not.

yt-dlp (and tenacity, which brings asyncio) are imported by the first download, not with this
module: a worker that only processes local files does without them (the README's memory figures
say how much that saves)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from daemon.config import DownloadSettings, OutputSettings
from daemon.failures import (
    Failure,
    Kind,
    Scope,
    disk_full,
    is_disk_full,
    permanent,
    site_blocked,
    transient,
)
from daemon.sites import block_text, page_block_text, retry_after_seconds, site_of

if TYPE_CHECKING:
    import tenacity

# yt-dlp's first read; it then sizes its reads to about a second of data (at most 4 MiB), so a slow
# link still shows signs of life every second. Its own first read, 1 KiB, costs many small reads
# before the size grows.
FIRST_READ_BYTES = 64 * 1024

# Kinds that are the site's answer to us as a whole, not this URL's: the supervisor's site breaker
# decides the wait for every worker at once.
SITE_BLOCK_KINDS = ("rate_limited", "blocked")

# Message fragments of failures that no retry can fix.
_PERMANENT_HINTS = (
    "unsupported url",
    "private video",
    "video unavailable",
    "has been removed",
    "not available",
    "account associated with this video has been terminated",
    "sign in to confirm your age",
    "members-only",
    "requested format is not available",
    "copyright",
    "does not exist",
)
_TRANSIENT_HINTS = (
    "timed out",
    "timeout",
    "connection reset",
    "connection refused",
    "connection aborted",
    "remote end closed",
    "incomplete",
    "temporary failure",
    "try again later",
    "bytes read",
)


@dataclass
class DownloadFailure(Exception):
    url: str
    reason: str
    kind: str  # "transient", "rate_limited", "blocked" (a bot check…), "permanent" or "disk_full"
    retry_after_seconds: float = 0.0
    http_status: int = 0

    def __str__(self) -> str:
        return self.reason

    @property
    def transient(self) -> bool:
        """Worth another attempt now, within this download's retries."""
        return self.kind in ("transient", *SITE_BLOCK_KINDS)

    @property
    def site_block(self) -> bool:
        return self.kind in SITE_BLOCK_KINDS

    def failure(self, folder: Path) -> Failure:
        """In the run's vocabulary: a full temp folder is that folder's condition, not the URL's."""
        reason = f"download: {self.reason}"
        if self.kind == "disk_full":
            return disk_full(folder, reason)
        if self.site_block:
            return site_blocked(site_of(self.url), reason, self.retry_after_seconds)
        if self.http_status == 403:
            # Signed media URLs expire and a page may refuse one request: the URL is tried again
            # (with a budget of its own, see policy), and 403s across a site's URLs block the site.
            return Failure(Scope.URL, Kind.TRANSIENT, reason, where=site_of(self.url), http_status=403)
        if self.kind == "permanent":
            return permanent(Scope.URL, reason)
        return transient(Scope.URL, reason, self.retry_after_seconds)


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and what it wraps, through yt-dlp's exc_info and cause attributes."""
    seen: list[BaseException] = []
    pending: list[BaseException | None] = [exc]
    while pending:
        item = pending.pop()
        if item is None or item in seen or len(seen) > 10:
            continue
        seen.append(item)
        info = getattr(item, "exc_info", None)
        if isinstance(info, tuple) and len(info) > 1 and isinstance(info[1], BaseException):
            pending.append(info[1])
        cause = getattr(item, "cause", None)
        if isinstance(cause, BaseException):
            pending.append(cause)
        pending.append(item.__cause__)
        pending.append(item.__context__)
    return seen


def _clean(message: str) -> str:
    message = message.replace("ERROR: ", "").strip()
    return " ".join(message.split())


def classify(url: str, exc: BaseException) -> DownloadFailure:
    from yt_dlp.networking.exceptions import HTTPError, IncompleteRead, TransportError
    from yt_dlp.utils import ExtractorError, UnsupportedError

    chain = _chain(exc)
    message = _clean(str(exc)) or type(exc).__name__
    # yt-dlp reports a failed write as a message; the OSError may or may not travel with it.
    if any(is_disk_full(item) for item in chain) or "no space left on device" in message.lower():
        return DownloadFailure(url, f"no space left for the download: {message}", "disk_full")
    for item in chain:
        if isinstance(item, HTTPError):
            status = item.status
            if status == 429:
                wait = retry_after_seconds(item.response.headers.get("Retry-After"))
                after = f" (Retry-After {wait:g}s)" if wait else ""
                return DownloadFailure(
                    url, f"HTTP 429 Too Many Requests{after}: {message}", "rate_limited", wait, 429
                )
            if status >= 500 or status == 408:
                return DownloadFailure(url, f"HTTP {status}: {message}", "transient", http_status=status)
            if status == 403 and not any(isinstance(other, ExtractorError) for other in chain):
                # The media request, not the page: its signed URL may have expired; yt-dlp looks
                # the page up again on the next attempt.
                return DownloadFailure(url, f"HTTP 403: {message}", "transient", http_status=403)
            return DownloadFailure(url, f"HTTP {status}: {message}", "permanent", http_status=status)
    blocked = block_text(message)
    if blocked is not None:
        return DownloadFailure(url, f"site blocks us ({blocked.what}): {message}", "blocked")
    for item in chain:
        if isinstance(item, UnsupportedError):
            return DownloadFailure(url, f"unsupported URL: {message}", "permanent")
        if isinstance(item, (IncompleteRead, TransportError, TimeoutError, ConnectionError)):
            return DownloadFailure(url, message, "transient")
    lowered = message.lower()
    if any(hint in lowered for hint in _TRANSIENT_HINTS):
        return DownloadFailure(url, message, "transient")
    if any(hint in lowered for hint in _PERMANENT_HINTS):
        return DownloadFailure(url, message, "permanent")
    if any(isinstance(item, ExtractorError) and item.expected for item in chain):
        return DownloadFailure(url, message, "permanent")
    # Unknown errors get the benefit of the doubt, but only `attempts` times.
    return DownloadFailure(url, message, "transient")


class _YtdlpLog:
    """Routes yt-dlp's own messages into the worker's log instead of the terminal."""

    def debug(self, message: str) -> None:
        if message.startswith("[debug] "):
            return
        logger.debug(message)

    def info(self, message: str) -> None:
        logger.debug(message)

    def warning(self, message: str) -> None:
        logger.warning(_clean(message))

    def error(self, message: str) -> None:
        logger.debug(_clean(message))


JS_RUNTIME_INSTALL = "pip install 'yt-dlp[default]' deno"


def js_runtimes() -> dict[str, dict[str, str]]:
    """yt-dlp's js_runtimes option: the Deno binary the `deno` package installs (YouTube needs a
    JavaScript runtime), else yt-dlp's own search for deno on the PATH."""
    try:
        import deno

        return {"deno": {"path": str(deno.find_deno_bin())}}
    except (ImportError, OSError):
        return {"deno": {}}


def js_runtime_line(settings: DownloadSettings) -> tuple[bool, str]:
    """Which JavaScript runtime yt-dlp will use, in one line; False when it has none."""
    from yt_dlp.globals import supported_js_runtimes

    runtimes = settings.extra_options.get("js_runtimes") or js_runtimes()
    for name, config in runtimes.items():
        runtime = supported_js_runtimes.value.get(name)
        info = runtime(path=(config or {}).get("path")).info if runtime else None
        if info is not None and info.supported is not False:
            return (
                True,
                f"yt-dlp's JavaScript runtime (YouTube needs one): {info.name} {info.version} ({info.path})",
            )
    return False, (
        "yt-dlp finds no JavaScript runtime: YouTube extraction may miss formats or fail; "
        f"install one with: {JS_RUNTIME_INSTALL}"
    )


def ytdlp_options(settings: DownloadSettings, output: OutputSettings, folder: Path) -> dict[str, Any]:
    from yt_dlp.utils import parse_bytes

    options: dict[str, Any] = {
        "format": settings.format.format(width=output.width, height=output.height),
        "outtmpl": {"default": str(folder / "%(id)s.%(ext)s")},
        "noplaylist": True,
        "quiet": True,
        "no_warnings": False,
        "noprogress": True,
        "logger": _YtdlpLog(),
        # Retries are ours (with backoff and a record of each); yt-dlp's own would hide them.
        "retries": 0,
        "fragment_retries": 0,
        "extractor_retries": 0,
        "continuedl": True,
        "buffersize": FIRST_READ_BYTES,
        "overwrites": False,
        "socket_timeout": settings.socket_timeout_seconds,
        "restrictfilenames": True,
        "windowsfilenames": False,
        "js_runtimes": js_runtimes(),
    }
    if settings.cookies_file:
        options["cookiefile"] = str(Path(settings.cookies_file).expanduser())
    if settings.proxy:
        options["proxy"] = settings.proxy
    if settings.rate_limit:
        options["ratelimit"] = parse_bytes(settings.rate_limit)
    if settings.sleep_interval_seconds:
        options["sleep_interval_requests"] = settings.sleep_interval_seconds
        options["sleep_interval"] = settings.sleep_interval_seconds
    if settings.max_filesize_mb:
        options["max_filesize"] = int(settings.max_filesize_mb * 1024 * 1024)
    options.update(settings.extra_options)
    return options


def _download_once(url: str, options: dict[str, Any], folder: Path) -> Path:
    import yt_dlp
    from yt_dlp.utils import DownloadError, ExtractorError

    try:
        with yt_dlp.YoutubeDL(options) as ydl:
            info = ydl.extract_info(url, download=True)
    except (DownloadError, ExtractorError) as exc:
        failure = classify(url, exc)
        if failure.kind == "permanent" and failure.reason.startswith("unsupported URL"):
            failure = _page_block(url, options) or failure
        raise failure from exc
    except OSError as exc:
        kind = "disk_full" if is_disk_full(exc) else "transient"
        raise DownloadFailure(url, f"{type(exc).__name__}: {exc}", kind) from exc
    if info is None:
        raise DownloadFailure(url, "yt-dlp returned nothing for this URL", "permanent")
    if info.get("_type") == "playlist":
        raise DownloadFailure(url, "URL is a playlist, not one video", "permanent")
    paths = [Path(d["filepath"]) for d in info.get("requested_downloads") or [] if d.get("filepath")]
    existing = [p for p in paths if p.is_file()]
    if not existing:
        limit = options.get("max_filesize")
        if limit:
            raise DownloadFailure(
                url,
                f"larger than download.max_filesize_mb ({limit / 1024 / 1024:.3g} MB); abandoned",
                "permanent",
            )
        raise DownloadFailure(url, "yt-dlp finished but wrote no file", "transient")
    if len(existing) > 1:
        raise DownloadFailure(
            url,
            "format needs merging into one file; set download.format to a single-file format",
            "permanent",
        )
    return existing[0]


# How much of a page is read to see whether it is a block page rather than a video.
PAGE_SNIFF_BYTES = 64 * 1024


def _page_block(url: str, options: dict[str, Any]) -> DownloadFailure | None:
    """An http(s) URL that yt-dlp calls unsupported may be a site's bot check or rate-limit page
    (an HTML page with status 200 where the video should be): read the start of it, through
    yt-dlp's own networking (its cookies and proxy), and say so if it is one."""
    import yt_dlp

    try:
        with yt_dlp.YoutubeDL({**options, "logger": _YtdlpLog()}) as ydl:
            response = ydl.urlopen(url)
            page = response.read(PAGE_SNIFF_BYTES).decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - no page to read: the URL stays unsupported, as yt-dlp said
        return None
    blocked = page_block_text(page)
    if blocked is None:
        return None
    return DownloadFailure(url, f"site blocks us ({blocked}): its page says so instead of a video", "blocked")


def _wait_seconds(settings: DownloadSettings) -> Callable[[tenacity.RetryCallState], float]:
    def wait(state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        attempt = state.attempt_number
        base = settings.backoff_initial_seconds
        if isinstance(exc, DownloadFailure) and exc.kind == "rate_limited":
            base = max(base, settings.rate_limited_backoff_seconds)
        ceiling = max(settings.backoff_max_seconds, base)
        delay = min(ceiling, base * 2 ** (attempt - 1))
        # Full jitter keeps workers that failed together from retrying together.
        return random.uniform(delay / 2, delay)

    return wait


class DownloadCancelled(Exception):
    """Raised in yt-dlp's progress hook to end a download nobody needs any more."""


def download(
    url: str,
    folder: Path,
    settings: DownloadSettings,
    output: OutputSettings,
    on_retry: Callable[[DownloadFailure, int, float], None] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    retry_site_blocks: bool = True,
    cancelled: threading.Event | None = None,
) -> Path:
    """Download `url` into `folder` and return the file; raises DownloadFailure after the last attempt.

    `on_progress` gets yt-dlp's progress reports as data arrives (often: throttle on the other
    side). With `retry_site_blocks` False (a worker of a run: the supervisor's site breaker decides
    the wait for all workers) a sign that the site blocks us ends the download at once; a 403 on
    the media is tried once more (yt-dlp looks the page up again), not more. Once `cancelled` is
    set the download ends (DownloadCancelled) at its next report or retry."""
    import tenacity

    folder.mkdir(parents=True, exist_ok=True)
    options = ytdlp_options(settings, output, folder)
    if on_progress is not None or cancelled is not None:

        def hook(status: dict[str, Any]) -> None:
            if cancelled is not None and cancelled.is_set():
                raise DownloadCancelled(url)
            if on_progress is not None:
                on_progress(status)

        options["progress_hooks"] = [hook]

    def before_sleep(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        if on_retry and isinstance(exc, DownloadFailure):
            on_retry(exc, state.attempt_number, delay)

    def worth_retrying(exc: BaseException) -> bool:
        if not isinstance(exc, DownloadFailure) or not exc.transient:
            return False
        if cancelled is not None and cancelled.is_set():
            return False
        return retry_site_blocks or not exc.site_block

    def stop(state: tenacity.RetryCallState) -> bool:
        if state.attempt_number >= settings.attempts:
            return True
        exc = state.outcome.exception() if state.outcome else None
        forbidden = isinstance(exc, DownloadFailure) and exc.http_status == 403
        return forbidden and not retry_site_blocks and state.attempt_number >= 2

    def sleep(seconds: float) -> None:
        if cancelled is None:
            time.sleep(seconds)
        elif cancelled.wait(seconds):
            raise DownloadCancelled(url)

    retrying = tenacity.Retrying(
        stop=stop,
        wait=_wait_seconds(settings),
        retry=tenacity.retry_if_exception(worth_retrying),
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )
    return retrying(_download_once, url, options, folder)
