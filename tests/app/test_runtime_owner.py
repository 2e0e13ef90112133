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
from tests.app.runtime_fakes import Fed


@pytest.fixture
def owner_answers(monkeypatch):
    """The owner's answers to successive posts: (status, body), an exception, or an Event to wait on."""
    answers: list = []
    posted: list = []

    async def post_owner(url, path, body, timeout):
        posted.append((url, path, body, timeout))
        answer = answers.pop(0)
        if isinstance(answer, asyncio.Event):
            await answer.wait()
            answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr("agent.io.owner_client.post_owner", post_owner)
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
    assert posted[0] == ("http://owner.example:8000/", "/v1/secret", {"vm": "vm1"}, 7.5)
    released, refused = fed.events()
    assert isinstance(released, OwnerReleased) and released.packet_header == header
    assert refused == OwnerRefused(403, "measurement mismatch")


async def test_no_answer_at_all_is_a_one_line_failure(owner_answers):
    answers, _ = owner_answers
    answers.append(HttpError("connection refused\nby peer"))
    event = await ask_owner("http://owner.example", "/v1/secret", {}, 1.0)
    assert event == OwnerFailed("owner unreachable: connection refused by peer")


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
