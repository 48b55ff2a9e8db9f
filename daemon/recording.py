"""Recording: what workers report, written to the ledger and counted for the run's summary.

Runs in the supervisor, the ledger's only writer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from loguru import logger

from daemon.events import ClipEnded, EventSink, UrlEnded
from daemon.ledger import Ledger, SourceMeta, UrlState
from daemon.messages import ClipFinished, SourceProbed

# Clip failures of one URL logged one by one; the rest are counted in one line when the URL ends
# (a clip file of 100 000 clips past the end of a short video would otherwise log 100 000 lines).
CLIP_FAILURES_LOGGED = 10


@dataclass
class Totals:
    """What this run did; the summary printed at the end."""

    urls: dict[str, int] = field(default_factory=lambda: {"done": 0, "skipped": 0, "failed": 0})
    rejected_lines: int = 0  # URL-list lines that named nothing to fetch
    rejected_clip_lines: int = 0  # clip-file lines that named no clip
    clips_written: int = 0
    clips_failed: int = 0  # clips that can never be made (past the end of their source)
    clip_retries: int = 0  # clips that failed for a passing reason, to be made again
    url_retries: int = 0  # tries of URLs that failed for a passing reason and were queued again
    urls_waited_on_blocks: int = 0  # URLs held back (nothing charged) while their site blocked us
    frames: int = 0  # of the clips written; a clip that failed part-way adds none
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def line(self) -> str:
        fps = self.frames / self.seconds if self.seconds > 0 else 0.0
        text = (
            f"URLs done {self.urls['done']}, skipped {self.urls['skipped']}, failed {self.urls['failed']}; "
            f"list lines rejected {self.rejected_lines}; "
            f"clips written {self.clips_written}, clip errors {self.clips_failed}; frames {self.frames}; "
            f"{self.bytes / 1e6:.1f} MB; {self.seconds:.1f}s wall; {fps:.1f} frames/s; "
            f"clip-file lines rejected {self.rejected_clip_lines}"
        )
        if self.url_retries or self.clip_retries:
            text += f"; tries retried {self.url_retries} (clips to make again {self.clip_retries})"
        if self.urls_waited_on_blocks:
            text += f"; URLs that waited on a site block {self.urls_waited_on_blocks}"
        return text


class Recorder:
    def __init__(self, ledger: Ledger, on_event: EventSink) -> None:
        self.ledger = ledger
        self.on_event = on_event
        self.totals = Totals()
        # URL -> its final state for this run, so the summary counts each URL once.
        self.outcomes: dict[str, UrlState] = {}
        self._clip_failures: dict[str, int] = {}  # URL -> clip failures seen in its present try

    def conclude(
        self,
        url: str,
        state: UrlState,
        error: str | None,
        retryable: bool = False,
        update: bool = True,
        download_seconds: float | None = None,
        process_seconds: float | None = None,
    ) -> str:
        """The URL's end in this run: written down (unless the ledger says so already), counted once."""
        if update:
            self.ledger.finish(
                url,
                state,
                error=error,
                retryable=retryable,
                download_seconds=download_seconds,
                process_seconds=process_seconds,
            )
        if state is UrlState.SKIPPED and error:
            logger.warning(f"{url}: skipped: {error}")
        elif state is UrlState.FAILED:
            logger.error(f"{url}: failed: {error}") if update else logger.warning(f"{url}: {error}")
        self.say_unlisted_clip_failures(url)
        previous = self.outcomes.get(url)
        if previous is not None:
            self.totals.urls[previous] -= 1
        self.outcomes[url] = state
        self.totals.urls[state] += 1
        self.on_event(UrlEnded(url, state, error, download_seconds, process_seconds))
        return state.value

    def clip(self, message: ClipFinished) -> None:
        result, output, failure = message.result, message.output, message.result.failure
        self.ledger.record_clip(
            message.video_id,
            message.url,
            result.start_frame,
            result.end_frame,
            "failed" if failure else "done",
            path=result.path,
            frames=result.frames,
            size=result.bytes,
            error=result.error,
            sha256=message.sha256,
            width=output.width if output else None,
            height=output.height if output else None,
            fps=output.fps if output else None,
            permanent=bool(failure and failure.permanent),
        )
        if failure is None:
            self.totals.clips_written += 1
            self.totals.frames += result.frames
            self.totals.bytes += result.bytes
        else:
            if failure.permanent:
                self.totals.clips_failed += 1
            else:
                self.totals.clip_retries += 1
            seen = self._clip_failures[message.url] = self._clip_failures.get(message.url, 0) + 1
            if seen <= CLIP_FAILURES_LOGGED:
                logger.warning(
                    failure.reason if failure.permanent else f"{failure.reason} (made again later)"
                )
        self.on_event(
            ClipEnded(
                message.url,
                message.video_id,
                result.start_frame,
                result.end_frame,
                result.path,
                result.frames,
                result.bytes,
                result.error,
            )
        )

    def say_unlisted_clip_failures(self, url: str) -> None:
        """The count of a URL's clip failures past those logged, once its try has ended."""
        unlisted = self._clip_failures.pop(url, 0) - CLIP_FAILURES_LOGGED
        if unlisted > 0:
            logger.warning(f"{url}: {unlisted} more clip error(s) not listed (each is in the ledger)")

    def source(self, message: SourceProbed) -> None:
        meta = SourceMeta(message.codec, message.width, message.height, message.fps)
        self.ledger.set_source(message.url, meta)
