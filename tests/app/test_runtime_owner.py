"""The owner executor: PostOwner in, OwnerReleased/OwnerRefused/OwnerFailed out."""

from __future__ import annotations

import asyncio
import base64

import pytest

from agent.app import runtime_owner
from agent.app.runtime_owner import OwnerExecutor, ask_owner
from agent.core.actions import PostOwner
from agent.core.events import OwnerFailed, OwnerRefused, OwnerReleased
from agent.io.http import HttpError
from tests.app.runtime_fakes import Fed, QuietLog
from tests.scripted_owner import ScriptedOwner, refusing_url


@pytest.fixture
def owner_answers(monkeypatch):
    """The owner's answers to successive posts: (status, body), an exception, or an Event to wait on."""
    answers: list = []
    posted: list = []

    async def request_json_headers(method, url, body, *, timeout):
        posted.append((url, body, timeout))
        answer = answers.pop(0)
        if isinstance(answer, asyncio.Event):
            await answer.wait()
            answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return (*answer, {})

    monkeypatch.setattr("agent.io.owner_client.request_json_headers", request_json_headers)
    return answers, posted


async def test_without_an_owner_url_the_flow_learns_at_once_that_there_is_no_owner():
    fed = Fed()
    owner = OwnerExecutor(fed, None, 5.0)
    owner.run("launch", PostOwner("/v1/secret", {"vm": "vm1"}))
    await asyncio.sleep(0)
    assert fed == [("launch", OwnerFailed("no owner_url configured"))]


async def test_the_owners_answer_becomes_the_core_event_it_means(owner_answers):
    answers, posted = owner_answers
    header = base64.b64encode(bytes(52)).decode()
    secret = base64.b64encode(bytes(64)).decode()
    answers += [(200, {"packet_header": header, "secret": secret}), (403, {"error": "measurement mismatch"})]
    fed = Fed()
    owner = OwnerExecutor(fed, "http://owner.example:8000/", 7.5)
    owner.run("launch", PostOwner("/v1/secret", {"vm": "vm1"}))
    owner.run("other", PostOwner("/v1/secret", {"vm": "vm2"}))
    await asyncio.sleep(0.01)
    url, body, timeout = posted[0]
    assert (url, body) == ("http://owner.example:8000/v1/secret", {"vm": "vm1"}) and 0 < timeout <= 7.5
    released, refused = fed.events()
    assert isinstance(released, OwnerReleased) and released.packet_header == header
    assert refused == OwnerRefused(403, "measurement mismatch")


async def test_no_answer_at_all_is_a_one_line_failure(owner_answers):
    answers, _ = owner_answers
    answers.extend(HttpError("connection refused\nby peer") for _ in range(100))
    event = await ask_owner("http://owner.example", "/v1/secret", {}, 0.3)
    assert isinstance(event, OwnerFailed)
    assert event.reason.startswith("owner unreachable: connection refused by peer (")
    assert event.reason.endswith("attempts in 0.3s)") and "\n" not in event.reason


async def test_a_finished_flows_owner_request_is_cancelled(owner_answers):
    answers, _ = owner_answers
    gate = asyncio.Event()
    answers += [gate, (403, {"error": "late"})]
    fed = Fed()
    owner = OwnerExecutor(fed, "http://owner.example", 5.0)
    owner.run("launch", PostOwner("/v1/secret", {}))
    await asyncio.sleep(0)
    owner.forget("launch")
    gate.set()
    await asyncio.sleep(0.01)
    assert fed == [] and owner.tasks.all() == set()


def test_the_runtime_module_still_offers_ask_owner():
    from agent.app import runtime

    assert runtime.ask_owner is runtime_owner.ask_owner


async def test_the_flow_sees_one_answer_after_the_retries_and_the_log_sees_each_retry():
    owner = await ScriptedOwner([(503, {"error": "busy"}, {}), (200, {"error": "x"}, {})]).start()
    header = base64.b64encode(bytes(52)).decode()
    owner.script[1] = (200, {"packet_header": header, "secret": base64.b64encode(bytes(64)).decode()}, {})
    fed, log = Fed(), QuietLog()
    try:
        executor = OwnerExecutor(fed, (refusing_url(), owner.url), 10.0, log)
        executor.run("launch", PostOwner("/v1/secret", {"vm": "vm1"}))
        while not fed:
            await asyncio.sleep(0.01)
    finally:
        await owner.close()
    [(flow, event)] = fed
    assert flow == "launch" and isinstance(event, OwnerReleased) and event.packet_header == header
    retries = [f for level, msg, f in log.lines if msg == "guest owner gave no answer, trying again"]
    # refused, then 503, then whichever pause ends first (refused again, or the 200)
    assert [r["error"].split(" to ")[0] for r in retries[:2]] == ["connection refused", "HTTP 503"]
    answered = [f for level, msg, f in log.lines if msg == "guest owner answered"]
    assert answered[0]["attempts"] == len(retries) + 1 and answered[0]["url"] == owner.url


async def test_a_refusal_is_not_retried_and_reaches_the_flow_as_it_is():
    owner = await ScriptedOwner([(403, {"error": "measurement mismatch"}, {})]).start()
    try:
        event = await ask_owner([owner.url, refusing_url()], "/v1/secret", {"vm": "vm1"}, 10.0)
    finally:
        await owner.close()
    assert event == OwnerRefused(403, "measurement mismatch") and len(owner.seen) == 1


async def test_owners_unreachable_until_the_deadline_fail_the_flow_in_time():
    fed = Fed()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    executor = OwnerExecutor(fed, [refusing_url()], 0.5)
    executor.run("launch", PostOwner("/v1/secret", {}))
    while not fed:
        await asyncio.sleep(0.01)
    assert loop.time() - t0 < 3.0
    [(_, event)] = fed
    assert isinstance(event, OwnerFailed) and "connection refused" in event.reason
