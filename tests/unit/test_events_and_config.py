"""Event adapter (Function URL v2, REST v1) and settings."""

from __future__ import annotations

import base64

import pytest

from streamgate.config import load_settings
from streamgate.errors import ConfigError, RequestError
from streamgate.events import parse_event
from tests.helpers import load_event


def test_function_url_event_becomes_a_request() -> None:
    request = parse_event(load_event("function-url-chat-stream.json"))
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["content-type"] == "application/json"
    assert request.body is not None and b'"stream": true' in request.body
    assert request.request_id == "6f1c0e5a-0000-4000-8000-000000000001"


def test_base64_body_is_decoded() -> None:
    plain = parse_event(load_event("function-url-chat-stream.json")).body
    assert parse_event(load_event("function-url-chat-base64.json")).body == plain


def test_rest_api_event_becomes_a_request() -> None:
    request = parse_event(load_event("rest-api-prompt.json"))
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["content-type"] == "application/json"


def test_invalid_base64_is_a_400() -> None:
    event = load_event("function-url-chat-stream.json")
    event.update(body="not base64!!", isBase64Encoded=True)
    with pytest.raises(RequestError, match="Invalid JSON body"):
        parse_event(event)


def test_base64_of_invalid_utf8_survives_to_json_decoding() -> None:
    event = load_event("function-url-chat-stream.json")
    event.update(body=base64.b64encode(b"\xff\xfe").decode(), isBase64Encoded=True)
    assert parse_event(event).body == b"\xff\xfe"


def test_unknown_event_shape_is_a_400() -> None:
    with pytest.raises(RequestError, match="Unsupported event"):
        parse_event({"foo": "bar"})


def test_iam_identity_is_read_from_both_event_shapes() -> None:
    arn = "arn:aws:iam::123456789012:user/dev"
    url_event = load_event("function-url-chat-stream.json")
    assert parse_event(url_event).principal == ""
    url_event["requestContext"]["authorizer"] = {"iam": {"userArn": arn, "accessKey": "AKIA"}}
    assert parse_event(url_event).principal == arn
    rest_event = load_event("rest-api-prompt.json")
    assert parse_event(rest_event).principal == ""
    rest_event["requestContext"]["identity"] = {"userArn": arn, "sourceIp": "1.2.3.4"}
    assert parse_event(rest_event).principal == arn


def test_auth_settings() -> None:
    assert load_settings({}).auth == "none"
    settings = load_settings({"STREAMGATE_AUTH": "api_key", "STREAMGATE_KEYS_TABLE": "t",
                              "STREAMGATE_ALLOW_UNAUTHENTICATED": "TRUE"})
    assert (settings.auth, settings.keys_table, settings.allow_unauthenticated) == (
        "api_key", "t", True)
    assert load_settings({"STREAMGATE_ALLOW_UNAUTHENTICATED": "false"}).allow_unauthenticated \
        is False


def test_settings_precedence_argument_env_default() -> None:
    assert load_settings({}).provider == "bedrock"
    assert load_settings({}, defaults={"STREAMGATE_PROVIDER": "local"}).provider == "local"
    env = {"STREAMGATE_PROVIDER": "openai"}
    assert load_settings(env, defaults={"STREAMGATE_PROVIDER": "local"}).provider == "openai"
    assert load_settings(env, provider="local").provider == "local"


def test_a_cap_under_the_default_max_tokens_lowers_the_default_with_it() -> None:
    # a cap alone is enough (Claude Code's embedded set-up sets 300); an explicit default over
    # the cap is still refused below
    capped = load_settings({"STREAMGATE_MAX_TOKENS_CAP": "300"})
    assert (capped.default_max_tokens, capped.max_tokens_cap) == (300, 300)
    assert load_settings({"STREAMGATE_MAX_TOKENS_CAP": "8000"}).default_max_tokens == 1024
    with pytest.raises(ConfigError, match="must not exceed"):
        load_settings({"STREAMGATE_MAX_TOKENS_CAP": "300", "STREAMGATE_DEFAULT_MAX_TOKENS": "500"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"STREAMGATE_PROVIDER": "gpt"}, "STREAMGATE_PROVIDER must be one of"),
        ({"STREAMGATE_MAX_BODY_BYTES": "lots"}, "STREAMGATE_MAX_BODY_BYTES must be int"),
        ({"STREAMGATE_MAX_PROMPT_CHARS": "-1"}, "must not be negative"),
        ({"STREAMGATE_DEFAULT_MAX_TOKENS": "9000"}, "must not exceed"),
        ({"STREAMGATE_BEDROCK_MAX_ATTEMPTS": "0"}, "MAX_ATTEMPTS must be at least 1"),
        ({"STREAMGATE_BEDROCK_IDLE_TIMEOUT_S": "soon"}, "IDLE_TIMEOUT_S must be float"),
        ({"STREAMGATE_AUTH": "basic"}, "STREAMGATE_AUTH must be one of api_key, iam, none"),
        ({"STREAMGATE_AUTH": "api_key"}, "needs STREAMGATE_KEYS_TABLE"),
        ({"STREAMGATE_ALLOW_UNAUTHENTICATED": "sure"}, "must be bool"),
    ],
)
def test_bad_configuration_is_a_clear_config_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env)
