"""Retrying transient failures: exponential backoff with jitter, a bounded number of attempts."""

from __future__ import annotations

from collections.abc import Callable

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from .errors import is_transient
from .options import RetryPolicy


def retrying(policy: RetryPolicy, on_retry: Callable[[BaseException], None] | None = None) -> AsyncRetrying:
    """An AsyncRetrying that retries only transient errors and re-raises the last one."""

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            exc = state.outcome.exception()
            if exc is not None:
                on_retry(exc)

    return AsyncRetrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait_exponential_jitter(multiplier=policy.initial_wait, max=policy.max_wait, jitter=policy.initial_wait),
        retry=retry_if_exception(is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )
