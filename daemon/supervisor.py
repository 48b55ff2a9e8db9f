"""The supervisor: hands URLs to workers on request, replaces workers that die, and is the only
writer of the ledger.

It is the fleet (start, stagger, assign, deaths, stalls); what it hands out comes from planning
(daemon.planning), what workers report goes to recording (daemon.recording), and what follows a
failure is the failure policy's (daemon.policy).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable

from loguru import logger

from daemon.conditions import Conditions
from daemon.config import Settings
from daemon.encode import remove_partial_files
from daemon.events import (
    EventSink,
    FleetSnapshot,
    FramesWritten,
    InputProblem,
    UrlEnded,
    UrlQueued,
    WorkerPhase,
    WorkerRestarted,
    ignore,
)
from daemon.failures import Kind, Scope, site_blocked
from daemon.fleet import Fleet, WorkerHandle
from daemon.folders import PART_SUFFIX, RunPaths
from daemon.ledger import Ledger, LedgerError, UrlState
from daemon.locking import FolderLocks, lock_run
from daemon.messages import (
    Assign,
    ClipFinished,
    FramesEncoded,
    FromWorker,
    Heartbeat,
    PhaseChanged,
    Ready,
    SourceProbed,
    Task,
    UrlFinished,
)
from daemon.planning import Planned, Planner
from daemon.policy import FailurePolicy, GiveUp, RetryLater, WaitFor, worst
from daemon.recording import Recorder, Totals
from daemon.urls import Rejected, Source
from daemon.workqueue import WorkQueue, task_site

CRASH_LIMIT = 2
# Workers that die before they ever ask for work, one after another: the cause is the machine or
# the settings (a log file that cannot be opened, a broken install), and restarting cannot help.
STARTUP_DEATH_LIMIT = 3


class Supervisor:
    """Single writer of the ledger. Feed it sources with `submit`, then drive it with `step`."""

    def __init__(
        self,
        settings: Settings,
        paths: RunPaths,
        on_event: EventSink | None = None,
        lock: FolderLocks | None = None,
    ) -> None:
        self.settings = settings
        self.paths = paths
        self.on_event: EventSink = on_event or ignore
        self.fleet = Fleet(settings, paths)
        self.draining = False
        self.urgent = False
        self._drain_deadline: float | None = None
        self._lock = lock
        self.ledger: Ledger | None = None
        self.planner: Planner | None = None
        self.recorder: Recorder | None = None
        self.policy = FailurePolicy(settings.run)
        self.conditions = Conditions(settings, paths, self.on_event)
        self.queue = WorkQueue(self.conditions.sites)
        # A run gives up on a block past download.block_give_up_hours (its URLs stay pending);
        # the service keeps waiting.
        self.give_up_on_blocks = True
        self._gave_up_said = False
        # Extra file descriptors that end `step`'s wait early (the service's inbox and signal pipe).
        self.wake_fds: list[int] = []
        self._startup_deaths = 0
        # Set when the run cannot go on (workers keep dying at start-up, the ledger cannot be
        # written): the reason, in one line.
        self.fatal: str | None = None

    @property
    def totals(self) -> Totals:
        return self.recorder.totals if self.recorder else Totals()

    @property
    def outcomes(self) -> dict[str, UrlState]:
        return self.recorder.outcomes if self.recorder else {}

    def snapshot(self) -> FleetSnapshot:
        """The present, for the service's status line and the metrics, without its handles."""
        totals = self.totals
        return FleetSnapshot(
            queued=len(self.queue),
            running=self.fleet.running,
            disk_paused=self.conditions.disk.reason,
            sites_paused=tuple(sorted(self.conditions.sites.paused())),
            draining=self.draining,
            urgent=self.urgent,
            ended=dict(totals.urls),
            clip_errors=totals.clips_failed,
        )

    # --- lifecycle ----------------------------------------------------------------------------

    def open(self) -> None:
        """Lock the folders, open the ledger, clean what a killed run left; raises AlreadyRunning
        or LedgerError (the ledger cannot be created or written: one line naming it)."""
        if self._lock is None:
            self._lock = lock_run(self.paths, "run")
        self.ledger = Ledger(self.paths.ledger)
        self.planner = Planner(self.ledger, self.paths.clip_dir, self.settings.run.retry_failed)
        self.recorder = Recorder(self.ledger, self.on_event)
        recovered = self.ledger.recover_interrupted()
        if recovered:
            logger.info(f"{recovered} URL(s) interrupted by an earlier run are pending again")
        removed = remove_partial_files(self.paths.output_dir)
        # And a killed run's or service's own files cut short beside the ledger (its status, a
        # manifest): the folders are locked, so no other writer is at work there.
        for folder in {self.paths.output_dir, self.paths.state_dir}:
            for part in folder.glob(f"*{PART_SUFFIX}"):
                part.unlink(missing_ok=True)
                removed += 1
        if removed:
            logger.info(f"removed {removed} unfinished .part file(s) left by an earlier run")
        shutil.rmtree(self.paths.temp_root, ignore_errors=True)
        self.paths.temp_root.mkdir(parents=True, exist_ok=True)
        self.fleet.open()

    def close(self) -> None:
        self._stop_all_workers(force=True)
        self.fleet.close()
        shutil.rmtree(self.paths.temp_root, ignore_errors=True)
        if self.ledger is not None:
            self.ledger.close()
        if self._lock is not None:
            self._lock.close()

    def _ledger_failed(self, exc: LedgerError) -> None:
        """The ledger cannot be written: stop at once, before anything is done that it cannot record.
        What is in flight stays pending in the ledger as it last was; the next run resumes it."""
        if self.fatal is None:
            self.fatal = f"{exc}; stopping: URLs in flight stay pending for the next run"
            logger.error(self.fatal)
        self.request_stop(urgent=True)

    # --- planning -----------------------------------------------------------------------------

    def reject_lines(self, list_path: str, rejected: list[Rejected]) -> None:
        """Counts the list's bad lines in the summary and keeps them in the ledger for `status`."""
        assert self.ledger is not None and self.recorder is not None
        try:
            self.ledger.set_rejected_lines(list_path, [(r.line, r.text, r.reason) for r in rejected])
        except LedgerError as exc:
            self._ledger_failed(exc)
        self.recorder.totals.rejected_lines += len(rejected)

    def submit(self, source: Source) -> str:
        """Record a source and queue what is missing of it; returns 'queued' or its final state."""
        if self.fatal is not None:
            return "pending"
        try:
            return self._submit(source)
        except LedgerError as exc:
            self._ledger_failed(exc)
            return "pending"

    def _submit(self, source: Source) -> str:
        assert self.ledger is not None and self.planner is not None and self.recorder is not None
        row = self.ledger.url(source.url)
        if (row is not None and row.state == UrlState.RUNNING) or source.url in self.queue:
            return "queued"
        plan = self.planner.plan(source)
        for problem in plan.problems:
            logger.warning(problem)
            self.on_event(InputProblem(problem))
        self.recorder.totals.rejected_clip_lines += plan.rejected_lines
        if not isinstance(plan, Planned):
            return self.recorder.conclude(
                source.url, plan.state, plan.error, retryable=plan.retryable, update=not plan.recorded
            )
        self.queue.add(plan.task)
        self.on_event(UrlQueued(source.url))
        # The first worker starts (a few seconds of imports) while the rest of the list is read.
        if not self.draining:
            self.fleet.start_due(self.queue.ready_count, self.queue.downloads_ready)
        return "queued"

    # --- workers ------------------------------------------------------------------------------

    def _assign(self, handle: WorkerHandle) -> None:
        assert self.ledger is not None
        if not handle.link.alive():
            return  # its death is handled by `step`, with no URL charged to it
        if self.draining:
            handle.stop()
            return
        # A worker asking for work while disk space is low waits idle; `step` asks again later.
        task = None if self.conditions.disk.blocked() else self.queue.take(time.monotonic())
        if task is None:
            handle.idle = True
            return
        handle.take(task)
        self.ledger.mark_running(task.url, handle.index, handle.node)
        handle.link.send(Assign(task))

    def _handle_message(self, handle: WorkerHandle, message: FromWorker) -> None:
        assert self.ledger is not None
        # A heartbeat may announce a deliberate wait (the fleet noted the sign of life).
        handle.announced_wait = message.waiting_seconds if isinstance(message, Heartbeat) else 0.0
        match message:
            case Heartbeat(download_bytes_left=left):
                handle.download_bytes_left = left
            case Ready(node=node):
                handle.ready_seen = True
                handle.node = node or handle.node
                self._startup_deaths = 0
                handle.task = None
                self._assign(handle)
            case PhaseChanged(url=url, phase=phase):
                handle.phase = phase
                if phase == "process":
                    self.fleet.cutting_began()
                self.ledger.set_phase(url, phase)
                self.on_event(WorkerPhase(handle.index, url, phase))
            case FramesEncoded(count=count):
                # Live progress only: the summary counts the frames of clips written, when they are.
                self.on_event(FramesWritten(count))
            case SourceProbed():
                assert self.recorder is not None
                self.recorder.source(message)
            case ClipFinished():
                self._record_clip(handle, message)
            case UrlFinished():
                self._finish_task(handle, message)

    def _record_clip(self, handle: WorkerHandle, message: ClipFinished) -> None:
        assert self.recorder is not None
        self.recorder.clip(message)
        failure = message.result.failure
        clip = (message.result.start_frame, message.result.end_frame)
        if failure is None or failure.permanent:
            handle.settled.add(clip)
        else:
            handle.clip_failures.append(failure)

    def _finish_task(self, handle: WorkerHandle, message: UrlFinished) -> None:
        assert self.ledger is not None and self.recorder is not None
        url, task = message.url, handle.task
        handle.task = None
        self.recorder.say_unlisted_clip_failures(url)
        if task is None:
            return
        left = tuple(clip for clip in task.clips if clip not in handle.settled)
        failure = message.failure if message.state == "failed" else worst(handle.clip_failures)
        site = task_site(task)
        sites = self.conditions.sites
        if failure is not None and failure.http_status == 403 and sites.forbidden(site, url):
            failure = site_blocked(site, f"HTTP 403 from several of {site}'s URLs in a row: {failure.reason}")
        if failure is None or failure.permanent:
            # It answered (a removed video is an answer too).
            self.conditions.site_answered(site, self.queue.of_site(site))
        elif failure.scope is not Scope.SITE:
            sites.probe_lost(site)  # no answer either way: another URL may probe
        if message.state == "interrupted" and left and failure is None:
            self.ledger.set_pending(url)
            logger.info(f"{url}: stopped early; {len(left)} of its clips stay pending")
            self.on_event(UrlEnded(url, UrlState.PENDING))
            return
        if failure is None:
            self.recorder.conclude(
                url,
                UrlState.DONE,
                None,
                download_seconds=message.download_seconds,
                process_seconds=message.process_seconds,
            )
            return
        attempts = self.ledger.charge_failed_try(url, failure.reason) if failure.kind is Kind.TRANSIENT else 0
        remaining = Task(task.url, task.video_id, left or task.clips, task.local)
        match self.policy.decide(failure, attempts):
            case WaitFor(failure=condition) if condition.scope is Scope.SITE:
                self.ledger.set_pending(url)
                self.queue.add(remaining, first=True)
                self.conditions.block_site(condition, url, self.queue.of_site(site))
                self.recorder.totals.urls_waited_on_blocks = len(self.conditions.waited_on_blocks)
                self.on_event(UrlEnded(url, UrlState.PENDING, condition.reason))
            case WaitFor(failure=condition):
                self.conditions.hold(condition)
                self.ledger.set_pending(url)
                self.queue.add(remaining, first=True)
                logger.warning(f"{url}: waits ({condition.reason}); nothing charged")
                self.on_event(UrlEnded(url, UrlState.PENDING, condition.reason))
            case RetryLater(delay_seconds=delay):
                self.ledger.set_pending(url)
                self.queue.later(remaining, delay)
                self.recorder.totals.url_retries += 1
                budget = self.policy.budget(failure)
                logger.warning(
                    f"{url}: {failure.reason}; try {attempts} of {budget} failed, tried again in {delay:.0f}s"
                )
                self.on_event(UrlEnded(url, UrlState.PENDING, failure.reason))
            case GiveUp(reason=reason, retryable=retryable):
                self.recorder.conclude(url, UrlState.FAILED, reason, retryable=retryable)

    def _give_up_on_long_blocks(self) -> None:
        hours = self.settings.download.block_give_up_hours
        blocked = self.conditions.long_block(hours * 3600)
        if blocked is None or self._gave_up_said:
            return
        self._gave_up_said = True
        site, reason = blocked
        if not self.give_up_on_blocks:
            logger.error(f"site {site} has blocked us for over {hours:g} h ({reason}); still waiting")
            return
        if self.fatal is None:
            self.fatal = (
                f"site {site} has blocked us for over {hours:g} h (download.block_give_up_hours; "
                f"{reason}); stopping: its URLs stay pending for the next run"
            )
            logger.error(self.fatal)
        self.request_stop()

    def _handle_death(self, handle: WorkerHandle) -> None:
        assert self.ledger is not None
        how = self.fleet.forget(handle)
        task = handle.task
        if task is not None:
            for part in (self.paths.output_dir / task.video_id).glob(f"*{PART_SUFFIX}"):
                part.unlink(missing_ok=True)
            self.conditions.sites.probe_lost(task_site(task))
            crashes = self.ledger.record_crash(task.url)
            if crashes >= CRASH_LIMIT:
                reason = (
                    handle.stalled or f"worker died {crashes} times while processing this URL (last: {how})"
                )
                assert self.recorder is not None
                self.recorder.conclude(task.url, UrlState.FAILED, reason, retryable=False)
            elif self.urgent:
                self.ledger.set_pending(task.url)
            else:
                what = handle.stalled or f"died ({how})"
                logger.warning(f"worker {handle.index} {what} on {task.url}; the URL goes back in the queue")
                self.ledger.set_pending(task.url)
                self.queue.add(task, first=True)
        elif not handle.stop_sent:
            when = "while idle" if handle.ready_seen else "at start-up"
            logger.warning(f"worker {handle.index} died ({how}) {when}")
        if not handle.ready_seen and not handle.stop_sent:
            self._startup_deaths += 1
            if self._startup_deaths >= STARTUP_DEATH_LIMIT and self.fatal is None:
                log = self.paths.log_dir / f"worker-{handle.index}.log"
                self.fatal = (
                    f"workers died {self._startup_deaths} times in a row before they were ready "
                    f"(last: worker {handle.index}, {how}); its reason is on stderr above and in {log} "
                    "when that can be written; unfinished URLs stay pending"
                )
                logger.error(self.fatal)
                self.request_stop(urgent=True)
        if not self.draining and not handle.stop_sent:
            self.on_event(WorkerRestarted(handle.index))
            self.fleet.start(handle.index)

    # --- the loop -----------------------------------------------------------------------------

    def step(self, timeout: float = 0.5) -> None:
        """Start due workers, then handle whatever the workers said within `timeout` seconds."""
        try:
            self._step(timeout)
        except LedgerError as exc:
            self._ledger_failed(exc)
            self._stop_all_workers(force=True)

    def _step(self, timeout: float) -> None:
        self.queue.release_due(time.monotonic())
        self._give_up_on_long_blocks()
        if self.draining:
            for handle in self.fleet:
                handle.stop()
            if (
                not self.urgent
                and self._drain_deadline is not None
                and time.monotonic() > self._drain_deadline
            ):
                logger.warning("grace period over: stopping workers now")
                self.urgent = True
            if self.urgent:
                self._stop_all_workers(force=True)
                return
        else:
            self.fleet.start_due(self.queue.ready_count, self.queue.downloads_ready)
        for handle in self.fleet:
            if handle.idle and self.queue.ready and not self.draining:
                self._assign(handle)
        if not self.queue.ready and not self.draining:
            self.fleet.lend_idle_connections()
        assert self.ledger is not None
        self.conditions.show(self.ledger, self.queue)
        if not self.fleet:
            time.sleep(min(timeout, 0.1))
            return
        soonest = self.queue.next_start()
        if soonest is not None and any(handle.idle for handle in self.fleet):
            # An idle worker waits for a paced or paused site: wake when the next may start.
            timeout = min(timeout, max(0.01, soonest - time.monotonic()))
        self.fleet.wait(timeout, self.wake_fds)
        dead: list[WorkerHandle] = []
        for handle in self.fleet:
            self.fleet.receive(handle, self._handle_message)
            if not handle.link.alive():
                dead.append(handle)
        for handle in dead:
            handle.link.join(timeout=5)
            self.fleet.receive(handle, self._handle_message)  # a result sent just before exiting counts
            self._handle_death(handle)
        # Last, once every message that arrived has been read: a long pause of the supervisor
        # itself (a huge list being queued) must not make its workers look stalled.
        self.fleet.kill_stalled()

    @property
    def busy(self) -> bool:
        return self.queue.pending or self.fleet.busy

    def request_stop(self, urgent: bool = False) -> None:
        """First call: finish in-flight clips within the grace period. Second: stop now.

        Only sets flags (it runs inside signal handlers); `step` acts on them.
        """
        if urgent or self.draining:
            self.urgent = True
            self.draining = True
            return
        self.draining = True
        self._drain_deadline = time.monotonic() + self.settings.run.grace_seconds
        logger.info(
            f"stopping: no new URLs; in-flight clips get up to {self.settings.run.grace_seconds:g}s to finish"
        )

    def run_until_idle(self, should_continue: Callable[[], bool] = lambda: True) -> None:
        while should_continue() and (self.busy or (self.draining and self.fleet)):
            if self.draining and not self.fleet:
                break
            self.step()
        self._stop_all_workers(force=False)

    def _stop_all_workers(self, force: bool) -> None:
        def stopped(handle: WorkerHandle) -> None:
            try:
                self.fleet.receive(handle, self._handle_message)
                if handle.task is not None and self.ledger is not None:
                    self.ledger.set_pending(handle.task.url)
            except LedgerError as exc:
                self._ledger_failed(exc)  # the next run finds the URL 'running' and resumes it

        self.fleet.stop_all(force, stopped)
