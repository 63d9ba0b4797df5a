"""response_format on the real embedded model: the official openai SDK's parse helpers and
LangChain's structured output against the dev server, unmodified, and the grammar's edges
(stop sequences, max_tokens, the document frame's own stop, the token filter)."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

import numpy as np
import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field

from streamgate.config import load_settings
from streamgate.deadline import NO_DEADLINE
from streamgate.dialects.chat import parse_request
from streamgate.handler import App
from streamgate.providers import Finish, Provider, TextDelta
from streamgate.providers import local as local_module
from streamgate.providers import openai as openai_provider
from streamgate.providers.grammar import JSON_OBJECT_GRAMMAR, GrammarFilter, text_tokens
from tests.conftest import running_dev_server, sdk_client
from tests.helpers import chat_event

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m"
SETTINGS = load_settings({}, provider="local")


class Person(BaseModel):
    name: str
    age: int


class Recipe(BaseModel):
    # Each step bounded too: a 270M model may otherwise write one step until max_tokens,
    # whatever the seed (the grammar enforces maxLength).
    steps: list[Annotated[str, Field(max_length=80)]] = Field(min_length=3, max_length=3)


def _client(base_url: str) -> openai.OpenAI:
    return sdk_client(
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused-locally", max_retries=0))


def _ask(content: str) -> list[Any]:
    return [{"role": "user", "content": content}]


def test_openai_sdk_parse_returns_a_person(model_server: str) -> None:
    # GIVEN the SDK's parse helper with a Pydantic model (it sends a strict json_schema)
    completion = _client(model_server).chat.completions.parse(
        model=MODEL, messages=_ask("Invent a person: give their name and age."),
        response_format=Person, seed=7, max_tokens=200)
    # THEN the answer parses into the model: no refusal, a finish reason of stop
    choice = completion.choices[0]
    assert isinstance(choice.message.parsed, Person)
    assert choice.message.refusal is None
    assert choice.finish_reason == "stop"
    assert completion.usage is not None and 0 < completion.usage.completion_tokens < 200


def test_openai_sdk_parse_returns_exactly_three_steps(model_server: str) -> None:
    completion = _client(model_server).chat.completions.parse(
        model=MODEL, messages=_ask("List the steps to make tea."), response_format=Recipe,
        seed=7, max_tokens=400)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Recipe) and len(parsed.steps) == 3


def test_openai_sdk_stream_helper_parses_the_streamed_answer(model_server: str) -> None:
    with _client(model_server).chat.completions.stream(
            model=MODEL, messages=_ask("Invent a person."), response_format=Person, seed=11,
            max_tokens=200) as stream:
        events = [e.type for e in stream]
        completion = stream.get_final_completion()
    assert "content.delta" in events and "content.done" in events
    assert isinstance(completion.choices[0].message.parsed, Person)


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_mode_answers_a_json_object(model_server: str, stream: bool) -> None:
    ask: dict[str, Any] = {"model": MODEL, "messages": _ask("Describe Oslo as JSON."),
                           "response_format": {"type": "json_object"}, "seed": 5,
                           "max_tokens": 300}
    client = _client(model_server)
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **ask))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = chunks[-1].choices[0].finish_reason
    else:
        completion = client.chat.completions.create(**ask)
        text, finish = completion.choices[0].message.content or "", \
            completion.choices[0].finish_reason
    assert finish == "stop"
    assert isinstance(json.loads(text), dict)


def test_langchain_structured_output_with_json_schema(model_server: str) -> None:
    # GIVEN LangChain's OpenAI chat model pointed at the dev server, unmodified
    llm = ChatOpenAI(model=MODEL, base_url=f"{model_server}/v1", api_key="unused-locally",
                     max_retries=0, seed=3, max_tokens=200)  # type: ignore[call-arg]
    # WHEN it asks for a Pydantic model through response_format json_schema
    person = llm.with_structured_output(Person, method="json_schema").invoke(
        "Invent a person: give their name and age.")
    # THEN it gets an instance of that model back
    assert isinstance(person, Person)


def test_openai_sdk_parse_through_the_openai_provider(model_server: str) -> None:
    # GIVEN the openai provider relaying to an upstream that honours json_schema (the dev
    # server on the embedded model; llama-cpp-python's server refuses the type, see
    # test_openai_upstream_real.py)
    settings = load_settings({"STREAMGATE_PROVIDER": "openai",
                              "STREAMGATE_UPSTREAM_BASE_URL": f"{model_server}/v1"})
    provider = openai_provider.create(settings)
    try:
        with running_dev_server(App(settings, provider)) as relay, _client(relay) as client:
            completion = client.chat.completions.parse(
                model=MODEL, messages=_ask("Invent a person: give their name and age."),
                response_format=Person, seed=7, max_tokens=200)
    finally:
        provider.close()
    assert isinstance(completion.choices[0].message.parsed, Person)
    assert completion.choices[0].message.refusal is None


def test_a_strict_schema_the_grammar_cannot_enforce_is_a_bad_request(model_server: str) -> None:
    class Adult(BaseModel):
        age: int = Field(ge=18)

    with _client(model_server) as client, pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.parse(
            model=MODEL, messages=_ask("Invent an adult."), response_format=Adult)
    body = info.value.body
    assert isinstance(body, dict)
    assert body["param"] == "response_format.json_schema.schema"
    assert body["message"] == ("The embedded model cannot enforce this strict schema: 'minimum' "
                               "at schema.properties.age; drop the keyword or send 'strict': "
                               "false")


def test_max_tokens_can_cut_the_json_with_finish_reason_length(model_server: str) -> None:
    # As on OpenAI: a length finish may leave the JSON unfinished, and parse refuses it.
    client = _client(model_server)
    ask: dict[str, Any] = {"model": MODEL, "messages": _ask("Invent a person."),
                           "response_format": Person, "max_tokens": 3, "seed": 1}
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(**ask)
    completion = client.chat.completions.create(**{**ask, "response_format": {
        "type": "json_schema", "json_schema": {"name": "person",
                                               "schema": Person.model_json_schema()}}})
    assert completion.choices[0].finish_reason == "length"
    text = completion.choices[0].message.content or ""
    assert text.startswith("{")
    with pytest.raises(ValueError):
        json.loads(text)


def test_stop_sequences_still_end_constrained_json(model_server: str) -> None:
    completion = _client(model_server).chat.completions.create(
        model=MODEL, messages=_ask("Invent a person."), stop=['"'], max_tokens=50,
        response_format={"type": "json_schema", "json_schema": {
            "name": "person", "schema": Person.model_json_schema()}})
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.choices[0].message.content or "").strip() == "{"


@pytest.mark.parametrize("response_format", [
    {"type": "json_object"},
    {"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}},
], ids=["json_object", "json_schema"])
def test_min_tokens_with_a_json_response_format_is_a_400_through_the_handler(
    local_provider: Provider, response_format: dict[str, Any]
) -> None:
    # GIVEN the pipeline on the embedded model, where a grammar decides where JSON ends
    app = App(SETTINGS, local_provider)
    # WHEN a request asks for JSON and a floor under the answer's length
    response = app.handle(chat_event({
        "model": MODEL, "messages": _ask("Invent a person."), "min_tokens": 5,
        "response_format": response_format}, headers={"accept": "application/json"}))
    doc = json.loads(b"".join(response.body))
    response.close()
    # THEN it is refused before the model is asked, naming min_tokens
    assert response.status == 400
    assert doc["error"]["param"] == "min_tokens"
    assert doc["error"]["message"] == (
        "'min_tokens' cannot be combined with a JSON 'response_format' on this model: the "
        "grammar decides where the answer ends")


def _generate(provider: Provider, body: dict[str, Any]) -> tuple[str, str]:
    request = parse_request({"max_tokens": 200, **body}, SETTINGS)
    text, reason = "", ""
    for delta in provider.stream(request, MODEL, NO_DEADLINE):
        if isinstance(delta, TextDelta):
            text += delta.text
        elif isinstance(delta, Finish):
            reason = delta.reason
    return text, reason


def test_the_frames_own_stop_does_not_cut_constrained_json(
    local_provider: Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a document-frame stop that every JSON answer contains
    monkeypatch.setattr(local_module, "_FORMAT_STOPS", ('"',))
    body = {"messages": _ask("Invent a person."), "seed": 2}
    # WHEN plain text is asked for, the frame's stop applies; with a grammar it does not
    plain, _ = _generate(local_provider, {**body, "max_tokens": 100})
    assert '"' not in plain
    text, reason = _generate(local_provider, {**body, "response_format": {
        "type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema(),
                                               "strict": True}}})
    assert reason == "stop"
    assert Person.model_validate_json(text)


def test_a_pattern_with_dots_still_gives_a_json_string(local_provider: Provider) -> None:
    # GIVEN a pattern of any characters and a prompt that invites quotes: a regex "." matches
    # a quote, which inside the JSON string would end it ('"the "quotes" as" ')
    body = {"messages": _ask('Write a quote with "quotes" in it.'), "max_tokens": 40,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "quote", "schema": {"type": "string", "pattern": "^.{10,30}$"}}}}
    for seed in range(3):
        # WHEN the model answers, THEN each answer is a JSON string the pattern matches
        text, reason = _generate(local_provider, {**body, "seed": seed})
        assert reason == "stop"
        value = json.loads(text)
        assert isinstance(value, str) and re.fullmatch(".{10,30}", value), text


def test_text_tokens_hide_control_tokens_but_keep_end_of_generation(
    local_provider: Provider
) -> None:
    llm: Any = local_provider._llm  # type: ignore[attr-defined]
    usable = text_tokens(llm._model.vocab)
    unused0, eos, end_of_turn = (llm.tokenize(t, add_bos=False, special=True)[0]
                                 for t in (b"<unused0>", b"<eos>", b"<end_of_turn>"))
    brace = llm.tokenize(b"{", add_bos=False)[0]
    assert not usable[unused0]
    assert usable[eos] and usable[end_of_turn] and usable[brace]


def test_the_grammar_filter_checks_the_whole_vocabulary_only_when_it_must(
    local_provider: Provider
) -> None:
    llm: Any = local_provider._llm  # type: ignore[attr-defined]
    vocab = llm._model.vocab
    usable = text_tokens(vocab)
    brace = llm.tokenize(b"{", add_bos=False)[0]
    the = llm.tokenize(b" The", add_bos=False)[0]
    grammar = GrammarFilter(vocab, JSON_OBJECT_GRAMMAR, usable=usable, likeliest=64)
    try:
        # WHEN "{" is among the likeliest tokens THEN only the likeliest are checked
        scores = np.zeros(usable.size, dtype=np.single)
        scores[brace] = 10.0
        kept = np.flatnonzero(np.isfinite(grammar(np.array([], dtype=np.intc), scores)))
        assert grammar.whole_vocabulary_checks == 0 and brace in kept
        # WHEN none of the likeliest fits THEN the whole vocabulary is checked
        scores = np.full(usable.size, -5.0, dtype=np.single)
        scores[the] = 10.0
        kept = np.flatnonzero(np.isfinite(grammar(np.array([], dtype=np.intc), scores)))
        assert grammar.whole_vocabulary_checks == 1
        assert the not in kept and brace in kept
        assert all(llm.detokenize([int(t)]).startswith(b"{") for t in kept)
        assert not grammar.allows(the)
        with pytest.raises(Exception, match="grammar does not allow"):
            grammar.accept(the)
        grammar.accept(brace)
        assert not grammar.allows(brace)  # "{{" is no JSON
    finally:
        grammar.close()
