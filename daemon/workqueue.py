"""The URLs waiting for a worker: in list order, those to try again after a delay, and those of a
site that blocks us or is paced (parked per site, in order, while other sites' URLs go on)."""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque

from daemon.messages import Task
from daemon.sites import SiteBreakers, site_of


def task_site(task: Task) -> str:
    """The site a task's URL belongs to; "" for a local file, which no site pauses."""
    return "" if task.local else site_of(task.url)


class WorkQueue:
    def __init__(self, sites: SiteBreakers) -> None:
        self.sites = sites
        self._ready: deque[Task] = deque()
        self._urls: set[str] = set()  # every URL held here, for duplicate checks in constant time
        self._ready_downloads = 0  # tasks in _ready that are URLs to download, not local files
        # URLs to try again after a transient failure: (when, order, task), soonest first.
        self._later: list[tuple[float, int, Task]] = []
        self._order = itertools.count()
        self.parked: dict[str, deque[Task]] = {}

    def add(self, task: Task, first: bool = False) -> None:
        """Queue `task`; `first`: before the rest (a URL that waited on a condition, or whose
        worker died, goes on where it left off)."""
        self._urls.add(task.url)
        if first:
            self._ready.appendleft(task)
        else:
            self._ready.append(task)
        self._ready_downloads += not task.local

    def later(self, task: Task, delay_seconds: float) -> None:
        self._urls.add(task.url)
        heapq.heappush(self._later, (time.monotonic() + delay_seconds, next(self._order), task))

    def release_due(self, now: float) -> None:
        """URLs whose retry delay is over go to the back of the queue."""
        while self._later and self._later[0][0] <= now:
            _, _, task = heapq.heappop(self._later)
            self._ready.append(task)
            self._ready_downloads += not task.local

    def take(self, now: float) -> Task | None:
        """The next URL a worker may start: the oldest one whose site is neither paused (but for
        its one probe) nor paced; URLs passed over wait in `parked`, in order, for their site."""
        task = self._take(now)
        if task is not None:
            self._urls.discard(task.url)
        return task

    def _take(self, now: float) -> Task | None:
        for site, tasks in list(self.parked.items()):
            if not tasks:
                del self.parked[site]
            elif self.sites.take_start(site, now):
                task = tasks.popleft()
                if not tasks:
                    del self.parked[site]
                return task
        while self._ready:
            task = self._ready.popleft()
            self._ready_downloads -= not task.local
            site = task_site(task)
            if site in self.parked:  # behind the site's earlier URLs
                self.parked[site].append(task)
            elif self.sites.take_start(site, now):
                return task
            else:
                self.parked.setdefault(site, deque()).append(task)
        return None

    def __contains__(self, url: str) -> bool:
        return url in self._urls

    @property
    def ready(self) -> bool:
        """Whether a URL is waiting now (not for a retry delay)."""
        return bool(self._ready) or any(self.parked.values())

    @property
    def ready_count(self) -> int:
        """URLs waiting now (not for a retry delay)."""
        return len(self._ready) + sum(len(tasks) for tasks in self.parked.values())

    @property
    def downloads_ready(self) -> bool:
        """Whether a URL to download (not a local file) is waiting now."""
        return self._ready_downloads > 0 or any(self.parked.values())

    @property
    def pending(self) -> bool:
        """Whether any URL is held here, those waiting for a retry delay included."""
        return self.ready or bool(self._later)

    def __len__(self) -> int:
        return len(self._ready) + sum(len(tasks) for tasks in self.parked.values()) + len(self._later)

    def of_site(self, site: str) -> int:
        """URLs of `site` waiting to start (a count over the queue: said when a block opens)."""
        queued = sum(1 for task in self._ready if task_site(task) == site)
        return queued + len(self.parked.get(site, ()))

    def next_start(self) -> float | None:
        """When a parked site may next start a URL (monotonic), if any URL is parked."""
        if not self.parked:
            return None
        return min(self.sites.next_start(site) for site in self.parked)
