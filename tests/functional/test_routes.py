"""Model routes against our fakes on loopback: two fake Bedrock endpoints standing for two
regions, a scripted OpenAI-compatible upstream. Route selection, fallbacks before the first
byte (and none after it), cooldowns, what the client gets when every target fails, capabilities
across targets, routes re-read from SSM, and another account's role assumed through STS."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from streamgate.config import load_settings
from streamgate.deadline import Deadline
from streamgate.errors import ConfigError
from streamgate.handler import App, Response
from streamgate.routes import Cooling, parse_routes
from tests.fake_bedrock import FakeBedrock, Reply, start_event, text_block, text_events
from tests.fake_openai import FakeUpstream, chunk, error_reply, sse, text_stream
from tests.fake_openai import Reply as UpstreamReply
from tests.helpers import body_bytes, chat_event, sse_json

JSON = {"accept": "application/json"}


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def east() -> Iterator[FakeBedrock]:
    with FakeBedrock() as fake:
        yield fake


@pytest.fixture
def west() -> Iterator[FakeBedrock]:
    with FakeBedrock() as fake:
        yield fake


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


def bedrock(fake: FakeBedrock, name: str, region: str = "us-east-1", **extra: Any
            ) -> dict[str, Any]:
    return {"name": name, "kind": "bedrock", "model": "anthropic.claude-test", "region": region,
            "endpoint_url": fake.url, "max_attempts": 1, **extra}


def openai(fake: FakeUpstream, name: str = "openai", **extra: Any) -> dict[str, Any]:
    return {"name": name, "kind": "openai", "base_url": fake.url, "model": "upstream-model",
            "api_key": "sk-test-0123456789", "max_attempts": 1, **extra}


_apps: list[App] = []


@pytest.fixture(autouse=True)
def _close_apps() -> Iterator[None]:
    yield
    while _apps:
        _apps.pop().router.close()


def app_for(routes: dict[str, Any], **settings: Any) -> App:
    doc = json.dumps({"routes": routes, **settings.pop("doc", {})})
    app = App(load_settings({}, provider="routes", routes=doc, metrics=False,
                            **{"route_cooldown_s": 30.0, **settings}))
    _apps.append(app)
    return app


def ask(app: App, model: str, *, stream: bool = True, **body: Any) -> tuple[Response, Any]:
    response = app.handle(chat_event({"model": model, "stream": stream,
                                      "messages": [{"role": "user", "content": "hi"}], **body},
                                     headers=JSON))
    raw = body_bytes(response)
    response.close()
    doc = sse_json(raw) if response.status == 200 and stream else json.loads(raw)
    return response, doc


def text(chunks: list[Any]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                   if c.get("choices"))


# -- the document ----------------------------------------------------------------------------

@pytest.mark.parametrize(("doc", "message"), [
    ('{"routes": {}}', 'non-empty "routes"'),
    ('{"routes": {"claude": {"targets": []}}}', "route 'claude': \"targets\" must be"),
    ('{"routes": {"claude": [{"kind": "vertex", "model": "x"}]}}',
     "route 'claude', target 1: \"kind\" must be one of bedrock, openai, local"),
    ('{"routes": {"claude": [{"kind": "bedrock"}]}}',
     "route 'claude', target 1: \"model\" is required for kind bedrock"),
    ('{"routes": {"gpt": [{"kind": "openai", "model": "m", "base_url": "ftp://x"}]}}',
     "route 'gpt', target 1: \"base_url\" must be an http:// or https:// URL"),
    ('{"routes": {"claude": [{"kind": "bedrock", "model": "m", "regoin": "x"}]}}',
     "route 'claude', target 1: unknown field(s) for kind bedrock: regoin"),
    ('{"routes": {"claude": [{"kind": "bedrock", "model": "m", "name": "a"}, '
     '{"kind": "bedrock", "model": "n", "name": "a"}]}}', "target names must differ"),
    ('{"routes": {"claude": [{"kind": "bedrock", "model": "m", "first_token_timeout_s": 0}]}}',
     "'first_token_timeout_s' must be a positive number"),
    ('{"routes": {"gpt": [{"kind": "openai", "model": "m", "base_url": "http://x", '
     '"api_key": "a", "api_key_secret": "b"}]}}', "set only one of api_key_secret, api_key"),
    ("routes: [", "neither valid JSON nor valid YAML"),
    ('{"routes": {"claude": [{"kind": "bedrock", "model": "m"}]}, "failures_to_cool": 0}',
     '"failures_to_cool" must be a whole number from 1 to 100'),
    ('{"routes": {"claude": [{"kind": "bedrock", "model": "m"}]}, "failure_window_s": 0}',
     '"failure_window_s" must be a number of seconds above 0, at most 3600'),
    # nested past what a recursive parser can read: a RecursionError and a traceback before
    ('{"routes": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests too deeply"),
    ("routes:\n  claude: " + "[" * 5000 + "]" * 5000 + "\n", "nests too deeply"),
    # YAML reads unquoted 1 as a number and ~ as null: no client can name such a route
    ("routes:\n  1: [{kind: bedrock, model: m}]\n",
     "route name 1 is not a string (YAML reads 1 as a number and ~ as null): quote it"),
    ("routes:\n  ~: [{kind: bedrock, model: m}]\n", "route name None is not a string"),
    # and other keys of any type are named, not a TypeError
    ("routes:\n  claude: [{kind: bedrock, model: m, 1: x, ~: y, regoin: z}]\n",
     "unknown field(s) for kind bedrock: 1, None, regoin"),
    ("routes: {claude: [{kind: bedrock, model: m}]}\n2: x\nnull: y\n",
     "unknown field(s) 2, None"),
    ("routes:\n  claude: {targets: [{kind: bedrock, model: m}], 3: x}\n",
     "route 'claude': unknown field(s) 3"),
    ("routes:\n  claude: [{kind: bedrock, model: 2024-13-45}]\n",
     "neither valid JSON nor valid YAML"),
])
def test_an_invalid_document_is_refused_naming_what_is_wrong(doc: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_routes(doc, "routes.json", defaults=Cooling())
    assert message in caught.value.message


def test_the_dev_server_refuses_a_document_nested_too_deeply_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from streamgate.devserver import main

    monkeypatch.setenv("STREAMGATE_ROUTES", '{"routes": ' + "[" * 1000 + "]" * 1000 + "}")
    assert main(["--host", "127.0.0.1", "--port", "0"]) == 2
    assert capsys.readouterr().err == (
        "streamgate: STREAMGATE_ROUTES nests too deeply to be a routes document\n")


def test_the_settings_for_cooling_down_are_checked_like_the_others() -> None:
    with pytest.raises(ConfigError, match="STREAMGATE_ROUTE_FAILURES_TO_COOL must be from 1"):
        load_settings({"STREAMGATE_ROUTE_FAILURES_TO_COOL": "0"})
    with pytest.raises(ConfigError, match="STREAMGATE_ROUTE_FAILURE_WINDOW_S must be above 0"):
        load_settings({"STREAMGATE_ROUTE_FAILURE_WINDOW_S": "0"})
    settings = load_settings({"STREAMGATE_ROUTE_FAILURES_TO_COOL": "5",
                              "STREAMGATE_ROUTE_FAILURE_WINDOW_S": "10"})
    assert Cooling.from_settings(settings) == Cooling(30.0, 5, 10.0)
    # a document's own fields win over the settings
    table = parse_routes('{"routes": {"a": [{"kind": "bedrock", "model": "m"}]}, '
                         '"failures_to_cool": 2}', "doc", defaults=Cooling.from_settings(settings))
    assert table.cooling == Cooling(30.0, 2, 10.0)


def test_yaml_route_names_that_are_strings_work_quoted() -> None:
    table = parse_routes('routes:\n  "1": [{kind: bedrock, model: m}]\n', "routes.yaml",
                         defaults=Cooling())
    assert list(table.routes) == ["1"]


def test_yaml_documents_work_where_pyyaml_is_installed() -> None:
    table = parse_routes("routes:\n  claude:\n    - {kind: bedrock, model: m}\n", "routes.yaml",
                         defaults=Cooling())
    (target,) = table.routes["claude"].targets
    assert (target.name, target.kind, target.model) == ("claude#1", "bedrock", "m")


def test_a_routes_file_is_read_with_an_at_sign(tmp_path: Any, east: FakeBedrock) -> None:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": {"claude": [bedrock(east, "east")]}}))
    east.replies = [Reply(frames=text_events("from a file"))]
    app = App(load_settings({}, routes=f"@{path}", metrics=False))
    _apps.append(app)
    response, chunks = ask(app, "claude")
    assert text(chunks) == "from a file"


# -- selection and fallbacks ------------------------------------------------------------------

def test_each_public_model_is_served_by_its_route(east: FakeBedrock,
                                                  upstream: FakeUpstream) -> None:
    east.replies = [Reply(frames=text_events("claude here"))]
    upstream.replies = [UpstreamReply(body=[text_stream("llama here")])]
    app = app_for({"claude": [bedrock(east, "claude-east")], "llama": [openai(upstream)]})
    claude, claude_chunks = ask(app, "claude")
    llama, llama_chunks = ask(app, "llama")
    assert (text(claude_chunks), text(llama_chunks)) == ("claude here", "llama here")
    assert {c["model"] for c in claude_chunks} == {"claude"}  # the public name, always
    assert claude.headers["x-streamgate-backend"] == "claude-east"
    assert llama.headers["x-streamgate-backend"] == "openai"
    assert east.requests[0][0] == "anthropic.claude-test"
    assert upstream.chat_requests()[0]["model"] == "upstream-model"
    listed = json.loads(body_bytes(app.handle(chat_event(None, method="GET",
                                                         path="/v1/models"))))
    assert [(m["id"], m["owned_by"]) for m in listed["data"]] == [
        ("claude", "bedrock"), ("llama", "openai")]
    unknown, doc = ask(app, "gpt-9")
    assert (unknown.status, doc["error"]["code"]) == (404, "model_not_found")


@pytest.mark.parametrize("failure", ["throttled", "unavailable", "first-token-timeout",
                                     "access-denied"])
def test_a_failing_first_target_falls_back_before_the_first_byte(
    failure: str, east: FakeBedrock, west: FakeBedrock, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a route east -> west, and east failing in one of the ways another region may not
    east.replies = [{
        "throttled": Reply(429, "ThrottlingException", "Too many requests"),
        "unavailable": Reply(503, "ServiceUnavailableException", "Try later"),
        "first-token-timeout": Reply(frames=[start_event(), 3.0, *text_block(0, "late")]),
        "access-denied": Reply(403, "AccessDeniedException", "No access to this model"),
    }[failure]]
    west.replies = [Reply(frames=text_events("from the west"))]
    app = app_for({"claude": [bedrock(east, "east", first_token_timeout_s=0.5),
                              bedrock(west, "west", "us-west-2")]})
    # WHEN a client asks, THEN it gets west's answer as if nothing happened
    response, chunks = ask(app, "claude")
    assert response.status == 200 and text(chunks) == "from the west"
    assert response.headers["x-streamgate-backend"] == "west"
    log = [json.loads(line) for line in capsys.readouterr().out.splitlines()
           if '"message":"request"' in line][-1]
    assert log["backend"] == "west" and log["model"] == "claude"
    assert [f["target"] for f in log["fallbacks"]] == ["east"]


def test_connection_refused_falls_back(west: FakeBedrock) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    west.replies = [Reply(frames=text_events("reached"))]
    dead = {"name": "dead", "kind": "bedrock", "model": "m", "region": "us-east-1",
            "endpoint_url": f"http://127.0.0.1:{port}", "max_attempts": 1}
    response, chunks = ask(app_for({"claude": [dead, bedrock(west, "west")]}), "claude")
    assert response.status == 200 and text(chunks) == "reached"


def test_no_fallback_after_the_first_byte(east: FakeBedrock, west: FakeBedrock) -> None:
    east.replies = [Reply(frames=[start_event(), *text_block(0, "partial")[:1], 2.0])]
    app = app_for({"claude": [bedrock(east, "east", idle_timeout_s=0.3),
                              bedrock(west, "west")]})
    response, chunks = ask(app, "claude")
    assert response.status == 200
    assert text(chunks) == "partial" and chunks[-1]["error"]["code"] == "upstream_timeout"
    assert west.requests == []


def test_a_client_error_is_not_retried_elsewhere_unless_the_route_says_so(
    east: FakeBedrock, west: FakeBedrock
) -> None:
    too_long = Reply(400, "ValidationException", "Input is too long for requested model")
    east.replies = [too_long, too_long]
    west.replies = [Reply(frames=text_events("bigger model"))]
    strict = app_for({"claude": [bedrock(east, "east"), bedrock(west, "west")]})
    response, doc = ask(strict, "claude")
    assert (response.status, doc["error"]["code"]) == (400, "context_length_exceeded")
    assert west.requests == []
    lenient = app_for({"claude": {"targets": [bedrock(east, "east"), bedrock(west, "west")],
                                  "fallback_on_client_errors": True}})
    response, chunks = ask(lenient, "claude")
    assert response.status == 200 and text(chunks) == "bigger model"


def test_a_failed_target_is_skipped_while_it_cools_down(east: FakeBedrock,
                                                        west: FakeBedrock) -> None:
    east.replies = [Reply(429, "ThrottlingException", "slow down"),
                    Reply(frames=text_events("east again"))]
    west.replies = [Reply(frames=text_events("west 1")), Reply(frames=text_events("west 2"))]
    app = app_for({"claude": [bedrock(east, "east"), bedrock(west, "west")]},
                  route_cooldown_s=0.5)
    assert text(ask(app, "claude")[1]) == "west 1"
    # WHILE east cools down, it is not asked at all
    second, chunks = ask(app, "claude")
    assert text(chunks) == "west 2" and len(east.requests) == 1
    # AFTER the cooldown it is tried first again
    time.sleep(0.6)
    assert text(ask(app, "claude")[1]) == "east again"


@pytest.mark.parametrize(("east_reply", "west_reply", "status", "code"), [
    (Reply(429, "ThrottlingException", "a"), Reply(429, "ThrottlingException", "b"),
     429, "rate_limit_exceeded"),
    (Reply(429, "ThrottlingException", "a"), Reply(503, "ServiceUnavailableException", "b"),
     503, "upstream_unavailable"),
    (Reply(500, "InternalServerException", "a"), Reply(500, "InternalServerException", "b"),
     502, "upstream_error"),
    (Reply(frames=[start_event(), 3.0]), Reply(frames=[start_event(), 3.0]),
     504, "upstream_timeout"),
], ids=["all-throttled", "throttled-and-unavailable", "all-5xx", "all-timed-out"])
def test_when_every_target_fails_the_client_gets_the_most_meaningful_error(
    east: FakeBedrock, west: FakeBedrock, east_reply: Reply, west_reply: Reply, status: int,
    code: str
) -> None:
    east.replies, west.replies = [east_reply], [west_reply]
    app = app_for({"claude": [bedrock(east, "east", first_token_timeout_s=0.3),
                              bedrock(west, "west", first_token_timeout_s=0.3)]})
    response, doc = ask(app, "claude")
    assert (response.status, doc["error"]["code"]) == (status, code)
    if status in (429, 503):
        assert int(response.headers["retry-after"]) >= 1
    assert len(east.requests) == len(west.requests) == 1


def test_capabilities_are_the_first_targets_and_a_fallback_never_drops_a_parameter(
    east: FakeBedrock, upstream: FakeUpstream
) -> None:
    # A seed: the OpenAI-compatible upstream honours it, Bedrock cannot.
    upstream.replies = [error_reply(503, "loading"), error_reply(503, "loading")]
    app = app_for({"bedrock-first": [bedrock(east, "east"), openai(upstream)],
                   "openai-first": [openai(upstream), bedrock(east, "east")]})
    # checked against the first target: Bedrock refuses the seed outright
    refused, doc = ask(app, "bedrock-first", seed=7)
    assert (refused.status, doc["error"]["param"]) == (400, "seed")
    # the upstream fails: Bedrock, which cannot honour the seed, is not a fallback
    failed, doc = ask(app, "openai-first", seed=7)
    assert (failed.status, doc["error"]["code"]) == (503, "upstream_unavailable")
    assert east.requests == []


def test_the_one_provider_configuration_is_the_one_route_case() -> None:
    from tests.helpers import ScriptedProvider, make_app

    app = make_app(ScriptedProvider(models=["a", "b"]))
    response = app.handle(chat_event({"model": "b", "prompt": "hi"}))
    assert response.status == 200
    assert response.headers["x-streamgate-backend"] == "scripted"
    assert app.router.models() == ["a", "b"]


# -- SSM and STS under moto -------------------------------------------------------------------

def test_routes_are_re_read_from_ssm_after_their_ttl(east: FakeBedrock, west: FakeBedrock,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    import boto3
    from moto import mock_aws

    east.replies = [Reply(frames=text_events("east"))]
    west.replies = [Reply(frames=text_events("west"))]
    with mock_aws():
        ssm = boto3.client("ssm", region_name="us-east-1")
        ssm.put_parameter(Name="/streamgate/routes", Type="String", Value=json.dumps(
            {"routes": {"claude": [bedrock(east, "east")]}}))
        app = App(load_settings({}, routes_parameter="/streamgate/routes", routes_ttl_s=0.3,
                                metrics=False))
        _apps.append(app)
        assert text(ask(app, "claude")[1]) == "east"
        # WHEN the parameter changes (a new model, another backend), no redeploy
        ssm.put_parameter(Name="/streamgate/routes", Type="String", Overwrite=True,
                          Value=json.dumps({"routes": {"claude": [bedrock(west, "west")],
                                                       "claude-west": [bedrock(west, "w2")]}}))
        assert app.router.models() == ["claude"]  # within the TTL: the old routes
        time.sleep(0.4)
        response, chunks = ask(app, "claude")
        # THEN after the TTL the new routes serve
        assert text(chunks) == "west" and response.headers["x-streamgate-backend"] == "west"
        assert app.router.models() == ["claude", "claude-west"]
        # AND a broken document keeps the routes in force
        ssm.put_parameter(Name="/streamgate/routes", Type="String", Overwrite=True,
                          Value='{"routes": {"claude": [{"kind": "nope"}]}}')
        time.sleep(0.4)
        assert app.router.models() == ["claude", "claude-west"]
    assert "routes not re-read" in caplog.text


def test_a_routes_parameter_nested_too_deeply_fails_the_init_naming_it() -> None:
    import boto3
    from moto import mock_aws

    with mock_aws():
        boto3.client("ssm", region_name="us-east-1").put_parameter(
            Name="/streamgate/deep", Type="String",
            Value='{"routes": ' + "[" * 1000 + "]" * 1000 + "}")
        with pytest.raises(ConfigError) as caught:
            _ = App(load_settings({}, routes_parameter="/streamgate/deep")).router
    assert caught.value.message == (
        "SSM parameter /streamgate/deep nests too deeply to be a routes document")


def test_a_missing_routes_parameter_fails_the_init_naming_it() -> None:
    from moto import mock_aws

    with mock_aws(), pytest.raises(ConfigError, match="/streamgate/missing"):
        _ = App(load_settings({}, routes_parameter="/streamgate/missing")).router


def test_another_accounts_role_is_assumed_and_its_credentials_sign_the_call(
    east: FakeBedrock
) -> None:
    from moto import mock_aws
    from moto.sts.models import sts_backends

    role = "arn:aws:iam::222222222222:role/streamgate-partner"
    east.replies = [Reply(frames=text_events("partner account"))]
    with mock_aws():
        app = app_for({"claude": [bedrock(east, "partner", role_arn=role,
                                          external_id="streamgate-test")]})
        response, chunks = ask(app, "claude")
        assumed = sts_backends["222222222222"]["aws"].assumed_roles  # the role's account
    assert text(chunks) == "partner account"
    (role_session,) = [r for r in assumed if r.role_arn == role]
    assert role_session.external_id == "streamgate-test"
    credential = east.headers[0]["authorization"].split("Credential=")[1].split("/")[0]
    assert credential == role_session.access_key_id != "testing"


# -- on Lambda ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("routes", "message"), [
    ('{"routes": {"claude": [{"kind": "bedrock"}]}}',
     "route 'claude', target 1: \"model\" is required for kind bedrock"),
    ('{"routes": {"dev": [{"kind": "local"}]}}', "kind local"),
    ('{"routes": ' + "[" * 1000 + "]" * 1000 + "}", "nests too deeply"),
], ids=["invalid", "embedded-model", "nested-1000-deep"])
def test_routes_that_cannot_serve_on_lambda_fail_the_init_naming_the_route(
    routes: str, message: str
) -> None:
    from streamgate.runtime import run
    from tests.fake_runtime_api import FakeRuntimeAPI

    with FakeRuntimeAPI([chat_event({"prompt": "x"})]) as api:
        code = run(environ={"AWS_LAMBDA_RUNTIME_API": api.address,
                            "STREAMGATE_PROVIDER": "routes", "STREAMGATE_ROUTES": routes,
                            "STREAMGATE_ALLOW_UNAUTHENTICATED": "true",
                            "STREAMGATE_AUTH": "none"})
    assert code == 1
    (posted,) = api.posted
    assert posted.path == "/2018-06-01/runtime/init/error"
    assert message in json.loads(posted.body)["errorMessage"]
    assert json.loads(posted.body)["errorType"] == "Runtime.ConfigError"


# -- what counts as the target answering -------------------------------------------------------

def request_logs(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if '"message":"request"' in line]


USAGE = {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}


@pytest.mark.parametrize("body", [
    sse(),
    sse(chunk("", role="assistant")),
    sse(chunk("", role="assistant"), chunk(choices=False, usage=USAGE)),
], ids=["done-only", "role-only", "role-and-usage"])
def test_a_target_that_ends_without_output_has_failed_and_the_next_one_answers(
    body: bytes, upstream: FakeUpstream, west: FakeBedrock, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a first target that answers 200 and ends its stream without any model output
    upstream.replies = [UpstreamReply(body=[body])]
    west.replies = [Reply(frames=text_events("from the west"))]
    app = app_for({"claude": [openai(upstream, "empty"), bedrock(west, "west")]})
    # WHEN a client asks, THEN the next target answers it, before any byte was sent
    response, chunks = ask(app, "claude")
    assert response.status == 200 and text(chunks) == "from the west"
    assert response.headers["x-streamgate-backend"] == "west"
    assert not any("error" in c for c in chunks)
    assert request_logs(capsys)[-1]["fallbacks"] == [
        {"target": "empty", "outcome": "upstream_error"}]


def test_a_target_that_keeps_answering_nothing_cools_down(upstream: FakeUpstream,
                                                          west: FakeBedrock) -> None:
    upstream.replies = [UpstreamReply(body=[sse()]), UpstreamReply(body=[sse()])]
    west.replies = [Reply(frames=text_events(f"west {i}")) for i in range(3)]
    app = app_for({"claude": [openai(upstream, "empty"), bedrock(west, "west")]},
                  doc={"failures_to_cool": 2})
    answers = [text(ask(app, "claude")[1]) for _ in range(3)]
    assert answers == ["west 0", "west 1", "west 2"]
    # the second empty answer in a row cooled it: the third request did not ask it
    assert len(upstream.chat_requests()) == 2


def test_a_target_that_only_finishes_has_given_its_answer_an_empty_one(
    upstream: FakeUpstream, west: FakeBedrock
) -> None:
    # An empty answer with a reason is the backend's choice (max_tokens spent on nothing
    # visible, a stop sequence at once, a content filter), not a failure: it is relayed.
    upstream.replies = [UpstreamReply(body=[sse(chunk("", role="assistant"),
                                                chunk(finish="length"),
                                                chunk(choices=False, usage=USAGE))])]
    app = app_for({"claude": [openai(upstream), bedrock(west, "west")]})
    response, chunks = ask(app, "claude", max_tokens=1)
    assert response.status == 200 and response.headers["x-streamgate-backend"] == "openai"
    assert text(chunks) == ""
    assert [c["choices"][0]["finish_reason"] for c in chunks] == ["length"]
    assert west.requests == []


def test_usage_before_any_output_is_no_answer_a_stall_after_it_falls_back(
    upstream: FakeUpstream, west: FakeBedrock, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a first target that sends a usage-only chunk at once (some servers do), then stalls
    upstream.replies = [UpstreamReply(body=[
        sse(chunk(choices=False, usage=USAGE), done=False), 3.0])]
    west.replies = [Reply(frames=text_events("from the west"))]
    app = app_for({"claude": [openai(upstream, first_token_timeout_s=0.5),
                              bedrock(west, "west")]})
    # WHEN a client asks, THEN its first-token timeout fires before our 200, and west answers
    response, chunks = ask(app, "claude")
    assert response.status == 200 and text(chunks) == "from the west"
    assert not any("error" in c for c in chunks)
    assert request_logs(capsys)[-1]["fallbacks"] == [
        {"target": "openai", "outcome": "upstream_timeout"}]


def test_usage_that_comes_before_the_first_output_is_relayed_after_it(
    upstream: FakeUpstream
) -> None:
    # GIVEN usage chunks before any output (only the latest counts, as it does after)
    early = {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}
    upstream.replies = [UpstreamReply(body=[sse(chunk(choices=False, usage=early),
                                                chunk(choices=False, usage=USAGE),
                                                chunk("", role="assistant"), chunk("hi"),
                                                chunk(finish="stop"))])]
    app = app_for({"claude": [openai(upstream)]})
    response, chunks = ask(app, "claude", stream_options={"include_usage": True})
    assert text(chunks) == "hi"
    assert chunks[-1]["usage"] == USAGE


# -- cooling down on evidence, not on one request ---------------------------------------------

def test_one_requests_failure_does_not_divert_everyone_elses_traffic(
    upstream: FakeUpstream, west: FakeBedrock
) -> None:
    # GIVEN a healthy primary that answers one client's request with a 500 (a parameter only
    # it rejects, a prompt it chokes on)
    upstream.replies = [error_reply(500, "cannot handle this one"),
                        *[UpstreamReply(body=[text_stream(f"primary {i}")]) for i in range(5)]]
    west.replies = [Reply(frames=text_events("fallback"))]
    app = app_for({"claude": [openai(upstream, "primary"), bedrock(west, "west")]})
    assert text(ask(app, "claude")[1]) == "fallback"
    # WHEN five ordinary requests follow, THEN the primary serves every one of them
    assert [text(ask(app, "claude")[1]) for _ in range(5)] == [f"primary {i}" for i in range(5)]
    assert len(west.requests) == 1


def test_failures_in_a_row_within_the_window_cool_the_target(
    upstream: FakeUpstream, west: FakeBedrock, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.replies = [error_reply(500, "down"), error_reply(502, "down")]
    west.replies = [Reply(frames=text_events(f"west {i}")) for i in range(3)]
    app = app_for({"claude": [openai(upstream, "primary"), bedrock(west, "west")]},
                  doc={"failures_to_cool": 2, "failure_window_s": 30})
    assert [text(ask(app, "claude")[1]) for _ in range(3)] == ["west 0", "west 1", "west 2"]
    assert len(upstream.chat_requests()) == 2
    assert request_logs(capsys)[-1]["fallbacks"] == [{"target": "primary",
                                                      "outcome": "cooling"}]


def test_failures_further_apart_than_the_window_or_with_an_answer_between_do_not_cool(
    upstream: FakeUpstream, west: FakeBedrock
) -> None:
    upstream.replies = [error_reply(500, "one"), error_reply(500, "two"),
                        UpstreamReply(body=[text_stream("primary")]), error_reply(500, "three"),
                        UpstreamReply(body=[text_stream("primary again")])]
    west.replies = [Reply(frames=text_events("west")) for _ in range(3)]
    app = app_for({"claude": [openai(upstream, "primary"), bedrock(west, "west")]},
                  doc={"failures_to_cool": 2, "failure_window_s": 0.3})
    assert text(ask(app, "claude")[1]) == "west"
    time.sleep(0.4)  # the first failure leaves the window
    assert text(ask(app, "claude")[1]) == "west"
    assert text(ask(app, "claude")[1]) == "primary"  # an answer: the count starts again
    assert text(ask(app, "claude")[1]) == "west"
    assert text(ask(app, "claude")[1]) == "primary again"
    assert len(upstream.chat_requests()) == 5


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("evidence", ["throttled", "unavailable", "credentials-refused",
                                      "refused-upstream", "refused-bedrock"])
def test_evidence_that_the_backend_is_unwell_cools_it_at_once(
    evidence: str, upstream: FakeUpstream, west: FakeBedrock,
    capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a primary whose one failure speaks of the backend itself, not of the request
    primary = {"throttled": lambda: openai(upstream, "primary"),
               "unavailable": lambda: openai(upstream, "primary"),
               "credentials-refused": lambda: openai(upstream, "primary"),
               "refused-upstream": lambda: {**openai(upstream, "primary"),
                                            "base_url": f"http://127.0.0.1:{_dead_port()}/v1"},
               "refused-bedrock": lambda: {**bedrock(west, "primary"),
                                           "endpoint_url": f"http://127.0.0.1:{_dead_port()}"},
               }[evidence]()
    upstream.replies = {"throttled": [error_reply(429, "slow down")],
                        "unavailable": [error_reply(503, "overloaded")],
                        "credentials-refused": [error_reply(401, "bad key")]}.get(evidence, [])
    west.replies = [Reply(frames=text_events("west 1")), Reply(frames=text_events("west 2"))]
    app = app_for({"claude": [primary, bedrock(west, "west")]})
    # WHEN two requests come, THEN the first fails over and the second skips the primary
    assert [text(ask(app, "claude")[1]) for _ in range(2)] == ["west 1", "west 2"]
    assert request_logs(capsys)[-1]["fallbacks"] == [{"target": "primary",
                                                      "outcome": "cooling"}]


def test_a_client_error_never_cools_a_target(east: FakeBedrock, west: FakeBedrock) -> None:
    # GIVEN a route that falls back on client errors, and a first target that finds three
    # requests too long for it
    too_long = Reply(400, "ValidationException", "Input is too long for requested model")
    east.replies = [too_long, too_long, too_long]
    west.replies = [Reply(frames=text_events("bigger model")) for _ in range(3)]
    app = app_for({"claude": {"targets": [bedrock(east, "east"), bedrock(west, "west")],
                              "fallback_on_client_errors": True}})
    # WHEN they come, THEN each is tried on east first: a request's fault is not east's
    assert [text(ask(app, "claude")[1]) for _ in range(3)] == ["bigger model"] * 3
    assert len(east.requests) == 3


# -- error paths: every target cooling, the deadline between targets, STS refusing the role ---

def test_when_every_target_cools_all_are_tried_and_an_answer_ends_its_cooldown(
    east: FakeBedrock, west: FakeBedrock, capsys: pytest.CaptureFixture[str]
) -> None:
    east.replies = [Reply(429, "ThrottlingException", "a"), Reply(frames=text_events("east back")),
                    Reply(frames=text_events("east still"))]
    west.replies = [Reply(429, "ThrottlingException", "b")]
    app = app_for({"claude": [bedrock(east, "east"), bedrock(west, "west")]})
    # GIVEN both targets cooling after one throttled request
    assert ask(app, "claude")[0].status == 429
    # WHEN the next request comes, THEN both are tried rather than none, and east answers
    response, chunks = ask(app, "claude")
    assert text(chunks) == "east back" and response.headers["x-streamgate-backend"] == "east"
    # AND east's answer ended its cooldown; west still cools
    assert text(ask(app, "claude")[1]) == "east still"
    assert request_logs(capsys)[-1]["fallbacks"] == [{"target": "west", "outcome": "cooling"}]
    assert len(west.requests) == 1


def test_the_deadline_passing_between_two_targets_ends_the_request_with_a_504(
    upstream: FakeUpstream, west: FakeBedrock
) -> None:
    # GIVEN a first target whose 500 takes past the request's deadline to arrive whole
    upstream.replies = [UpstreamReply(500, [1.0, b'{"error": {"message": "late"}}'],
                                      {"content-type": "application/json"})]
    west.replies = [Reply(frames=text_events("too late for this"))]
    app = app_for({"claude": [openai(upstream), bedrock(west, "west")]})
    # WHEN the request's deadline passes while that failure comes in
    started = time.monotonic()
    response = app.handle(chat_event({"model": "claude", "prompt": "hi"}, headers=JSON),
                          deadline=Deadline.after(0.4))
    doc = json.loads(body_bytes(response))
    response.close()
    # THEN the request ends there, with deadline_exceeded: the next target is never asked
    assert (response.status, doc["error"]["code"]) == (504, "deadline_exceeded")
    assert west.requests == []
    assert time.monotonic() - started < 0.9


def test_sts_refusing_a_targets_role_fails_over_and_cools_that_target(
    east: FakeBedrock, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from moto import mock_aws
    from moto.core import set_initial_no_auth_action_count

    # GIVEN a function identity that may not assume the partner account's role (moto checks
    # IAM: the two calls that create the identity are the only ones it lets through)
    @mock_aws
    @set_initial_no_auth_action_count(2)
    def scenario() -> None:
        import boto3

        # (a session of its own: the default one, which the function uses, must read the
        # identity's key from the environment)
        iam = boto3.session.Session(region_name="us-east-1").client("iam")
        iam.create_user(UserName="streamgate-function")
        key = iam.create_access_key(UserName="streamgate-function")["AccessKey"]
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        east.replies = [Reply(frames=text_events("own account 1")),
                        Reply(frames=text_events("own account 2"))]
        partner = bedrock(east, "partner", role_arn="arn:aws:iam::222222222222:role/x")
        app = app_for({"claude": [partner, bedrock(east, "own", region="us-west-2")]})
        # WHEN two requests come, THEN both are answered by the next target
        assert [text(ask(app, "claude")[1]) for _ in range(2)] == ["own account 1",
                                                                   "own account 2"]

    scenario()
    first, second = request_logs(capsys)[-2:]
    # (STS's AccessDenied is a refusal of our identity, as Bedrock's AccessDeniedException)
    assert first["fallbacks"] == [{"target": "partner", "outcome": "permission_denied"}]
    # AND the refused role cooled its target at once: STS would refuse every request
    assert second["fallbacks"] == [{"target": "partner", "outcome": "cooling"}]
