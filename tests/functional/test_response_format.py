"""response_format through every provider's wire format, with in-process fakes: the capability
gate, the Bedrock mapping (outputConfig as Bedrock receives it, its refusals), the upstream
pass-through, and the OpenAI SDK's parse helpers against the dev server on the fake Bedrock."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel

from streamgate.config import load_settings
from streamgate.credentials import ApiKey
from streamgate.dialects.chat import parse_request
from streamgate.errors import StreamgateError
from streamgate.handler import App
from streamgate.providers import Finish, TextDelta, Usage
from streamgate.providers.bedrock import BedrockProvider, converse_request
from streamgate.providers.openai import OpenAIProvider, Upstream
from streamgate.validation import CAP_JSON_OBJECT, CAP_JSON_SCHEMA, ResponseFormat
from tests import fake_bedrock, fake_openai
from tests.conftest import running_dev_server
from tests.fake_bedrock import FakeBedrock, finish_events, start_event, stream_exception, text_block
from tests.fake_openai import FakeUpstream, completion_reply, error_reply, text_stream
from tests.helpers import ScriptedProvider, body_bytes, chat_event, make_app, sse_json

JSON = {"accept": "application/json"}
USER = [{"role": "user", "content": "Who wrote the first program?"}]
PERSON: dict[str, Any] = {
    "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"], "additionalProperties": False}
ANSWER = ('{"name":', ' "Ada Lovelace",', ' "age": 36}')


class Person(BaseModel):
    name: str
    age: int


def _schema_format(**json_schema: Any) -> dict[str, Any]:
    return {"type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON, **json_schema}}


def _error(response: Any) -> dict[str, Any]:
    error: dict[str, Any] = json.loads(body_bytes(response))["error"]
    return error


# --- the capability gate ----------------------------------------------------------------------

@pytest.mark.parametrize("response_format", [{"type": "json_object"}, _schema_format()])
def test_a_provider_without_the_capability_refuses_before_it_is_called(
    response_format: dict[str, Any]
) -> None:
    provider = ScriptedProvider()
    response = make_app(provider).handle(chat_event(
        {"messages": USER, "response_format": response_format, "stream": True}, headers=JSON))
    assert response.status == 400
    assert _error(response) == {
        "message": f"'response_format' type '{response_format['type']}' is not supported by "
                   "this model",
        "type": "invalid_request_error", "param": "response_format", "code": None}
    assert provider.requests == []


def test_the_provider_gets_the_response_format_as_validated() -> None:
    provider = ScriptedProvider(capabilities=frozenset({CAP_JSON_SCHEMA, CAP_JSON_OBJECT}))
    make_app(provider).handle(chat_event(
        {"messages": USER, "response_format": _schema_format(strict=True)}))
    assert provider.requests[0][0].response_format == ResponseFormat(
        "json_schema", "person", None, PERSON, True)


# --- Amazon Bedrock: outputConfig.textFormat ---------------------------------------------------

def _bedrock_app(fake: FakeBedrock, **settings: Any) -> App:
    s = load_settings({}, provider="bedrock", **{"bedrock_backoff_s": 0.01, **settings})
    return App(s, BedrockProvider(s, fake.client()))


def _json_text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, ensure_ascii=False, separators=(",", ":"))


UNICODE = {"type": "object", "properties": {"café": {"type": "string", "description": "naïve"}},
           "required": ["café"], "additionalProperties": False}


@pytest.mark.parametrize(
    ("response_format", "json_schema"),
    [
        (_schema_format(), {"name": "person", "schema": _json_text(PERSON)}),
        (_schema_format(description="Someone famous"),
         {"name": "person", "description": "Someone famous", "schema": _json_text(PERSON)}),
        # Bedrock always decodes under the schema: strict true and false send the same thing
        (_schema_format(strict=True), {"name": "person", "schema": _json_text(PERSON)}),
        (_schema_format(strict=False), {"name": "person", "schema": _json_text(PERSON)}),
        (_schema_format(schema=UNICODE, description=None),
         {"name": "person", "schema": '{"type":"object","properties":{"café":{"type":"string",'
                                      '"description":"naïve"}},"required":["café"],'
                                      '"additionalProperties":false}'}),
    ],
    ids=["name-and-schema", "description", "strict-true", "strict-false", "unicode"],
)
def test_json_schema_maps_to_output_config_with_the_schema_as_a_string(
    response_format: dict[str, Any], json_schema: dict[str, str]
) -> None:
    with FakeBedrock([fake_bedrock.Reply(frames=fake_bedrock.text_events(*ANSWER))]) as fake:
        response = _bedrock_app(fake).handle(chat_event(
            {"messages": USER, "response_format": response_format}))
    assert response.status == 200
    sent = fake.requests[0][1]
    # GIVEN botocore's serializer: the request JSON exactly as Bedrock receives it
    assert sent["outputConfig"] == {"textFormat": {"type": "json_schema", "structure": {
        "jsonSchema": json_schema}}}
    schema = response_format["json_schema"]["schema"]
    assert json.loads(sent["outputConfig"]["textFormat"]["structure"]["jsonSchema"]["schema"]) \
        == schema


@pytest.mark.parametrize("body", [{}, {"response_format": None},
                                  {"response_format": {"type": "text"}}])
def test_text_or_no_response_format_sends_no_output_config(body: dict[str, Any]) -> None:
    with FakeBedrock([fake_bedrock.Reply(frames=fake_bedrock.text_events("ok"))]) as fake:
        assert _bedrock_app(fake).handle(chat_event({"messages": USER, **body})).status == 200
    assert "outputConfig" not in fake.requests[0][1]


def test_json_object_is_refused_for_bedrock_before_calling_it() -> None:
    # Converse has no JSON mode: textFormat only takes a schema.
    with FakeBedrock() as fake:
        response = _bedrock_app(fake).handle(chat_event(
            {"messages": USER, "response_format": {"type": "json_object"}}, headers=JSON))
    assert response.status == 400
    assert _error(response) == {
        "message": "'response_format' type 'json_object' is not supported by this model; send "
                   "type 'json_schema' with the schema the answer must follow",
        "type": "invalid_request_error", "param": "response_format", "code": None}
    assert fake.requests == []


def test_the_bedrock_mapping_itself_refuses_json_object_too() -> None:
    # A second line behind the capability gate: the mapping never sends json_object as text.
    request = parse_request({"messages": USER, "response_format": {"type": "json_object"}},
                            load_settings({}))
    with pytest.raises(StreamgateError) as info:
        converse_request(request, "us.amazon.nova-lite-v1:0", load_settings({}))
    assert (info.value.status, info.value.param) == (400, "response_format")
    assert info.value.message == ("'response_format' type 'json_object' is not supported by "
                                  "Amazon Bedrock; send type 'json_schema'")


def test_json_schema_and_tools_travel_together() -> None:
    tool = {"type": "function", "function": {"name": "lookup", "parameters": PERSON}}
    with FakeBedrock([fake_bedrock.Reply(frames=fake_bedrock.text_events(*ANSWER))]) as fake:
        _bedrock_app(fake).handle(chat_event({"messages": USER, "tools": [tool],
                                              "response_format": _schema_format()}))
    sent = fake.requests[0][1]
    assert [t["toolSpec"]["name"] for t in sent["toolConfig"]["tools"]] == ["lookup"]
    assert sent["outputConfig"]["textFormat"]["structure"]["jsonSchema"]["name"] == "person"


def test_a_structured_answer_streams_as_content_with_usage_unchanged() -> None:
    frames = fake_bedrock.text_events(*ANSWER, usage=(30, 9))
    with FakeBedrock([fake_bedrock.Reply(frames=frames)]) as fake:
        response = _bedrock_app(fake).handle(chat_event(
            {"messages": USER, "response_format": _schema_format(), "stream": True,
             "stream_options": {"include_usage": True}}))
        chunks = sse_json(body_bytes(response))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas == [{"role": "assistant", "content": ANSWER[0]}, {"content": ANSWER[1]},
                      {"content": ANSWER[2]}, {}]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 30, "completion_tokens": 9, "total_tokens": 39,
        "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0}}


def test_a_structured_answer_completes_with_usage_unchanged() -> None:
    frames = fake_bedrock.text_events(*ANSWER, usage=(30, 9))
    with FakeBedrock([fake_bedrock.Reply(frames=frames)]) as fake:
        doc = json.loads(body_bytes(_bedrock_app(fake).handle(chat_event(
            {"messages": USER, "response_format": _schema_format()}))))
    assert json.loads(doc["choices"][0]["message"]["content"]) == {"name": "Ada Lovelace",
                                                                   "age": 36}
    assert doc["choices"][0]["message"]["refusal"] is None
    assert doc["choices"][0]["finish_reason"] == "stop"
    assert doc["usage"]["prompt_tokens"] == 30 and doc["usage"]["completion_tokens"] == 9


# Bedrock's words for a model without structured outputs are not published in botocore; this
# stand-in has the shape of its ValidationException messages.
REFUSAL = "The model does not support structured output (outputConfig.textFormat)."


@pytest.mark.parametrize(
    ("reply", "structured", "param"),
    [
        (fake_bedrock.Reply(400, "ValidationException", REFUSAL), True, "response_format"),
        (fake_bedrock.Reply(400, "ValidationException",
                            "Invalid JSON schema: 'minimum' is not supported"),
         True, "response_format"),
        (fake_bedrock.Reply(frames=[start_event(),
                                    stream_exception("validationException", REFUSAL)]),
         True, "response_format"),
        (fake_bedrock.Reply(400, "ValidationException", "Malformed input request"), True, None),
        (fake_bedrock.Reply(400, "ValidationException", REFUSAL), False, None),
    ],
    ids=["http-refusal", "schema-refused", "first-event-refusal", "other-validation",
         "no-output-config"],
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_model_refusing_structured_output_is_a_400_with_bedrocks_reason(
    reply: fake_bedrock.Reply, structured: bool, param: str | None, stream: bool
) -> None:
    body: dict[str, Any] = {"messages": USER, "stream": stream}
    if structured:
        body["response_format"] = _schema_format()
    with FakeBedrock([reply, fake_bedrock.Reply(frames=fake_bedrock.text_events("x"))]) as fake:
        response = _bedrock_app(fake).handle(chat_event(body, headers=JSON))
        error = _error(response)
    assert response.status == 400
    message = reply.message or REFUSAL
    assert error == {"message": f"Amazon Bedrock: {message}", "type": "invalid_request_error",
                     "param": param, "code": None}
    assert len(fake.requests) == 1  # a refusal is not retried


def test_a_refusal_after_the_first_token_is_an_in_band_error() -> None:
    frames = [start_event(), *text_block(0, '{"name":')[:1],
              stream_exception("validationException", REFUSAL)]
    with FakeBedrock([fake_bedrock.Reply(frames=frames)]) as fake:
        raw = body_bytes(_bedrock_app(fake).handle(chat_event(
            {"messages": USER, "response_format": _schema_format(), "stream": True})))
    assert sse_json(raw)[-1] == {"error": {"message": f"Amazon Bedrock: {REFUSAL}",
                                           "type": "invalid_request_error",
                                           "param": "response_format", "code": None}}
    assert b"[DONE]" not in raw


@pytest.fixture
def bedrock_server() -> Iterator[tuple[str, FakeBedrock]]:
    with FakeBedrock() as fake, running_dev_server(_bedrock_app(fake)) as url:
        yield url, fake


def _sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_openai_sdk_parse_returns_the_parsed_object_through_bedrock(
    bedrock_server: tuple[str, FakeBedrock]
) -> None:
    url, fake = bedrock_server
    fake.replies.append(fake_bedrock.Reply(frames=fake_bedrock.text_events(*ANSWER)))
    # WHEN the SDK's parse helper asks for a Pydantic model
    completion = _sdk(url).chat.completions.parse(
        model="us.amazon.nova-lite-v1:0", messages=USER, response_format=Person)  # type: ignore[arg-type]
    # THEN Bedrock got the SDK's strict schema as a string, and the SDK parsed the answer
    json_schema = fake.requests[0][1]["outputConfig"]["textFormat"]["structure"]["jsonSchema"]
    assert json_schema == {"name": "Person", "schema": _json_text(to_strict_json_schema(Person))}
    message = completion.choices[0].message
    assert message.parsed == Person(name="Ada Lovelace", age=36)
    assert message.refusal is None


def test_openai_sdk_stream_helper_parses_the_streamed_answer_through_bedrock(
    bedrock_server: tuple[str, FakeBedrock]
) -> None:
    url, fake = bedrock_server
    fake.replies.append(fake_bedrock.Reply(frames=[
        start_event(), *text_block(0, *ANSWER), *finish_events(usage=(30, 9))]))
    with _sdk(url).chat.completions.stream(
            model="us.amazon.nova-lite-v1:0", messages=USER,  # type: ignore[arg-type]
            response_format=Person, stream_options={"include_usage": True}) as stream:
        completion = stream.get_final_completion()
    assert completion.choices[0].message.parsed == Person(name="Ada Lovelace", age=36)
    assert completion.usage is not None and completion.usage.completion_tokens == 9


def test_openai_sdk_parse_raises_bad_request_for_json_object_on_bedrock(
    bedrock_server: tuple[str, FakeBedrock]
) -> None:
    url, fake = bedrock_server
    with _sdk(url) as client, pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="us.amazon.nova-lite-v1:0", messages=USER,  # type: ignore[arg-type]
                                       response_format={"type": "json_object"})
    assert info.value.status_code == 400
    assert isinstance(info.value.body, dict) and info.value.body["param"] == "response_format"
    assert fake.requests == []


# --- OpenAI-compatible upstream: passed through as sent ---------------------------------------

_providers: list[OpenAIProvider] = []


@pytest.fixture(autouse=True)
def _close_providers() -> Iterator[None]:
    yield
    while _providers:
        _providers.pop().close()


def _upstream_app(fake: FakeUpstream) -> App:
    s = load_settings({}, provider="openai", upstream_base_url=fake.url)
    provider = OpenAIProvider(s, ApiKey(None, 60, value="sk-test"),
                              Upstream(fake.url, s.upstream_connect_timeout_s))
    _providers.append(provider)
    return App(s, provider)


@pytest.mark.parametrize(
    ("response_format", "forwarded"),
    [
        ({"type": "text"}, {"type": "text"}),
        ({"type": "json_object"}, {"type": "json_object"}),
        (_schema_format(description="Someone", strict=True), _schema_format(
            description="Someone", strict=True)),
        (_schema_format(strict=False), _schema_format(strict=False)),
        # null fields are left out, as the client left them out
        (_schema_format(description=None, strict=None), _schema_format()),
        ({"type": "json_object", "json_schema": None}, {"type": "json_object"}),
    ],
    ids=["text", "json-object", "json-schema-strict", "json-schema-not-strict",
         "json-schema-nulls", "json-object-null-field"],
)
@pytest.mark.parametrize("stream", [False, True])
def test_response_format_reaches_the_upstream_unchanged(
    response_format: dict[str, Any], forwarded: dict[str, Any], stream: bool
) -> None:
    reply = (fake_openai.Reply(body=[text_stream('{"a": 1}')]) if stream
             else completion_reply('{"a": 1}'))
    with FakeUpstream([reply]) as fake:
        response = _upstream_app(fake).handle(chat_event(
            {"model": "upstream-model", "messages": USER, "stream": stream,
             "response_format": response_format}))
        assert response.status == 200
        body_bytes(response)
    assert fake.chat_requests()[0]["response_format"] == forwarded


def test_no_response_format_is_not_invented_for_the_upstream() -> None:
    with FakeUpstream([completion_reply("hi")]) as fake:
        _upstream_app(fake).handle(chat_event({"model": "upstream-model", "messages": USER}))
    assert "response_format" not in fake.chat_requests()[0]


def test_the_upstreams_refusal_of_a_response_format_keeps_its_param() -> None:
    refusal = error_reply(400, "response_format json_schema is not supported by this model",
                          param="response_format", code="unsupported_parameter")
    with FakeUpstream([refusal]) as fake:
        response = _upstream_app(fake).handle(chat_event(
            {"model": "upstream-model", "messages": USER, "response_format": _schema_format()},
            headers=JSON))
    assert response.status == 400
    assert _error(response) == {
        "message": "Upstream: response_format json_schema is not supported by this model",
        "type": "invalid_request_error", "param": "response_format",
        "code": "unsupported_parameter"}


def test_a_scripted_json_answer_passes_the_pipeline_byte_for_byte() -> None:
    # The pipeline adds nothing to structured text: what the provider yields is the content.
    provider = ScriptedProvider([*(TextDelta(p) for p in ANSWER), Finish("stop"), Usage(3, 3)],
                                capabilities=frozenset({CAP_JSON_SCHEMA}))
    doc = json.loads(body_bytes(make_app(provider).handle(chat_event(
        {"messages": USER, "response_format": _schema_format()}))))
    assert doc["choices"][0]["message"]["content"] == "".join(ANSWER)
