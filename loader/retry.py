"""Retrying transient failures: exponential backoff with jitter, a bounded number of attempts.

"Too many connections" (errors.TOO_MANY_CONNECTIONS) is the server asking for fewer of them,
not a fault: it does not use up the attempts; it is retried for up to
`TOO_MANY_CONNECTIONS_PATIENCE_S` while the load lowers its concurrency (see pipeline)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_exponential_jitter

from .errors import TOO_MANY_CONNECTIONS, is_transient, sqlstate
from .options import RetryPolicy

TOO_MANY_CONNECTIONS_PATIENCE_S = 600.0

log = logging.getLogger("loader")


def say_retrying(exc: BaseException) -> None:
    """What --verbose tells of a transient failure about to be retried."""
    log.info("retrying after a transient failure: %s", " ".join(str(exc).split()) or type(exc).__name__)


def retrying(
    policy: RetryPolicy,
    on_retry: Callable[[BaseException], None] | None = None,
    transient: Callable[[BaseException], bool] = is_transient,
) -> AsyncRetrying:
    """An AsyncRetrying that retries only `transient` errors and re-raises the last one."""

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            exc = state.outcome.exception()
            if exc is not None:
                on_retry(exc)

    def stop(state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome is not None else None
        if exc is not None and sqlstate(exc) == TOO_MANY_CONNECTIONS:
            return (state.seconds_since_start or 0.0) >= TOO_MANY_CONNECTIONS_PATIENCE_S
        return state.attempt_number >= policy.attempts

    return AsyncRetrying(
        stop=stop,
        wait=wait_exponential_jitter(multiplier=policy.initial_wait, max=policy.max_wait, jitter=policy.initial_wait),
        retry=retry_if_exception(transient),
        before_sleep=before_sleep,
        reraise=True,
    )
