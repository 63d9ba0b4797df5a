"""openapi.yaml's Anthropic Messages operations against the dev server: schemathesis's
generated requests (never a 5xx, only documented statuses, content types and bodies,
schema-invalid requests refused), and every event stream read event by event against the
document's `MessagesEvent` rules."""

from __future__ import annotations

from collections.abc import Iterator

import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from streamgate.errors import UpstreamError
from streamgate.keystore import load_template
from streamgate.providers import Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from streamgate.validation import CAP_TOOLS
from tests.conftest import running_dev_server
from tests.functional.test_openapi import DOCUMENT
from tests.helpers import ScriptedProvider, Step, default_script, make_app, named_events

SCHEMA = schemathesis.openapi.from_path(DOCUMENT)
_COMPONENTS = load_template(DOCUMENT)["components"]
_EVENT = _COMPONENTS["schemas"]["MessagesEvent"]
_PAYLOAD = jsonschema_rs.Draft202012Validator(
    {"components": _COMPONENTS, **_EVENT["properties"]["data"]["contentSchema"]})
_ERROR = jsonschema_rs.Draft202012Validator(
    {"components": _COMPONENTS, "$ref": "#/components/schemas/AnthropicError"})


def messages_stream_problems(status: int, body: bytes, *, complete: bool = True) -> list[str]:
    """What in a Messages event stream breaks openapi.yaml's `MessagesEvent` rules."""
    if status != 200:
        return [f"a {status} answer as an event stream (errors are JSON)"]
    events, broken = named_events(body)
    if broken is not None:
        return [broken]
    problems: list[str] = []
    for i, (name, doc) in enumerate(events):
        problems += [f"event {i} ({name}) at /{'/'.join(map(str, e.instance_path))}: "
                     f"{e.message}" for e in _PAYLOAD.iter_errors(doc)]
        if isinstance(doc, dict) and doc.get("type") != name:
            problems.append(f"event {i}: named {name!r} but its type is {doc.get('type')!r}")
        if name == "error":
            problems += [f"event {i}: {e.message}" for e in _ERROR.iter_errors(doc)]
    names = [name for name, _ in events]
    if names[:1] != ["message_start"]:
        problems.append(f"the stream starts with {names[:1]}")
    ends = [i for i, name in enumerate(names) if name in ("message_stop", "error")]
    if complete and ends != [len(names) - 1]:
        problems.append(f"message_stop/error at {ends}: exactly one, the last, expected")
    return problems


def messages_stream_conformance(ctx: object, response: schemathesis.Response,
                                case: schemathesis.Case) -> bool | None:
    content_type = (response.headers.get("content-type") or [""])[0]
    if content_type.split(";")[0].strip().lower() != "text/event-stream":
        return None
    problems = messages_stream_problems(response.status_code, response.content,
                                        complete=not response.stream_cut_short)
    if problems:
        raise AssertionError("The event stream breaks openapi.yaml's MessagesEvent rules:\n"
                             + "\n".join(problems))
    return True


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection,
          messages_stream_conformance]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = make_app(ScriptedProvider(models=["claude-scripted", "gemma-3-270m"]), metrics=False)
    with running_dev_server(app, max_streams=64) as url:
        yield url


@SCHEMA.include(path_regex="^/v1/messages").parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_messages_api_conforms_to_its_openapi_document(case: schemathesis.Case,
                                                           base_url: str) -> None:
    case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)


@pytest.mark.parametrize("script", [
    default_script(),
    [ReasoningDelta("Think."), ToolCallDelta(0, '{"city":"Paris"}', id="toolu_1",
                                             name="get_weather"), Finish("tool_calls"),
     Usage(12, 9)],
    [TextDelta("x"), Finish("length")],
    [TextDelta("Hel"), UpstreamError("The model stream broke")],
], ids=["text", "thinking-and-tool-use", "max-tokens", "error-mid-stream"])
def test_every_kind_of_messages_stream_meets_the_document(script: list[Step]) -> None:
    app = make_app(ScriptedProvider(script, capabilities=frozenset({CAP_TOOLS})), metrics=False)
    with running_dev_server(app) as url:
        answer = requests.post(f"{url}/v1/messages", timeout=30, json={
            "model": "scripted-1", "max_tokens": 64, "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}]})
    assert answer.status_code == 200
    assert messages_stream_problems(200, answer.content) == []


@pytest.mark.parametrize("body", [
    b'event: ping\ndata: {"type": "ping"}\n\n',  # no message_start
    b'event: message_start\ndata: {"type": "message_start"}\n\n',  # never ends
    b'event: message_start\ndata: {"type": "message_start"}\n\n'
    b'event: message_stop\ndata: {"type": "ping"}\n\n',  # name and type differ
    b'event: message_start\ndata: {"type": "message_start"}\n\n'
    b'event: error\ndata: {"type": "error", "error": {"type": "nope"}}\n\n',
    b'data: {"type": "message_start"}\n\n',
], ids=["no-start", "no-end", "name-type-differ", "bad-error", "no-event-line"])
def test_the_stream_check_fails_on_malformed_streams(body: bytes) -> None:
    assert messages_stream_problems(200, body) != []
