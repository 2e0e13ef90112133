"""The control protocol: one table of routes, one answer shape, for server and ctl alike."""

from __future__ import annotations

from agent.protocol import control as wire


def test_every_route_is_a_method_and_a_distinct_path():
    routes = [v for k, v in vars(wire).items() if k.isupper() and isinstance(v, tuple)]
    assert len(routes) == 14  # + /v1/vms (host mode), migrate mh-target (docs/mh.md)
    assert all(method in ("GET", "POST") and path.startswith("/") for method, path in routes)
    assert len({path for _, path in routes}) == len(routes)


def test_a_failure_answer_names_its_error_or_the_status():
    assert wire.error_reason(409, wire.error_body("busy")) == "busy"
    assert wire.error_reason(500, "not json") == "HTTP 500"
    assert wire.error_reason(404, {"error": ""}) == "HTTP 404"


def test_readiness_is_503_until_qmp_is_connected():
    assert wire.ready_answer(True) == (200, {"ready": True})
    assert wire.ready_answer(False) == (503, {"ready": False})
