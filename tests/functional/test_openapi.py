"""openapi.yaml, the API document we ship, against the real dev server: schemathesis generates
valid and invalid requests from it and checks every answer (never a 5xx, only documented
statuses, content types, headers and bodies, invalid data refused). Every streamed answer is
also read event by event against the document's `Event` rules (framing, order, and each JSON
payload against its `ChatCompletionChunk` / `Error` schema). Other tests keep the document's
routes and request bounds equal to the handler's."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from streamgate import devserver
from streamgate.config import load_settings
from streamgate.errors import RateLimitError, UpstreamError
from streamgate.handler import dialects, routes
from streamgate.keystore import load_template
from streamgate.providers import Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from streamgate.validation import (
    CAP_IMAGES,
    CAP_JSON_OBJECT,
    CAP_JSON_SCHEMA,
    CAP_PENALTIES,
    CAP_SEED,
    CAP_SEQUENTIAL_TOOLS,
    CAP_TOOLS,
)
from tests.conftest import running_dev_server
from tests.helpers import (
    ScriptedProvider,
    Step,
    body_bytes,
    chat_event,
    default_script,
    make_app,
)

DOCUMENT = Path(__file__).resolve().parents[2] / "openapi.yaml"
SCHEMA = schemathesis.openapi.from_path(DOCUMENT)
CHAT = SCHEMA["/v1/chat/completions"]["POST"]

# The payload schemas, straight from the document. jsonschema_rs is the validator schemathesis
# itself depends on (the `jsonschema` package is here only through moto[server]).
_COMPONENTS = load_template(DOCUMENT)["components"]


def _validator(name: str) -> jsonschema_rs.Validator:
    return jsonschema_rs.Draft202012Validator(
        {"components": _COMPONENTS, "$ref": f"#/components/schemas/{name}"})


# An event's JSON is one or the other (the document's `oneOf`; they exclude each other). Picking
# by the `error` key lets a failure name the field at fault rather than "no branch matched".
_CHUNK_SCHEMA = _validator("ChatCompletionChunk")
_ERROR_SCHEMA = _validator("Error")
# One event exactly as the document frames it: `data: `, a payload with no line break, a blank
# line. Any other field, a comment, a CR or a missing blank line does not match.
_EVENT = re.compile(r"data: ([^\r\n]*)\n\n")


def event_stream_problems(status: int, body: bytes, *, complete: bool = True) -> list[str]:
    """What in a text/event-stream answer breaks openapi.yaml's `Event` / `ErrorEvent` rules
    (empty when nothing does). ``complete`` is false when the reader stopped early: the stream
    then need not end yet."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return [f"not UTF-8: {e}"]
    payloads: list[str] = []
    position = 0
    while position < len(text):
        match = _EVENT.match(text, position)
        if match is None:
            return [f"character {position}: not a `data: <payload>\\n\\n` event: "
                    f"{text[position:position + 80]!r}"]
        payloads.append(match.group(1))
        position = match.end()
    if not payloads:
        return ["no event at all"]
    problems: list[str] = []
    chunks: list[dict[str, Any]] = []
    ended = False  # by [DONE] or an error event
    for i, payload in enumerate(payloads):
        last = i == len(payloads) - 1
        if payload == "[DONE]":
            ended = last
            if not last:
                problems.append(f"event {i}: [DONE] is not the last event")
            if status != 200:
                problems.append(f"event {i}: [DONE] in a {status} answer")
            continue
        try:
            doc = json.loads(payload)
        except ValueError:
            problems.append(f"event {i}: not JSON nor [DONE]: {payload[:80]!r}")
            continue
        is_error = isinstance(doc, dict) and "error" in doc
        errors = [f"event {i}: {'Error' if is_error else 'ChatCompletionChunk'} at "
                  f"/{'/'.join(map(str, e.instance_path))}: {e.message}"
                  for e in (_ERROR_SCHEMA if is_error else _CHUNK_SCHEMA).iter_errors(doc)]
        if errors:
            problems += errors
        elif is_error:
            ended = last
            if not last:
                problems.append(f"event {i}: events follow an error event")
        elif status != 200:
            problems.append(f"event {i}: a chunk in a {status} answer")
        else:
            chunks.append(doc)
    if status != 200 and len(payloads) != 1:
        problems.append(f"a {status} answer is one error event, not {len(payloads)} events")
    if complete and not ended:
        problems.append("the stream ends with neither [DONE] nor an error event")
    return problems + _chunk_order_problems(chunks, done=payloads[-1] == "[DONE]")


def _chunk_order_problems(chunks: list[dict[str, Any]], *, done: bool) -> list[str]:
    """The rules that span chunks (DESIGN.md, "The OpenAI wire format we must match")."""
    problems: list[str] = []
    if len({(c["id"], c["created"], c["model"]) for c in chunks}) > 1:
        problems.append("id, created and model differ between chunks")
    if len({"usage" in c for c in chunks}) > 1:
        problems.append("some chunks carry `usage` and others do not")
    with_choice = [c["choices"][0] for c in chunks if c["choices"]]
    roles = [i for i, choice in enumerate(with_choice) if "role" in choice["delta"]]
    if with_choice and roles != [0]:
        problems.append(f"the role is on choice chunks {roles}, not on the first only")
    finishes = [i for i, choice in enumerate(with_choice) if choice["finish_reason"] is not None]
    if finishes not in ([], [len(with_choice) - 1]):
        problems.append(f"finish reasons on choice chunks {finishes}, not on the last only")
    if done and not finishes:
        problems.append("[DONE] without a finish reason")
    usage = [i for i, c in enumerate(chunks) if not c["choices"]]
    if usage not in ([], [len(chunks) - 1]):
        problems.append(f"usage chunks at {usage}: one, after the last choice chunk, expected")
    return problems


def event_stream_conformance(ctx: object, response: schemathesis.Response,
                             case: schemathesis.Case) -> bool | None:
    """A schemathesis check: every text/event-stream answer, read event by event."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if content_type.split(";")[0].strip().lower() != "text/event-stream":
        return None
    problems = event_stream_problems(response.status_code, response.content,
                                     complete=not response.stream_cut_short)
    if problems:
        raise AssertionError("The event stream breaks openapi.yaml's Event rules:\n"
                             + "\n".join(problems))
    return True


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection,
          event_stream_conformance]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = make_app(ScriptedProvider(models=["scripted-1", "gemma-3-270m"]), metrics=False)
    with running_dev_server(app, max_streams=64) as url:
        yield url


# The Responses and Messages APIs have their own stream rules: tests/functional/
# test_openapi_responses.py and test_openapi_messages.py.
@SCHEMA.exclude(path_regex="^/v1/(responses|messages)").parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_service_conforms_to_its_openapi_document(case: schemathesis.Case,
                                                      base_url: str) -> None:
    case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)


# Every kind of stream the handler writes, through the dev server: the document must describe
# them all (the generated cases above only meet the default script's text stream, and only
# because the document's request examples include streamed ones).
_TOOL_CALLS: list[Step] = [
    ToolCallDelta(0, "", id="call_1", name="get_weather"), ToolCallDelta(0, '{"city":'),
    ToolCallDelta(0, '"Paris"}'), ToolCallDelta(1, "{}", id="call_2", name="now"),
    Finish("tool_calls"), Usage(12, 9)]
_REASONING: list[Step] = [
    ReasoningDelta("Think"), ReasoningDelta("ing."), TextDelta("Hi"), Finish("stop"),
    Usage(30, 3, cached_tokens=20, cache_write_tokens=8)]


@pytest.mark.parametrize(
    ("script", "include_usage", "status"),
    [(default_script(), False, 200), (default_script(), True, 200), (_REASONING, True, 200),
     (_TOOL_CALLS, True, 200), ([Finish("length"), Usage(4, 0)], True, 200),
     ([TextDelta("x"), Finish("content_filter")], False, 200),
     ([TextDelta("Hel"), UpstreamError("The model stream broke")], True, 200),
     ([TextDelta("Hel"), Finish("stop")], False, 200),
     ([RateLimitError("Slow down", retry_after=2)], False, 429)],
    ids=["text", "text-usage", "reasoning-cache-usage", "tool-calls", "finish-only",
         "content-filter", "error-mid-stream", "no-usage-reported", "error-before-first-byte"],
)
def test_every_kind_of_stream_the_service_writes_meets_the_document(
        script: list[Step], include_usage: bool, status: int) -> None:
    # GIVEN the dev server answering with this script
    app = make_app(ScriptedProvider(script), metrics=False)
    case = CHAT.Case(body={"prompt": "hi", "stream": True,
                           "stream_options": {"include_usage": include_usage}},
                     media_type="application/json")
    with running_dev_server(app) as url:
        # WHEN schemathesis reads the stream, THEN every check passes, the event check included
        response = case.call_and_validate(base_url=url, checks=CHECKS, timeout=30)
    assert response.status_code == status
    assert response.headers["content-type"] == ["text/event-stream"]
    assert not response.stream_cut_short


def _event(doc: object) -> bytes:
    return b"data: " + json.dumps(doc).encode() + b"\n\n"


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None,
           **fields: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": "lo"} if delta is None else delta,
              "logprobs": None, "finish_reason": finish}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
            "model": "scripted-1", "choices": [choice], **fields}


_ROLE = _chunk({"role": "assistant", "content": "Hel"})
_STOP = _chunk({}, "stop")
_DONE = b"data: [DONE]\n\n"
_ERROR = {"error": {"message": "Upstream failed", "type": "upstream_error", "param": None,
                    "code": "upstream_error"}}
_GOOD = _event(_ROLE) + _event(_chunk()) + _event(_STOP) + _DONE
_USAGE = _chunk(usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
_USAGE["choices"] = []
# status, body, what the check must say; those marked per-event break one event's schema, which
# openapi.yaml itself states (schemathesis's own response check must refuse them too).
MALFORMED: dict[str, tuple[int, bytes, str, bool]] = {
    "chunk-without-choices": (200, _event(_ROLE) + _event({
        k: v for k, v in _STOP.items() if k != "choices"}) + _DONE,
        '"choices" is a required property', True),
    "finish-reason-eos": (200, _event(_ROLE) + _event(_chunk({}, "eos")) + _DONE,
                          "/choices/0/finish_reason", True),
    "logprobs-not-null": (200, _event(_ROLE) + _event(_STOP | {"choices": [
        {"index": 0, "delta": {}, "logprobs": {"content": []}, "finish_reason": "stop"}]})
        + _DONE, "/choices/0/logprobs", True),
    "unknown-chunk-field": (200, _event(_ROLE) + _event(_chunk(
        {}, "stop", system_fingerprint="fp")) + _DONE, "system_fingerprint", True),
    "role-not-assistant": (200, _event(_chunk({"role": "user", "content": "x"}, "stop"))
                           + _DONE, "/choices/0/delta/role", True),
    "tool-call-id-without-type": (200, _event(_chunk({"role": "assistant", "tool_calls": [
        {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}}]}))
        + _event(_chunk({}, "tool_calls")) + _DONE, "/choices/0/delta/tool_calls/0", True),
    "usage-chunk-with-a-choice": (200, _event(_ROLE | {"usage": None}) + _event(
        _chunk({}, "stop", usage=_USAGE["usage"])) + _DONE, "/choices", True),
    "error-without-param": (200, _event(_ROLE) + _event({"error": {
        "message": "x", "type": "upstream_error", "code": None}}),
        '"param" is a required property', True),
    "not-json": (200, b"data: Hello\n\n" + _DONE, "not JSON nor [DONE]", True),
    "event-field": (200, b"event: chunk\n" + _GOOD, "not a `data: <payload>", True),
    "text-after-done": (200, _GOOD + _event(_chunk()), "[DONE] is not the last event", False),
    "junk-after-done": (200, _GOOD + b"Hello", "not a `data: <payload>", False),
    "done-twice": (200, _GOOD + _DONE, "[DONE] is not the last event", False),
    "event-after-error": (200, _event(_ROLE) + _event(_ERROR) + _event(_STOP),
                          "events follow an error event", False),
    "done-after-error": (200, _event(_ROLE) + _event(_ERROR) + _DONE,
                         "events follow an error event", False),
    "no-space-after-colon": (200, _GOOD.replace(b"data: ", b"data:"),
                             "not a `data: <payload>", False),
    "crlf": (200, _GOOD.replace(b"\n", b"\r\n"), "not a `data: <payload>", False),
    "no-blank-line-at-the-end": (200, _GOOD[:-1], "not a `data: <payload>", False),
    "comment": (200, b": keep-alive\n\n" + _GOOD, "not a `data: <payload>", False),
    "ends-without-done": (200, _event(_ROLE) + _event(_STOP),
                          "ends with neither [DONE] nor an error event", False),
    "id-changes": (200, _event(_ROLE) + _event(_STOP | {"id": "chatcmpl-2"}) + _DONE,
                   "id, created and model differ", False),
    "role-twice": (200, _event(_ROLE) + _event(_ROLE) + _event(_STOP) + _DONE,
                   "the role is on choice chunks [0, 1]", False),
    "no-role": (200, _event(_chunk()) + _event(_STOP) + _DONE, "the role is on choice chunks []",
                False),
    "finish-before-the-last-chunk": (200, _event(_chunk({"role": "assistant"}, "stop"))
                                     + _event(_chunk()) + _DONE,
                                     "finish reasons on choice chunks [0]", False),
    "done-without-finish": (200, _event(_ROLE) + _DONE, "[DONE] without a finish reason", False),
    "usage-before-finish": (200, _event(_ROLE | {"usage": None}) + _event(_USAGE)
                            + _event(_STOP | {"usage": None}) + _DONE, "usage chunks at [1]",
                            False),
    "usage-on-some-chunks": (200, _event(_ROLE) + _event(_STOP | {"usage": None}) + _DONE,
                             "some chunks carry `usage`", False),
    "chunk-in-an-error-answer": (400, _event(_ROLE), "a chunk in a 400 answer", False),
    "done-in-an-error-answer": (400, _event(_ERROR) + _DONE, "[DONE] in a 400 answer", False),
    "two-errors": (400, _event(_ERROR) + _event(_ERROR), "a 400 answer is one error event",
                   False),
    "empty": (200, b"", "no event at all", False),
    "not-utf8": (200, b"data: \xff\n\n", "not UTF-8", False),
}


def _answer(status: int, body: bytes) -> schemathesis.Response:
    """An SSE answer as schemathesis hands it to its checks."""
    request = requests.Request("POST", "http://127.0.0.1/v1/chat/completions",
                               json={"prompt": "hi", "stream": True}).prepare()
    return schemathesis.Response(
        status_code=status, headers={"content-type": ["text/event-stream"]}, content=body,
        request=request, elapsed=0.0, verify=True, message="", http_version="1.1",
        encoding="utf-8")


def test_the_event_stream_check_passes_a_well_formed_stream() -> None:
    stream = _event(_ROLE | {"usage": None}) + _event(_STOP | {"usage": None}) + _event(_USAGE)
    for status, body in [(200, _GOOD), (200, stream + _DONE), (200, _event(_ROLE) + _event(
            _ERROR)), (200, _event(_ERROR)), (400, _event(_ERROR))]:
        assert event_stream_problems(status, body) == [], body
        assert event_stream_conformance(None, _answer(status, body), CHAT.Case()) is True
        CHAT.Case().validate_response(_answer(status, body), checks=[response_schema_conformance])


@pytest.mark.parametrize("name", MALFORMED)
def test_the_event_stream_check_refuses_a_malformed_stream(name: str) -> None:
    # GIVEN a stream broken in one way
    status, body, says, _ = MALFORMED[name]
    # WHEN the check reads it, THEN it fails and says why
    with pytest.raises(AssertionError, match=re.escape(says)):
        event_stream_conformance(None, _answer(status, body), CHAT.Case())


@pytest.mark.parametrize("name", [name for name, bad in MALFORMED.items() if bad[3]])
def test_the_document_alone_refuses_a_malformed_event(name: str) -> None:
    """schemathesis's own response check, with nothing but openapi.yaml's Event schema."""
    status, body, _, _ = MALFORMED[name]
    with pytest.raises(FailureGroup, match="SSE event"):
        CHAT.Case().validate_response(_answer(status, body), checks=[response_schema_conformance])


def test_the_document_lists_exactly_the_handlers_routes() -> None:
    paths = load_template(DOCUMENT)["paths"]
    served = routes(dialects(load_settings({})))
    documented = {path: tuple(sorted(m.upper() for m in ops if m != "parameters"))
                  for path, ops in paths.items()}
    assert documented == {path: tuple(sorted(methods)) for path, methods in served.items()}


# The capabilities that let every request field through to validation's own lines.
_EVERYTHING = frozenset({CAP_PENALTIES, CAP_SEED, CAP_TOOLS, CAP_IMAGES, CAP_SEQUENTIAL_TOOLS,
                         CAP_JSON_SCHEMA, CAP_JSON_OBJECT})
_USER = [{"role": "user", "content": "hi"}]
# One more item of an array property, for probing its documented length bounds.
_ITEM = {"messages": lambda i: {"role": "user", "content": "hi"},
         "tools": lambda i: {"type": "function", "function": {"name": f"tool_{i}"}},
         "stop": lambda i: f"s{i}", "functions": lambda i: {"name": f"f{i}"}}


def _handler_answer(body: object) -> tuple[int, object]:
    """The handler's status for a chat body, and the param its 400 names."""
    app = make_app(ScriptedProvider(capabilities=_EVERYTHING), metrics=False)
    response = app.handle(chat_event(body, headers={"accept": "application/json"}))
    raw = body_bytes(response)
    response.close()
    if response.status == 200:
        return 200, None
    return response.status, json.loads(raw)["error"]["param"]


def _variants(prop: dict[str, Any]) -> list[dict[str, Any]]:
    """A property's schema and each branch of its oneOf: where its bounds are."""
    return [prop, *prop.get("oneOf", [])]


def test_the_documented_request_bounds_are_the_enforced_ones() -> None:
    """Every bound, enum, type, length and pattern the document states for a request field is
    exactly where the service draws the line: the edge is accepted, one step past it is a 400
    naming the field."""
    status = _handler_answer
    base: dict[str, object] = {"messages": _USER}
    properties = _COMPONENTS["schemas"]["ChatRequest"]["properties"]
    checked = set()
    for name, prop in properties.items():
        if name in ("messages", "prompt"):  # the base of every probe; probed below
            continue
        types = prop.get("type", [])
        types = [types] if isinstance(types, str) else types
        if "null" in types or None in prop.get("enum", [None]):
            assert status({**base, name: None})[0] == 200, name
        step = 1 if "integer" in types else 0.001
        if "minimum" in prop:
            assert status({**base, name: prop["minimum"]})[0] == 200, name
            assert status({**base, name: prop["minimum"] - step}) == (400, name)
            checked.add(name)
        if "maximum" in prop:
            assert status({**base, name: prop["maximum"]})[0] == 200, name
            assert status({**base, name: prop["maximum"] + step}) == (400, name)
        for value in prop.get("enum", []):
            assert status({**base, name: value})[0] == 200, (name, value)
        if "enum" in prop:
            assert status({**base, name: "not-an-option"}) == (400, name)
            checked.add(name)
        if types and "string" not in types and "object" not in types:
            assert status({**base, name: "text"}) == (400, name), name  # wrong type
            checked.add(name)
        for variant in _variants(prop):
            if "maxItems" in variant:
                items = [_ITEM[name](i) for i in range(variant["maxItems"] + 1)]
                if items[:-1]:
                    assert status({**base, name: items[:-1]})[0] == 200, name
                assert status({**base, name: items}) == (400, name), name
                checked.add(name)
            if "minLength" in variant:
                assert status({**base, name: ""}) == (400, name), name
                checked.add(name)
            if "pattern" in variant and "string" in types:
                assert status({**base, name: " \t"}) == (400, name), name  # white space only
            if "const" in variant:
                assert status({**base, name: variant["const"]})[0] == 200, name
                assert status({**base, name: [*variant["const"], "audio"]}) == (400, name)
                checked.add(name)
        if prop.get("maxProperties") == 0:
            assert status({**base, name: {}})[0] == 200, name
            assert status({**base, name: {"50256": -100}}) == (400, name), name
            checked.add(name)
    messages = properties["messages"]
    assert status({"messages": _USER * messages["maxItems"]})[0] == 200
    assert status({"messages": _USER * (messages["maxItems"] + 1)}) == (400, "messages")
    assert status({"messages": []}) == (400, "messages")
    prompt = properties["prompt"]
    assert status({"prompt": "x" * prompt["maxLength"]})[0] == 200
    assert status({"prompt": "x" * (prompt["maxLength"] + 1)}) == (400, "prompt")
    assert status({"prompt": " \t\n"}) == (400, "prompt")
    assert {"temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "seed",
            "frequency_penalty", "presence_penalty", "stream", "logprobs", "tools", "stop",
            "model", "top_logprobs", "audio", "functions", "logit_bias", "modalities",
            "function_call"} <= checked, checked


# Refusals that no JSON Schema in the document can state (they span fields or look inside a
# value): the ChatRequest description lists each, and the document accepts these bodies.
_BEYOND_THE_SCHEMA = ("appears twice", "which is not in 'tools'", "disagree; send one",
                      "is not valid JSON", "must be a JSON object",
                      "exceeds the maximum of 100000 characters", "nests objects and arrays")
# Bodies validation refuses whose rules have no row in the unit tests' tables below.
_ALSO_REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"messages": None, "prompt": None}, "messages"),
    ({"messages": _USER, "tool_choice": "auto", "tools": []},
     "tool_choice"),
    ({"messages": _USER, "stream": False, "stream_options": {}}, "stream_options"),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "assistant"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0].text"),
    ({"messages": [{"role": "user", "content": [1]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": None, "function": {"name": "f", "arguments": ""}}]}]},
     "messages[0].tool_calls[0]"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": ""}]},
     "messages[0].tool_call_id"),
    ({"messages": _USER, "tools": [{"type": "function", "function": {
        "name": "f", "description": 5}}]}, "tools[0].function.description"),
    ({"messages": _USER, "audio": {"format": "wav"}}, "audio"),
    ({"messages": _USER, "prediction": {"type": "content"}}, "prediction"),
    ({"messages": _USER, "web_search_options": {}}, "web_search_options"),
    ({"messages": _USER, "modalities": ["text", "audio"]}, "modalities"),
    ({"messages": _USER, "function_call": "auto"}, "function_call"),
    ({"messages": _USER, "model": " "}, "model"),
]
# Edge cases both accept.
_ACCEPTED: list[dict[str, Any]] = [
    {"prompt": "hi", "messages": None},
    {"messages": [{"role": "assistant", "content": None, "tool_calls": []}, *_USER]},
    {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:IMAGE/PNG;base64,iVBORw0KGgo=",
                                            "detail": "auto"}}]}]},
    {"messages": _USER, "tool_choice": "none"},
    {"messages": _USER, "tools": [{"type": "function", "function": {
        "name": "f", "description": None, "parameters": None, "strict": None}}]},
    {"messages": _USER, "logprobs": False, "functions": [], "function_call": "none",
     "logit_bias": {}, "modalities": ["text"], "top_logprobs": None, "audio": None},
    {"messages": _USER, "stream": True, "stream_options": {"include_usage": None}},
    {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "function": {"name": "f", "arguments": ""}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "c"}]},
]


def _unit_table(test: Any) -> list[Any]:
    """The rows of a unit test's parametrize table (tests/unit/test_validation.py)."""
    [mark] = [m for m in test.pytestmark if m.name == "parametrize"]
    return list(mark.args[1])


def _refused_by_validation() -> list[tuple[Any, str, str]]:
    """(body, message, param) for every body the unit tests show validation refusing."""
    from tests.unit import test_validation as unit

    rows = [(data, message, param) for data, message, param in
            _unit_table(unit.test_invalid_requests_get_a_400_naming_the_param)]
    rows += [({"messages": _USER, "response_format": fmt}, message, param) for fmt, message, param
             in _unit_table(unit.test_invalid_response_formats_get_a_400_naming_the_field)]
    return rows


def test_the_document_refuses_every_request_validation_refuses() -> None:
    """The document is no looser than validation: each body the unit tests show refused (and
    each below) breaks the document's ChatRequest schema, unless its rule is one the document
    says no schema states; those the schema accepts, and the handler still refuses."""
    schema = _validator("ChatRequest")
    rows = _refused_by_validation()
    rows += [(body, "", param) for body, param in _ALSO_REFUSED]
    beyond_seen = set()
    for body, message, param in rows:
        beyond = [b for b in _BEYOND_THE_SCHEMA if b in message]
        if beyond:
            beyond_seen.update(beyond)
            assert schema.is_valid(body), (message, body)
        else:
            assert not schema.is_valid(body), (message or param, body)
        if not message:  # a row of our own: the handler refuses it, naming the field
            assert _handler_answer(body) == (400, param), body
    assert beyond_seen == set(_BEYOND_THE_SCHEMA)  # each exception still has its row


@pytest.mark.parametrize("body", _ACCEPTED)
def test_the_document_and_the_service_accept_the_same_edge_cases(body: dict[str, Any]) -> None:
    assert _validator("ChatRequest").is_valid(body)
    assert _handler_answer(body)[0] == 200


# What the dev server answers by itself, before the handler: the standard library's parser
# refusals, a head or body too slow (408), a body announced over the limit (413), its stream
# limit (429) and its connection limit (503).
_DEV_SERVER_STATUSES = {*devserver._PROTOCOL_MESSAGES, 408, 413, 429, 503}


def test_every_status_the_dev_server_answers_by_itself_is_documented_on_every_operation(
) -> None:
    for path, operations in load_template(DOCUMENT)["paths"].items():
        for method, operation in operations.items():
            if method == "parameters":  # the path's own, not an operation
                continue
            documented = {int(status) for status in operation["responses"]}
            missing = _DEV_SERVER_STATUSES - documented
            assert not missing, f"{method.upper()} {path} does not document {sorted(missing)}"
