"""The owner client's retries, against real HTTP servers this test controls."""

from __future__ import annotations

import asyncio

import pytest

from agent.io.http import HttpError
from agent.io.owner_client import OwnerAnswer, owner_urls, post_owner_retrying, retry_after, retryable
from tests.scripted_owner import ScriptedOwner, refusing_url

RELEASED = (200, {"packet_header": "h", "secret": "s"}, {})
BODY = {"vm": "vm1", "measurement": "bQ=="}


@pytest.fixture
async def owners():
    started: list[ScriptedOwner] = []

    async def make(*script) -> ScriptedOwner:
        owner = await ScriptedOwner(list(script)).start()
        started.append(owner)
        return owner

    yield make
    for owner in started:
        await owner.close()


def now() -> float:
    return asyncio.get_running_loop().time()


async def test_a_first_url_that_refuses_connections_costs_nothing_when_the_second_answers(owners):
    good = await owners(RELEASED)
    t0 = now()
    answer = await post_owner_retrying([refusing_url(), good.url], "/v1/secret", BODY, 10.0)
    assert (answer.status, answer.url, answer.attempts) == (200, good.url, 2)
    assert answer.body == RELEASED[1]
    assert now() - t0 < 2.0  # no back-off between two different owners
    assert [(s.path, s.body) for s in good.seen] == [("/v1/secret", BODY)]


async def test_503_then_200_is_retried_after_a_jittered_pause(owners):
    owner = await owners((503, {"error": "database busy"}, {}), RELEASED)
    pauses: list[tuple[float, float]] = []

    def uniform(a: float, b: float) -> float:
        pauses.append((a, b))
        return b

    answer = await post_owner_retrying(owner.url, "/v1/secret", BODY, 10.0, uniform=uniform)
    assert (answer.status, answer.attempts) == (200, 2)
    assert pauses == [(0.0, 0.05)]  # half of the first step fixed, half drawn
    assert owner.seen[1].at - owner.seen[0].at >= 0.1 - 0.01
    assert owner.seen[0].body == owner.seen[1].body == BODY  # the same request again


async def test_429_is_retried_and_its_retry_after_honoured(owners):
    owner = await owners((429, {"error": "too many pending sessions"}, {"Retry-After": "1"}), RELEASED)
    answer = await post_owner_retrying(owner.url, "/v1/secret", BODY, 10.0)
    assert (answer.status, answer.attempts) == (200, 2)
    assert owner.seen[1].at - owner.seen[0].at >= 1.0 - 0.01


async def test_a_4xx_answer_is_final_even_with_another_owner_left(owners):
    refusing = await owners((403, {"error": "measurement mismatch"}, {}))
    other = await owners(RELEASED)
    answer = await post_owner_retrying([refusing.url, other.url], "/v1/secret", BODY, 10.0)
    assert (answer.status, answer.body, answer.attempts) == (403, {"error": "measurement mismatch"}, 1)
    assert other.seen == []


async def test_no_answer_until_the_deadline_is_one_line_with_the_count_of_attempts():
    # The shortest jitter, so the schedule is known: each URL at 0, 0.05,
    # 0.15, 0.35 and 0.75 s; its next try (1.55 s) is past the deadline, so
    # the loop gives up then rather than sleep to the deadline for nothing.
    t0 = now()
    with pytest.raises(HttpError) as err:
        await post_owner_retrying(
            [refusing_url(), refusing_url()], "/v1/secret", BODY, 1.0, uniform=lambda low, _high: low
        )
    elapsed = now() - t0
    text = str(err.value)
    assert "connection refused" in text and "attempts in 1s" in text and "\n" not in text
    assert int(text.rsplit("(", 1)[1].split()[0]) >= 8  # both URLs, several rounds
    assert 0.7 <= elapsed < 3.0


async def test_a_5xx_until_the_deadline_is_the_answer_the_flow_refuses_with(owners):
    owner = await owners((502, {"error": "bad gateway"}, {}))
    answer = await post_owner_retrying(owner.url, "/v1/secret", BODY, 0.8)
    assert answer.status == 502 and answer.attempts == len(owner.seen) >= 2


async def test_a_retry_after_beyond_the_deadline_returns_at_once(owners):
    owner = await owners((429, {"error": "busy"}, {"Retry-After": "30"}))
    t0 = now()
    answer = await post_owner_retrying(owner.url, "/v1/secret", BODY, 5.0)
    assert answer.status == 429 and len(owner.seen) == 1
    assert now() - t0 < 2.0


async def test_each_retry_is_reported_to_the_hook(owners):
    owner = await owners((500, {}, {}), RELEASED)
    calls = []
    await post_owner_retrying(owner.url, "/v1/secret", BODY, 10.0, on_retry=lambda *a: calls.append(a))
    assert len(calls) == 1 and calls[0][:3] == (owner.url, 1, "HTTP 500")


def test_what_is_retried():
    assert [s for s in (200, 400, 403, 404, 409, 415, 429, 500, 503, 599) if retryable(s)] == [429, 500, 503, 599]


@pytest.mark.parametrize(
    "headers, seconds",
    [({"retry-after": "2"}, 2.0), ({"retry-after": " 0 "}, 0.0), ({"retry-after": "3600"}, 60.0), ({}, None)],
)
def test_retry_after_is_delta_seconds_only(headers, seconds):
    assert retry_after(headers) == seconds


@pytest.mark.parametrize("text", ["Wed, 21 Oct 2015 07:28:00 GMT", "-1", "1.5", "9999999999"])
def test_retry_after_in_another_form_is_ignored(text):
    assert retry_after({"retry-after": text}) is None


def test_owner_urls_accepts_one_or_many():
    assert owner_urls("http://a") == ("http://a",)
    assert owner_urls(["http://a", "http://b"]) == ("http://a", "http://b")
    assert owner_urls(None) == ()


def test_an_answer_never_shows_its_body():
    assert "secret" not in repr(OwnerAnswer(200, {"secret": "c2VjcmV0"}, "http://a", 1))
