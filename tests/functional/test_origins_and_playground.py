"""The Origin rule, the playground route and CORS for real browser clients, through the
handler (Function URL and REST events) and the dev server over real sockets. The real browser
runs these in tests/integration/test_browser.py."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import requests

from streamgate import cors, devserver
from streamgate.handler import SECURITY_HEADERS
from streamgate.keystore import load_template
from tests.conftest import running_dev_server
from tests.helpers import ScriptedProvider, body_bytes, chat_event, load_event, make_app

ROOT = Path(__file__).resolve().parents[2]
FUNCTION_URL = "https://abcdefghij.lambda-url.us-east-1.on.aws"  # events/*.json's domain
PROMPT = {"prompt": "Explain streaming APIs", "stream": True}


def _handle(headers: dict[str, str], *, path: str = "/v1/chat/completions",
            method: str = "POST", body: Any = PROMPT, own_origin: str | None = None,
            **settings: Any) -> tuple[int, dict[str, str], bytes, ScriptedProvider]:
    provider = ScriptedProvider()
    app = make_app(provider, **settings)
    response = app.handle(chat_event(body, method=method, path=path, headers=headers),
                          own_origin=own_origin)
    raw = body_bytes(response)
    response.close()
    return response.status, response.headers, raw, provider


@pytest.mark.parametrize(("path", "method"), [("/v1/chat/completions", "POST"),
                                              ("/v1/models", "GET"), ("/health", "GET"),
                                              ("/v1/chat/completions", "OPTIONS")])
def test_a_page_of_an_origin_not_allowed_is_refused_403_before_anything(
        path: str, method: str) -> None:
    # GIVEN a request that a page on some other site made the browser send
    status, headers, raw, provider = _handle({"origin": "https://evil.example"}, path=path,
                                             method=method, body=PROMPT)
    # THEN 403 with an OpenAI error body, and the model was never called
    assert status == 403
    assert json.loads(raw) == {"error": {
        "message": "Requests from the origin 'https://evil.example' are not allowed: browsers "
                   "may call this server only from its own pages and the allowed CORS origins",
        "type": "permission_error", "param": None, "code": "origin_not_allowed"}}
    assert headers["content-type"] == "application/json"
    assert provider.requests == []


@pytest.mark.parametrize(("origin", "origins"), [
    (None, ()),                                    # curl, SDKs, servers: no Origin
    (FUNCTION_URL, ()),                            # the Function URL's own pages
    ("https://app.example", ("https://app.example",)),
    ("https://anyone.example", ("*",)),
])
def test_requests_without_origin_or_from_an_allowed_one_are_served(
        origin: str | None, origins: tuple[str, ...]) -> None:
    status, _, _, provider = _handle({"origin": origin} if origin else {}, cors_origins=origins)
    assert status == 200 and len(provider.requests) == 1


def test_the_own_origin_is_the_event_domain_over_https_only() -> None:
    assert _handle({"origin": FUNCTION_URL.replace("https", "http")})[0] == 403
    assert _handle({"origin": FUNCTION_URL + ":8443"})[0] == 403
    # a driver that says it has no own origin (the dev server reached by a DNS name)
    assert _handle({"origin": FUNCTION_URL}, own_origin="")[0] == 403


def test_the_rest_api_event_has_its_own_origin_too() -> None:
    event = load_event("rest-api-prompt.json")
    domain = "abc123defg.execute-api.us-east-1.amazonaws.com"
    event["requestContext"]["domainName"] = domain
    app = make_app()
    for origin, status in ((f"https://{domain}", 200), ("https://evil.example", 403)):
        event["headers"]["origin"] = origin
        response = app.handle(event)
        assert response.status == status
        response.close()


# What a page can make a browser POST without a preflight (the CORS-safelisted content types,
# parameters and case as browsers send them): each carries the JSON prompt as its body.
SIMPLE_CONTENT_TYPES = ["text/plain", "text/plain;charset=UTF-8",
                        "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                        "Text/Plain"]


@pytest.mark.parametrize("content_type", SIMPLE_CONTENT_TYPES)
def test_a_simple_post_from_a_page_of_another_origin_is_refused_403_and_runs_nothing(
        content_type: str) -> None:
    # GIVEN the POST a page on some other site can send without asking: no preflight, a
    # "simple" content type, the prompt as its body
    headers = {"origin": "https://evil.example", "content-type": content_type}
    # WHEN it reaches the handler as a Function URL event, and as a REST API event
    status, _, raw, provider = _handle(headers)
    event = load_event("rest-api-prompt.json")
    event["headers"] = {**{k: v for k, v in event["headers"].items()
                           if k.lower() != "content-type"}, **headers}
    rest_provider = ScriptedProvider()
    rest = make_app(rest_provider).handle(event)
    # THEN both are refused 403 by the Origin rule, and the model never ran
    assert status == 403 and json.loads(raw)["error"]["code"] == "origin_not_allowed"
    assert rest.status == 403 and json.loads(body_bytes(rest))["error"]["code"] == \
        "origin_not_allowed"
    rest.close()
    assert provider.requests == [] and rest_provider.requests == []


@pytest.mark.parametrize("content_type", SIMPLE_CONTENT_TYPES)
def test_the_same_simple_post_without_an_origin_is_served(content_type: str) -> None:
    # curl and servers send these content types too: only the Origin decides
    status, _, _, provider = _handle({"content-type": content_type})
    assert status == 200 and len(provider.requests) == 1


# -- the dev server ---------------------------------------------------------------------------

@pytest.mark.parametrize("content_type", SIMPLE_CONTENT_TYPES)
def test_the_dev_server_refuses_a_simple_post_from_another_origin_and_runs_nothing(
        content_type: str) -> None:
    provider = ScriptedProvider()
    with running_dev_server(make_app(provider)) as url:
        # WHEN a page of another origin POSTs the prompt without a preflight
        refused = requests.post(f"{url}/v1/chat/completions", data=json.dumps(PROMPT),
                                timeout=10, headers={"origin": "https://evil.example",
                                                     "content-type": content_type})
        # AND the dev server's own page sends the very same request
        own = requests.post(f"{url}/v1/chat/completions", data=json.dumps(PROMPT),
                            timeout=10, headers={"origin": url, "content-type": content_type})
    # THEN the other origin's is refused 403, and only the own page's ran the model
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "origin_not_allowed"
    assert own.status_code == 200 and own.text.endswith("data: [DONE]\n\n")
    assert len(provider.requests) == 1


def test_curl_without_a_content_type_is_not_a_browser_and_is_served() -> None:
    # curl -d '{"prompt": ...}' sends application/x-www-form-urlencoded and no Origin
    with running_dev_server(make_app()) as url:
        answer = requests.post(f"{url}/v1/chat/completions", data=json.dumps(PROMPT),
                               headers={"content-type": "application/x-www-form-urlencoded"},
                               timeout=10)
    assert answer.status_code == 200 and answer.text.endswith("data: [DONE]\n\n")


def test_the_dev_servers_own_origin_is_allowed_and_a_rebound_name_is_not() -> None:
    provider = ScriptedProvider()
    with running_dev_server(make_app(provider)) as url:
        port = url.rsplit(":", 1)[1]
        own = requests.post(f"{url}/v1/chat/completions", json=PROMPT, timeout=10,
                            headers={"origin": url})
        localhost = requests.post(f"{url}/v1/chat/completions", json=PROMPT, timeout=10,
                                  headers={"origin": f"http://localhost:{port}",
                                           "host": f"localhost:{port}"})
        # DNS rebinding: a page at http://rebind.example:PORT whose name now points here
        rebound = requests.post(f"{url}/v1/chat/completions", json=PROMPT, timeout=10,
                                headers={"origin": f"http://rebind.example:{port}",
                                         "host": f"rebind.example:{port}"})
        # a page on another port is another origin
        neighbour = requests.post(f"{url}/v1/chat/completions", json=PROMPT, timeout=10,
                                  headers={"origin": "http://127.0.0.1:1"})
    assert own.status_code == 200 and localhost.status_code == 200
    assert rebound.status_code == 403 and neighbour.status_code == 403
    assert rebound.json()["error"]["code"] == "origin_not_allowed"
    assert len(provider.requests) == 2


def test_a_preflight_asking_for_the_openai_sdks_headers_is_allowed() -> None:
    origin = "http://localhost:3000"
    asked = ("authorization, content-type, openai-organization, openai-project, "
             "x-stainless-arch, x-stainless-lang, x-stainless-os, x-stainless-package-version, "
             "x-stainless-retry-count, x-stainless-runtime, x-stainless-runtime-version")
    with running_dev_server(make_app(cors_origins=(origin,))) as url:
        preflight = requests.options(f"{url}/v1/chat/completions", timeout=10, headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": asked})
        refused = requests.options(f"{url}/v1/chat/completions", timeout=10, headers={
            "origin": "https://evil.example", "access-control-request-method": "POST",
            "access-control-request-headers": asked})
    allowed = {h.strip() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert preflight.status_code == 204
    assert {h.strip() for h in asked.split(",")} <= allowed
    assert refused.status_code == 403 and "access-control-allow-origin" not in refused.headers


def test_a_preflight_for_the_messages_api_from_anthropics_sdk_in_a_browser_is_allowed() -> None:
    # GIVEN the dev server allowing a page's origin
    origin = "http://localhost:3000"
    # WHEN Anthropic's SDK in that page (dangerouslyAllowBrowser), traced, preflights a call
    asked = ("anthropic-dangerous-direct-browser-access, anthropic-version, anthropic-beta, "
             "content-type, x-api-key, x-stainless-lang, x-stainless-retry-count, "
             "traceparent, tracestate")
    with running_dev_server(make_app(cors_origins=(origin,))) as url:
        preflight = requests.options(f"{url}/v1/messages", timeout=10, headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": asked})
    # THEN every header it asked for is allowed, and it may read Anthropic's request-id
    allowed = {h.strip() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert preflight.status_code == 204
    assert {h.strip() for h in asked.split(",")} <= allowed
    assert "request-id" in cors.EXPOSE_HEADERS


def test_cors_exposes_the_headers_a_browser_client_reads() -> None:
    exposed = set(cors.EXPOSE_HEADERS)
    assert {"x-request-id", "retry-after", "retry-after-ms"} <= exposed
    assert {f"x-ratelimit-{w}-{k}" for w in ("limit", "remaining", "reset")
            for k in ("requests", "tokens")} <= exposed


def test_the_template_cors_list_fits_the_function_url_limits() -> None:
    # https://docs.aws.amazon.com/lambda/latest/api/API_Cors.html: at most 100 entries,
    # each at most 1,024 characters (AllowHeaders, ExposeHeaders); 6 methods.
    template = load_template(ROOT / "template.yaml")
    block = template["Resources"]["StreamgateFunction"]["Properties"]["FunctionUrlConfig"][
        "Cors"]["Fn::If"][1]
    for name in ("AllowHeaders", "ExposeHeaders"):
        assert len(block[name]) <= 100 and all(len(h) <= 1024 for h in block[name])
        assert len(set(block[name])) == len(block[name]), name
    assert len(block["AllowMethods"]) <= 6


def test_the_template_gives_the_function_its_origins_and_the_playground_switch() -> None:
    template = load_template(ROOT / "template.yaml")
    variables = template["Resources"]["StreamgateFunction"]["Properties"]["Environment"][
        "Variables"]
    assert variables["STREAMGATE_CORS_ALLOW_ORIGINS"] == {"Fn::Join": [",", {
        "Ref": "CorsAllowOrigins"}]}
    assert variables["STREAMGATE_PLAYGROUND"] == {"Ref": "Playground"}
    assert template["Parameters"]["Playground"]["Default"] == "false"


# -- the playground route ---------------------------------------------------------------------

def _inline_hashes(html: bytes, tag: bytes) -> list[str]:
    blocks = re.findall(rb"<" + tag + rb">(.*?)</" + tag + rb">", html, re.S)
    return [f"'sha256-{base64.b64encode(hashlib.sha256(b).digest()).decode()}'"
            for b in blocks]


def test_the_playground_is_served_with_a_policy_allowing_exactly_its_own_script_and_style(
) -> None:
    status, headers, raw, _ = _handle({}, path="/", method="GET", body=None, playground=True)
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    policy = dict(d.strip().split(" ", 1) for d in headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'"
    assert policy["script-src"].split() == _inline_hashes(raw, b"script") != []
    assert policy["style-src"].split() == _inline_hashes(raw, b"style") != []
    assert policy["connect-src"] == "'self'" and policy["img-src"] == "data:"
    assert policy["frame-ancestors"] == "'none'" and policy["base-uri"] == "'none'"
    assert policy["require-trusted-types-for"] == "'script'"
    # nothing from anywhere else: no URL in the page but its own relative API paths
    assert not re.search(rb"(src|href)=\"(https?:)?//", raw)
    assert headers["x-content-type-options"] == "nosniff"


def test_every_other_route_keeps_default_src_none() -> None:
    for path, method in (("/health", "GET"), ("/v1/models", "GET"), ("/nope", "GET")):
        _, headers, _, _ = _handle({}, path=path, method=method, body=None, playground=True)
        assert headers["content-security-policy"] == \
            SECURITY_HEADERS["content-security-policy"], path


def test_the_playground_is_off_unless_configured_and_only_answers_get() -> None:
    assert _handle({}, path="/", method="GET", body=None)[0] == 404
    status, headers, _, _ = _handle({}, path="/", method="POST", playground=True)
    assert status == 405 and headers["allow"] == "GET, HEAD"


def test_the_dev_server_serves_the_playground_and_takes_its_origins_from_the_command_line(
) -> None:
    parse = devserver.build_parser().parse_args
    assert devserver.dev_settings(parse([]), {}).playground is True
    assert devserver.dev_settings(parse([]), {"STREAMGATE_PLAYGROUND": "false"}).playground \
        is False
    env = {"STREAMGATE_CORS_ALLOW_ORIGINS": "https://a.example"}
    assert devserver.dev_settings(parse([]), env).cors_origins == ("https://a.example",)
    assert devserver.dev_settings(parse(["--cors-origins", "http://localhost:3000, *"]),
                                  env).cors_origins == ("http://localhost:3000", "*")
    assert devserver.dev_settings(parse(["--cors-origins", ""]), env).cors_origins == ()
