"""The failure policy: what the supervisor does after a URL's try ended badly.

It sees only `Failure`s (scope and kind, from daemon.failures) and the URL's attempt count, and
answers with one decision: wait for a condition to clear (nothing charged), try again after a
delay (one attempt charged), or give up (the URL is failed, with its reason).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from daemon.config import RunSettings
from daemon.failures import Failure, Kind

# Tries of a URL whose failures are bugs in our own code: a bug is usually deterministic, so
# trying more often only burns time; two tries tell a passing fault from a deterministic one.
BUG_ATTEMPTS = 2
# Tries of a URL whose page answers 403: one retry tells an expired or passing refusal from one
# that holds (a site that refuses every URL is blocked instead, and nothing is charged).
FORBIDDEN_ATTEMPTS = 2


@dataclass(frozen=True)
class WaitFor:
    """A condition (a full disk, a blocked site): the URL goes back to the queue uncharged, and
    nothing that needs the condition's folder or site is handed out until it clears."""

    failure: Failure


@dataclass(frozen=True)
class RetryLater:
    """A transient failure within the budget: the URL is queued again after `delay_seconds`."""

    failure: Failure
    attempts: int
    delay_seconds: float


@dataclass(frozen=True)
class GiveUp:
    """A permanent failure, or the attempt budget spent: the URL is failed with `reason`."""

    reason: str
    retryable: bool  # False: not tried again by a plain rerun (--retry-failed does)


Decision = WaitFor | RetryLater | GiveUp


class FailurePolicy:
    def __init__(self, run: RunSettings) -> None:
        self.url_attempts = run.url_attempts
        self.delay_seconds = run.retry_delay_seconds
        self.max_delay_seconds = max(run.retry_delay_max_seconds, run.retry_delay_seconds)

    def budget(self, failure: Failure) -> int:
        if failure.bug:
            return min(BUG_ATTEMPTS, self.url_attempts)
        if failure.http_status == 403:
            return min(FORBIDDEN_ATTEMPTS, self.url_attempts)
        return self.url_attempts

    def decide(self, failure: Failure, attempts: int) -> Decision:
        """`attempts`: the URL's failed tries since it was last done, over every run, this one
        included when it is transient."""
        if failure.kind is Kind.CONDITION:
            return WaitFor(failure)
        if failure.kind is Kind.PERMANENT:
            return GiveUp(failure.reason, retryable=False)
        budget = self.budget(failure)
        if attempts >= budget:
            return GiveUp(f"{failure.reason} (failed {attempts} times; gave up)", retryable=False)
        return RetryLater(failure, attempts, self.delay(attempts, failure.retry_after_seconds))

    def delay(self, attempts: int, at_least_seconds: float = 0.0) -> float:
        """Exponential, with jitter so that URLs that failed together are not tried together."""
        ceiling = min(self.max_delay_seconds, self.delay_seconds * 2 ** max(0, attempts - 1))
        return max(at_least_seconds, random.uniform(ceiling / 2, ceiling))


def worst(failures: list[Failure]) -> Failure | None:
    """The failure that decides for a URL whose clips failed in different ways: a condition first
    (nothing is charged while it holds), then a transient one (the clip is made again); clips
    that can never be made (permanent) leave the URL done."""
    for kind in (Kind.CONDITION, Kind.TRANSIENT):
        for failure in failures:
            if failure.kind is kind:
                return failure
    return None
