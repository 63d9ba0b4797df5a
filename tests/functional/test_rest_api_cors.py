"""CORS on the REST API: its OPTIONS routes reach the function, which answers them as the
Function URL answers with the template's CorsAllowOrigins; Function URL events get no CORS
headers from us (Lambda adds them itself)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from streamgate import cors
from tests.helpers import ScriptedProvider, body_bytes, chat_event, load_event, make_app

ORIGIN = "https://app.example"


def rest_event(method: str, headers: dict[str, str], path: str = "/v1/chat/completions",
               body: str | None = None) -> dict[str, Any]:
    """A REST API (v1) proxy event as API Gateway sends it."""
    event = load_event("rest-api-prompt.json")
    event.update(httpMethod=method, path=path, resource=path, body=body)
    event["requestContext"].update(httpMethod=method, resourcePath=path)
    event["headers"] = {**event["headers"], **headers}
    event["multiValueHeaders"] = {k: [v] for k, v in event["headers"].items()}
    return event


PREFLIGHT = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "content-type, authorization"}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/health"])
def test_a_rest_preflight_from_an_allowed_origin_is_answered_as_the_function_url_does(
    path: str,
) -> None:
    # GIVEN CORS on, as the template passes CorsAllowOrigins
    provider = ScriptedProvider()
    app = make_app(provider, cors_origins=(ORIGIN,))
    # WHEN a browser's preflight reaches the function through the REST API
    response = app.handle(rest_event("OPTIONS", PREFLIGHT, path))
    # THEN 204 with exactly the Function URL's preflight headers, and no model call
    assert response.status == 204
    assert body_bytes(response) == b""
    assert {k: v for k, v in response.headers.items() if k.startswith("access-control")} == {
        "access-control-allow-origin": ORIGIN,
        "access-control-allow-methods": ", ".join(cors.ALLOW_METHODS),
        "access-control-allow-headers": ", ".join(cors.ALLOW_HEADERS),
        "access-control-max-age": str(cors.MAX_AGE)}
    assert response.headers["vary"] == "origin"
    assert response.headers["x-request-id"] and response.headers["x-content-type-options"]
    assert provider.requests == []
    response.close()


def test_a_rest_request_from_an_allowed_origin_carries_allow_origin_and_expose_headers() -> None:
    app = make_app(cors_origins=(ORIGIN,))
    response = app.handle(rest_event("POST", {"Origin": ORIGIN},
                                     body='{"prompt": "hi", "stream": true}'))
    assert response.status == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert response.headers["access-control-expose-headers"] == ", ".join(cors.EXPOSE_HEADERS)
    assert "access-control-allow-methods" not in response.headers
    assert body_bytes(response).endswith(b"data: [DONE]\n\n")
    response.close()


def test_errors_carry_the_cors_headers_too() -> None:
    app = make_app(cors_origins=("*",))
    response = app.handle(rest_event("POST", {"Origin": ORIGIN}, body="{not json"))
    assert response.status == 400
    assert response.headers["access-control-allow-origin"] == "*"
    response.close()


@pytest.mark.parametrize(
    ("origins", "headers"),
    [((ORIGIN,), {**PREFLIGHT, "Origin": "https://elsewhere.example"}),  # not on the list
     ((), PREFLIGHT)],  # CORS off
    ids=["other-origin", "cors-off"],
)
def test_a_preflight_from_an_origin_not_allowed_is_refused_by_the_origin_rule(
    origins: tuple[str, ...], headers: dict[str, str]
) -> None:
    # The Origin rule comes before routing: a page of another origin gets a 403 (and no CORS
    # headers, so the browser fails its preflight), not the route's 405.
    response = make_app(cors_origins=origins).handle(rest_event("OPTIONS", headers))
    assert response.status == 403
    assert json.loads(b"".join(response.body))["error"]["code"] == "origin_not_allowed"
    assert not [k for k in response.headers if k.startswith("access-control")]
    response.close()


def test_an_options_request_that_is_no_preflight_is_an_ordinary_request() -> None:
    response = make_app(cors_origins=(ORIGIN,)).handle(rest_event("OPTIONS", {"Origin": ORIGIN}))
    assert response.status == 405
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-methods" not in response.headers
    response.close()


def test_function_url_events_get_no_cors_headers_from_the_function() -> None:
    # Lambda answers the Function URL's CORS itself; headers of ours would be duplicates.
    app = make_app(cors_origins=(ORIGIN,))
    preflight = app.handle(chat_event(None, method="OPTIONS", headers={
        "origin": ORIGIN, "access-control-request-method": "POST"}))
    post = app.handle(chat_event({"prompt": "hi"}, headers={"origin": ORIGIN}))
    for response in (preflight, post):
        assert not [k for k in response.headers if k.startswith("access-control")]
        response.close()
    assert preflight.status == 405 and post.status == 200


def test_settings_read_the_origins_the_template_joins() -> None:
    from streamgate.config import load_settings

    settings = load_settings({"STREAMGATE_CORS_ALLOW_ORIGINS": f"{ORIGIN}, https://b.example"})
    assert settings.cors_origins == (ORIGIN, "https://b.example")
    assert load_settings({"STREAMGATE_CORS_ALLOW_ORIGINS": ""}).cors_origins == ()
