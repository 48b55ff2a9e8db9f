"""Sites: what a URL belongs to, the texts by which a site says it blocks us, and a circuit
breaker per site that the supervisor keeps for all workers together.

A video site answers a bulk downloader as a whole (HTTP 429, 403 on everything, a bot check): one
worker backing off on its own changes nothing while the others keep asking. So a block is a state
of the site. While it holds, none of the site's URLs is handed out; after the wait (the longer of
the site's Retry-After and our own backoff, growing with each block) one URL goes through as a
probe, and its success closes the breaker. The same place paces starts per site, so that N
workers do not mean N times the request rate.
"""

from __future__ import annotations

import random
import time
import urllib.parse
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

from daemon.config import DownloadSettings


@dataclass(frozen=True)
class BlockText:
    """A text yt-dlp's YouTube extractor gives when YouTube refuses us as a whole."""

    match: str  # looked for (lower case) in the error message
    source: str  # the literal in yt-dlp's extractor that makes or handles the message
    what: str


# The texts come from yt-dlp's extractor/youtube/_video.py (tests/test_site_blocks.py checks each
# `source` against the installed yt-dlp, so an upgrade that changes them fails loudly). YouTube's
# own bot-check reason ("Sign in to confirm you're not a bot") is passed through by the extractor's
# "sign in" branch, which appends the cookies hint.
BLOCK_TEXTS: tuple[BlockText, ...] = (
    BlockText("not a bot", "if 'sign in' in reason.lower():", "bot check"),
    BlockText(
        "requiring a captcha challenge",
        "YouTube is requiring a captcha challenge before playback",
        "captcha",
    ),
    BlockText(
        "has been rate-limited by youtube", "has been rate-limited by YouTube for up to an hour", "rate limit"
    ),
    BlockText(
        "this content isn't available, try again later",
        "This content isn't available, try again later",
        "rate limit",
    ),
)

# 403s from this many different URLs of one site, with no success in between: the site refuses us.
FORBIDDEN_RUN_URLS = 2


def block_text(message: str) -> BlockText | None:
    """The block a yt-dlp error message speaks of, if any."""
    lowered = message.lower().replace("\u2019", "'")
    for text in BLOCK_TEXTS:
        if text.match in lowered:
            return text
    return None


# Phrases of the pages sites answer a bulk downloader with, where a video (or a page yt-dlp knows)
# should be: a bot check or a rate limit. Only looked for in a page yt-dlp found no video in, and
# only phrases that do not turn up on an ordinary page.
PAGE_BLOCK_TEXTS: tuple[tuple[str, str], ...] = (
    ("not a bot", "bot check"),
    ("not a robot", "bot check"),
    ("unusual traffic", "bot check"),
    ("rate-limited", "rate limit"),
    ("rate limited", "rate limit"),
    ("too many requests", "rate limit"),
)


def page_block_text(page: str) -> str | None:
    """What a page that stands where a video should be says of a block (bot check, rate limit)."""
    lowered = page.lower().replace("\u2019", "'")
    blocked = block_text(lowered)
    if blocked is not None:
        return blocked.what
    return next((what for phrase, what in PAGE_BLOCK_TEXTS if phrase in lowered), None)


def site_of(url: str) -> str:
    """The site a URL belongs to: yt-dlp's extractor where it is a known one (YouTube has many
    host names), else the host; a local file has none (it is never paused)."""
    if not url.startswith(("http://", "https://")):
        return ""
    from yt_dlp.extractor.youtube import YoutubeIE

    if YoutubeIE.suitable(url):
        return "youtube"
    return (urllib.parse.urlparse(url).netloc or "").lower()


def retry_after_seconds(value: str | None, now: float | None = None) -> float:
    """An HTTP Retry-After header (seconds, or a date) as seconds from now; 0 when absent or bad."""
    if not value:
        return 0.0
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return 0.0
    return max(0.0, when - (time.time() if now is None else now))


@dataclass
class _Site:
    blocks: int = 0  # blocks in a row, without a success between: the backoff's exponent
    opened_at: float | None = None  # monotonic; None while the breaker is closed
    reopen_at: float = 0.0  # when the next probe may go
    probing: bool = False  # the probe is out (half-open)
    reason: str = ""
    retry_after_seconds: float = 0.0
    forbidden_urls: set[str] = field(default_factory=set)  # URLs that got 403 since the last success
    last_start: float = float("-inf")
    waited: set[str] = field(default_factory=set)  # URLs held back during this block


@dataclass(frozen=True)
class Opened:
    """What `block` did: `new` when the breaker was closed until now."""

    new: bool
    wait_seconds: float


class SiteBreakers:
    """The breaker and the pacing of every site, for the supervisor alone (it hands out URLs)."""

    def __init__(self, settings: DownloadSettings) -> None:
        self.first_wait_seconds = settings.rate_limited_backoff_seconds
        self.max_wait_seconds = max(settings.site_block_max_seconds, self.first_wait_seconds)
        self.min_interval_seconds = settings.site_min_interval_seconds
        self._sites: dict[str, _Site] = {}
        self.blocks_total = 0

    def _site(self, site: str) -> _Site:
        return self._sites.setdefault(site, _Site())

    def blocked(self, site: str) -> bool:
        state = self._sites.get(site)
        return state is not None and state.opened_at is not None

    def take_start(self, site: str, now: float) -> bool:
        """Whether a URL of `site` may start now; when it may, the start is counted (pacing, and
        the one probe of a blocked site)."""
        if not site:
            return True
        state = self._site(site)
        if state.opened_at is not None:
            if state.probing or now < state.reopen_at:
                return False
            state.probing = True  # half-open: this one URL tries the site
        elif now - state.last_start < self.min_interval_seconds:
            return False
        state.last_start = now
        return True

    def next_start(self, site: str) -> float:
        """When `take_start` may next say yes (monotonic): for the supervisor's wait."""
        state = self._site(site)
        if state.opened_at is not None:
            return float("inf") if state.probing else state.reopen_at
        return state.last_start + self.min_interval_seconds

    def block(self, site: str, reason: str, retry_after: float, now: float) -> Opened:
        """The site refused us: wait max(Retry-After, backoff), the backoff doubling with each
        block in a row up to the ceiling, with jitter so that a fleet does not return at once."""
        state = self._site(site)
        if state.opened_at is not None and not state.probing:
            # Other workers met the same block while it was opening: one block, not several.
            state.reopen_at = max(state.reopen_at, now + retry_after)
            return Opened(False, state.reopen_at - now)
        new = state.opened_at is None
        state.blocks += 1
        if new:
            state.opened_at = now
            self.blocks_total += 1
        ceiling = min(self.max_wait_seconds, self.first_wait_seconds * 2 ** (state.blocks - 1))
        wait = max(retry_after, random.uniform(ceiling * 0.75, ceiling))
        state.reopen_at = now + wait
        state.probing = False
        state.reason = reason
        state.retry_after_seconds = retry_after
        return Opened(new, wait)

    def forbidden(self, site: str, url: str) -> bool:
        """A 403 for `url`: whether, with the others since the last success, it is a site block."""
        if not site:
            return False
        state = self._site(site)
        state.forbidden_urls.add(url)
        return state.opened_at is not None or len(state.forbidden_urls) >= FORBIDDEN_RUN_URLS

    def succeeded(self, site: str, now: float) -> tuple[float, int] | None:
        """A URL of the site got through: the breaker closes. Returns (seconds blocked, URLs that
        waited) when it was open."""
        state = self._sites.get(site)
        if state is None:
            return None
        state.forbidden_urls.clear()
        state.blocks = 0
        if state.opened_at is None:
            return None
        blocked = (now - state.opened_at, len(state.waited))
        state.opened_at, state.probing, state.reason = None, False, ""
        state.waited = set()
        return blocked

    def probe_lost(self, site: str) -> None:
        """The probe ended without an answer from the site (its worker died, the run stops)."""
        state = self._sites.get(site)
        if state is not None:
            state.probing = False

    def held(self, site: str, url: str) -> None:
        """`url` waits for the site's block to end (for the summary and the closing line)."""
        self._site(site).waited.add(url)

    def paused(self) -> dict[str, tuple[str, float, float]]:
        """Blocked sites: site -> (reason, opened at, next probe at), monotonic times."""
        return {
            site: (state.reason, state.opened_at, state.reopen_at)
            for site, state in self._sites.items()
            if state.opened_at is not None
        }
