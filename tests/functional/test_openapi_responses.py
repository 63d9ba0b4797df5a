"""openapi.yaml's Responses API operations against the dev server: schemathesis's generated
requests (never a 5xx, only documented statuses, content types and bodies, schema-invalid
requests refused), and every event stream read event by event against the document's
`ResponseEvent` rules."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

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

from streamgate.errors import RateLimitError, UpstreamError
from streamgate.keystore import load_template
from streamgate.providers import Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from streamgate.validation import CAP_TOOLS
from tests.conftest import running_dev_server
from tests.functional.test_openapi import DOCUMENT
from tests.helpers import ScriptedProvider, Step, default_script, make_app

SCHEMA = schemathesis.openapi.from_path(DOCUMENT)
_COMPONENTS = load_template(DOCUMENT)["components"]
_EVENT = _COMPONENTS["schemas"]["ResponseEvent"]
_PAYLOAD = jsonschema_rs.Draft202012Validator(
    {"components": _COMPONENTS, **_EVENT["properties"]["data"]["contentSchema"]})
_NAMES = frozenset(_EVENT["properties"]["event"]["enum"])
_TERMINAL = ("response.completed", "response.incomplete", "response.failed")
# One event exactly as the document frames it: an event line, one data line, a blank line.
_FRAME = re.compile(r"event: ([^\r\n]*)\ndata: ([^\r\n]*)\n\n")


def response_stream_problems(status: int, body: bytes, *, complete: bool = True) -> list[str]:
    """What in a Responses event stream breaks openapi.yaml's `ResponseEvent` rules."""
    if status != 200:
        return [f"a {status} answer as an event stream (errors are JSON)"]
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return [f"not UTF-8: {e}"]
    events: list[tuple[str, Any]] = []
    position = 0
    while position < len(text):
        match = _FRAME.match(text, position)
        if match is None:
            return [f"character {position}: not an `event:`/`data:` event: "
                    f"{text[position:position + 80]!r}"]
        try:
            events.append((match.group(1), json.loads(match.group(2))))
        except ValueError:
            return [f"event {len(events)}: its data is not JSON"]
        position = match.end()
    problems: list[str] = []
    for i, (name, doc) in enumerate(events):
        if name not in _NAMES:
            problems.append(f"event {i}: {name!r} is not a documented event")
        problems += [f"event {i} ({name}) at /{'/'.join(map(str, e.instance_path))}: "
                     f"{e.message}" for e in _PAYLOAD.iter_errors(doc)]
        if isinstance(doc, dict):
            if doc.get("type") != name:
                problems.append(f"event {i}: named {name!r} but its type is {doc.get('type')!r}")
            if doc.get("sequence_number") != i:
                problems.append(f"event {i}: sequence_number {doc.get('sequence_number')!r}")
    names = [name for name, _ in events]
    if names[:2] != ["response.created", "response.in_progress"]:
        problems.append(f"the stream starts with {names[:2]}")
    terminal = [i for i, name in enumerate(names) if name in _TERMINAL]
    if complete and terminal != [len(names) - 1]:
        problems.append(f"terminal events at {terminal}: exactly one, the last, expected")
    elif not complete and terminal not in ([], [len(names) - 1]):
        problems.append(f"terminal events at {terminal}")
    return problems


def response_stream_conformance(ctx: object, response: schemathesis.Response,
                                case: schemathesis.Case) -> bool | None:
    content_type = (response.headers.get("content-type") or [""])[0]
    if content_type.split(";")[0].strip().lower() != "text/event-stream":
        return None
    problems = response_stream_problems(response.status_code, response.content,
                                        complete=not response.stream_cut_short)
    if problems:
        raise AssertionError("The event stream breaks openapi.yaml's ResponseEvent rules:\n"
                             + "\n".join(problems))
    return True


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection,
          response_stream_conformance]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = make_app(ScriptedProvider(models=["scripted-1", "gemma-3-270m"]), metrics=False)
    with running_dev_server(app, max_streams=64) as url:
        yield url


@SCHEMA.include(path_regex="^/v1/responses").parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_responses_api_conforms_to_its_openapi_document(case: schemathesis.Case,
                                                            base_url: str) -> None:
    case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)


_CALLS: list[Step] = [
    ReasoningDelta("Think."), ToolCallDelta(0, '{"city":', id="call_1", name="get_weather"),
    ToolCallDelta(1, "{}", id="call_2", name="now"), ToolCallDelta(0, '"Paris"}'),
    Finish("tool_calls"), Usage(12, 9)]


@pytest.mark.parametrize(
    ("script", "status"),
    [(default_script(), 200), (_CALLS, 200), ([TextDelta("x"), Finish("length")], 200),
     ([TextDelta("x"), Finish("content_filter")], 200),
     ([TextDelta("Hel"), UpstreamError("The model stream broke")], 200),
     ([Finish("stop"), Usage(3, 0)], 200),
     ([RateLimitError("Slow down", retry_after=2)], 429)],
    ids=["text", "reasoning-and-interleaved-calls", "length", "content-filter",
         "error-mid-stream", "no-output", "error-before-first-byte"])
def test_every_kind_of_responses_stream_meets_the_document(script: list[Step],
                                                           status: int) -> None:
    # GIVEN the dev server answering with this script
    tools = [{"type": "function", "name": "get_weather"}, {"type": "function", "name": "now"}]
    app = make_app(ScriptedProvider(script, capabilities=frozenset({CAP_TOOLS})), metrics=False)
    with running_dev_server(app) as url:
        # WHEN a client streams a response
        answer = requests.post(f"{url}/v1/responses", timeout=30, json={
            "input": "hi", "stream": True, "store": False, "tools": tools})
    # THEN the status is as scripted and a stream keeps every documented rule
    assert answer.status_code == status
    if status == 200:
        assert response_stream_problems(200, answer.content) == []
    else:
        assert answer.headers["content-type"] == "application/json"
        assert answer.json()["error"]["code"] == "rate_limit_exceeded"


def _stream(*events: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(f"event: {n}\ndata: {json.dumps(d)}\n\n".encode() for n, d in events)


_RESPONSE = {"id": "resp_1", "object": "response", "created_at": 1, "status": "completed",
             "model": "m", "output": [], "parallel_tool_calls": True, "tool_choice": "auto",
             "tools": []}
_START = (("response.created", {"type": "response.created", "sequence_number": 0,
                                "response": {**_RESPONSE, "status": "in_progress"}}),
          ("response.in_progress", {"type": "response.in_progress", "sequence_number": 1,
                                    "response": {**_RESPONSE, "status": "in_progress"}}))
_DONE = ("response.completed", {"type": "response.completed", "sequence_number": 2,
                                "response": _RESPONSE})


@pytest.mark.parametrize("body", [
    _stream(*_START),  # no terminal event
    _stream(_START[0], _DONE),  # no in_progress
    _stream(*_START, ("response.completed", {**_DONE[1], "sequence_number": 5})),
    _stream(*_START, ("response.done", {**_DONE[1], "type": "response.done"})),
    _stream(*_START, ("response.completed", {**_DONE[1], "type": "response.failed"})),
    _stream(*_START, _DONE, ("response.completed", {**_DONE[1], "sequence_number": 3})),
    _stream(*_START, ("response.completed", {**_DONE[1], "response": {"id": "x"}})),
    _stream(*_START, _DONE).replace(b"\n\n", b"\r\n\r\n", 1),
    b"data: " + json.dumps(_DONE[1]).encode() + b"\n\n",
], ids=["no-terminal", "no-in-progress", "sequence-gap", "unknown-event", "name-type-differ",
        "events-after-terminal", "bad-response", "crlf", "no-event-line"])
def test_the_stream_check_fails_on_malformed_streams(body: bytes) -> None:
    assert response_stream_problems(200, body) != []


def test_a_well_formed_stream_passes_the_check() -> None:
    assert response_stream_problems(200, _stream(*_START, _DONE)) == []
