"""What work waits for, beyond one URL: a folder's disk (below its floor, or full) and sites that
block us. Each is said once in the log when it starts and once when it ends, and kept in the
ledger's `conditions` table for `status`. Runs in the supervisor, the ledger's only writer."""

from __future__ import annotations

import time
from pathlib import Path

from loguru import logger

from daemon.config import Settings
from daemon.diskspace import DiskGate, Floor, hold_for
from daemon.events import EventSink, SiteChanged
from daemon.failures import Failure, Scope
from daemon.folders import RunPaths
from daemon.ledger import Ledger
from daemon.sites import SiteBreakers
from daemon.workqueue import WorkQueue


class Conditions:
    def __init__(self, settings: Settings, paths: RunPaths, on_event: EventSink) -> None:
        service = settings.service
        self.disk = DiskGate(
            [
                Floor("temp", paths.temp_root, service.min_free_temp_mb),
                Floor("output", paths.output_dir, service.min_free_output_mb),
            ],
            service.disk_check_seconds,
        )
        # Sites that block us pause for every worker at once (see daemon.sites).
        self.sites = SiteBreakers(settings.download)
        self.on_event = on_event
        self._disk_said: str | None = None  # the disk condition the ledger shows now
        self._sites_said: set[str] = set()  # the site conditions the ledger shows now
        self._site_rows: dict[str, tuple[str, float]] = {}
        self.waited_on_blocks: set[str] = set()  # URLs that waited on a block in this run

    def hold(self, condition: Failure) -> None:
        """A folder's disk is full: nothing is handed out until it has room again."""
        if condition.scope is Scope.DISK and condition.where:
            self.disk.hold(hold_for(Path(condition.where), condition.reason, condition.free_bytes))
            self.disk.blocked()  # says so now, once

    def block_site(self, condition: Failure, url: str, waiting: int) -> None:
        """A site refuses us: none of its URLs is handed out until the wait is over, then one probe."""
        site = condition.where
        opened = self.sites.block(site, condition.reason, condition.retry_after_seconds, time.monotonic())
        self.sites.held(site, url)
        self.waited_on_blocks.add(url)
        if opened.new:
            logger.warning(
                f"site {site} blocks us ({condition.reason}); all its URLs pause, next try in "
                f"{opened.wait_seconds:.0f}s; {waiting} URL(s) wait"
            )
            self.on_event(SiteChanged(site, blocked=True, reason=condition.reason))
        else:
            logger.info(f"site {site} still blocks us ({url}); next try in {opened.wait_seconds:.0f}s")

    def site_answered(self, site: str, waiting: int) -> None:
        """A URL of `site` ended without a block: a paused site's breaker closes."""
        blocked = self.sites.succeeded(site, time.monotonic())
        if blocked is not None:
            seconds, waited = blocked
            logger.warning(
                f"site {site} answers again after {seconds:.0f}s blocked; its {waiting} waiting URL(s) "
                f"go on ({waited} waited on the block)"
            )
            self.on_event(SiteChanged(site, blocked=False))

    def long_block(self, limit_seconds: float) -> tuple[str, str] | None:
        """A site (and why) that has blocked us for longer than `limit_seconds`, if one has."""
        now = time.monotonic()
        for site, (reason, opened_at, _) in self.sites.paused().items():
            if now - opened_at >= limit_seconds:
                return site, reason
        return None

    def show(self, ledger: Ledger, queue: WorkQueue) -> None:
        """Keeps the ledger's account of what the run waits for in step, for `status`."""
        self._show_sites(ledger, queue)
        reason = self.disk.reason
        if reason == self._disk_said:
            return
        if reason is None:
            ledger.clear_condition("disk")
        else:
            next_look = time.time() + self.disk.recheck_seconds
            ledger.set_condition("disk", "space", reason, next_look, len(queue))
        self._disk_said = reason

    def _show_sites(self, ledger: Ledger, queue: WorkQueue) -> None:
        paused = self.sites.paused()
        for site in self._sites_said - paused.keys():
            ledger.clear_condition("site", site)
        now, wall = time.monotonic(), time.time()
        for site, (reason, _, reopen_at) in paused.items():
            key = (site, reopen_at)
            if site in self._sites_said and self._site_rows.get(site) == key:
                continue
            waiting = len(queue.parked.get(site, ()))
            ledger.set_condition("site", site, reason, wall + max(0.0, reopen_at - now), waiting)
            self._site_rows[site] = key
        self._sites_said = set(paused)
