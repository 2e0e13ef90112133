"""The agent's side of the guest owner protocol (HTTP + JSON).

This module only moves bytes: it returns the owner's ``(status, body)`` and
raises :class:`agent.io.http.HttpError` when there is no answer.  Which core
event an answer becomes is the core's decision
(:func:`agent.core.owner_answer.parse_owner_answer`), made by the runtime
(:func:`agent.app.runtime.ask_owner`).

``[sev] owner_url`` may name several owners (replicas behind no load
balancer, or a second site).  :func:`post_owner_retrying` asks them in turn
until one gives a final answer or the deadline (``[sev] timeout_s``) runs
out.  What is worth another try and what is not:

* no answer at all (refused, reset, timed out, not HTTP), any 5xx and 429:
  the owner could not decide now; another replica, or the same one a little
  later, may.  A 429 or 503 with ``Retry-After: SECONDS`` is not asked again
  before then;
* every other status (200, 4xx): the owner decided.  A refusal is final;
  asking again until one says yes would turn a "no" into a lottery.

Each URL has its own pause after a failure: equal-jitter exponential
back-off (half of ``min(RETRY_MAX_S, RETRY_FIRST_S * 2**(n-1))`` fixed, the
other half random, so agents restarted together do not ask in step).  The
next URL whose pause is over is asked at once: the first URL refusing
connections costs nothing when the second one answers.  The randomness is
the shell's (``random.uniform``); the flow sees only the one answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.io.http import HttpError, request_json, request_json_headers

__all__ = ["OwnerAnswer", "post_owner", "post_owner_retrying", "owner_urls", "retryable", "retry_after"]

RETRY_FIRST_S = 0.1
RETRY_MAX_S = 2.0
#: a Retry-After longer than this is read as this (the deadline still rules)
RETRY_AFTER_MAX_S = 60.0


@dataclass(frozen=True)
class OwnerAnswer:
    """The answer the flow will see, and how it was had (for the log line)."""

    status: int
    body: Any
    url: str
    attempts: int

    def __repr__(self) -> str:  # the body may hold a secret packet
        return f"OwnerAnswer(status={self.status}, url={self.url!r}, attempts={self.attempts})"


def owner_urls(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """``[sev] owner_url`` as a tuple, whether one URL or several were given."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def retryable(status: int) -> bool:
    """5xx and 429: the owner did not decide; anything else is its answer."""
    return status == 429 or 500 <= status <= 599


def retry_after(headers: dict[str, str]) -> float | None:
    """``Retry-After`` in seconds (RFC 9110 delta-seconds), or None.

    The HTTP-date form is ignored (back-off applies): it would need a clock
    shared with the owner's."""
    text = headers.get("retry-after", "").strip()
    if not text.isdigit() or len(text) > 9:
        return None
    return min(float(text), RETRY_AFTER_MAX_S)


async def post_owner(owner_url: str, path: str, body: dict[str, Any], timeout: float) -> tuple[int, Any]:
    """POST ``body`` as JSON to the owner; its status and decoded JSON body."""
    url = owner_url.rstrip("/") + path
    return await request_json("POST", url, body, timeout=timeout)


def _random_uniform(a: float, b: float) -> float:
    """``random.uniform``, imported at the first failure only: ``random``
    (with ``bisect`` and ``_sha512``) is ~0.17 MB of RSS in every idle sidecar,
    most of which never retry."""
    import random

    return random.uniform(a, b)


RetryHook = Callable[[str, int, str, float], None]  # url, attempt, what went wrong, pause before the next


async def post_owner_retrying(
    owner_url: str | Sequence[str],
    path: str,
    body: dict[str, Any],
    timeout: float,
    *,
    uniform: Callable[[float, float], float] = _random_uniform,
    on_retry: RetryHook | None = None,
) -> OwnerAnswer:
    """POST to the first owner that gives a final answer within ``timeout``.

    Returns that answer.  When the deadline runs out, returns the last 5xx or
    429 if some owner answered at all (the flow then refuses with it), else
    raises :class:`HttpError` with the last reason and the count of attempts.
    """
    urls = owner_urls(owner_url)
    if not urls:
        raise HttpError("no owner URL")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    not_before = [0.0] * len(urls)
    failures = [0] * len(urls)
    last = -1
    attempts = 0
    last_answer: OwnerAnswer | None = None
    last_error = "no attempt made"
    while True:
        order = [(last + 1 + k) % len(urls) for k in range(len(urls))]
        index = min(order, key=lambda j: not_before[j])  # ties: the next in turn
        now = loop.time()
        pause = max(0.0, not_before[index] - now)
        if now + pause >= deadline:
            break
        if pause:
            await asyncio.sleep(pause)
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        last, url = index, urls[index]
        attempts += 1
        hint: float | None = None
        try:
            status, answer, headers = await request_json_headers(
                "POST", url.rstrip("/") + path, body, timeout=remaining
            )
        except HttpError as exc:
            last_error = " ".join(str(exc).split())
            what = last_error
        else:
            if not retryable(status):
                return OwnerAnswer(status, answer, url, attempts)
            last_answer = OwnerAnswer(status, answer, url, attempts)
            what = f"HTTP {status}"
            if status in (429, 503):
                hint = retry_after(headers)
        failures[index] += 1
        if hint is None:
            step = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (failures[index] - 1))
            hint = step / 2 + uniform(0.0, step / 2)
        not_before[index] = loop.time() + hint
        if on_retry is not None:
            soonest = max(0.0, min(not_before) - loop.time())
            on_retry(url, attempts, what, soonest)
    if last_answer is not None:
        return OwnerAnswer(last_answer.status, last_answer.body, last_answer.url, attempts)
    raise HttpError(f"{last_error} ({attempts} attempt{'s' if attempts != 1 else ''} in {timeout:g}s)")
