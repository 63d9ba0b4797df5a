"""POST /v1/embeddings against in-process fakes on loopback: a fake Bedrock speaking Titan's and
Cohere's real InvokeModel shapes (botocore runs), a scripted OpenAI-compatible upstream, routes
with fallbacks; openai-python as the client through the dev server, every answer checked
against its own types. The embedded model's own tests are in tests/integration."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import pytest

from streamgate.auth import Gate
from streamgate.config import load_settings
from streamgate.deadline import Deadline
from streamgate.errors import ConfigError, DeadlineExceededError
from streamgate.handler import App, Response
from streamgate.keystore import KeyStore, table_definition
from streamgate.providers.bedrock import BedrockProvider
from streamgate.providers.bedrock_embed import BedrockEmbedder
from streamgate.providers.embedding import EmbeddingModel, EmbeddingRequest, Embeddings
from streamgate.routes import Cooling, Router, parse_routes
from tests.conftest import running_dev_server
from tests.embedding_checks import cosine, decode_base64, strict_response
from tests.fake_bedrock_embed import COHERE, TITAN, Failure, FakeBedrockEmbed, vector
from tests.fake_openai import FakeUpstream, error_reply
from tests.fake_openai import Reply as UpstreamReply
from tests.helpers import ScriptedProvider, body_bytes, chat_event

JSON = {"accept": "application/json"}
ROOT = Path(__file__).resolve().parents[2]
PATH = "/v1/embeddings"


@pytest.fixture(autouse=True)
def _aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def bedrock() -> Iterator[FakeBedrockEmbed]:
    with FakeBedrockEmbed() as fake:
        yield fake


_apps: list[App] = []
_clients: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_apps() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()
    while _apps:
        _apps.pop().router.close()


def bedrock_app(fake: FakeBedrockEmbed, models: tuple[str, ...] = (TITAN, COHERE),
                **settings: Any) -> App:
    """Bedrock as the one provider: Nova for chat, the embedding models configured."""
    s = load_settings({}, provider="bedrock", embedding_models=models, metrics=False,
                      bedrock_max_attempts=1, **settings)
    chat = BedrockProvider(s, client=fake.client())
    app = App(s, router=Router(s, chat, embedder=BedrockEmbedder(s, fake.client())))
    _apps.append(app)
    return app


def embed(app: App, body: dict[str, Any]) -> tuple[Response, Any]:
    response = app.handle(chat_event(body, path=PATH, headers=JSON))
    raw = body_bytes(response)
    response.close()
    return response, json.loads(raw)


def client(url: str, **options: Any) -> openai.OpenAI:
    """openai-python on the dev server, closed after the test."""
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30,
                        **options)
    _clients.append(sdk)
    return sdk


# -- Bedrock: Titan Text Embeddings V2 ---------------------------------------------------------

def test_openai_python_gets_titan_vectors_as_floats_and_as_base64(
        bedrock: FakeBedrockEmbed) -> None:
    # GIVEN Bedrock's Titan V2 behind the dev server
    app = bedrock_app(bedrock)
    texts = ["the cat sat on the mat", "a dog in the fog", "the cat sat on the mat"]
    with running_dev_server(app) as url:
        sdk = client(url)
        # WHEN openai-python asks for floats, and with its default (base64, decoded by it)
        floats = sdk.embeddings.create(model=TITAN, input=texts, encoding_format="float")
        default = sdk.embeddings.create(model=TITAN, input=texts)
        # and for raw base64, which it then leaves alone
        raw = sdk.embeddings.with_raw_response.create(model=TITAN, input=texts,
                                                      encoding_format="base64")
    # THEN each input has Titan's vector, in order, the same text giving the same vector
    want = [vector(t, 1024) for t in texts]
    assert [d.embedding for d in floats.data] == want
    assert [d.embedding for d in default.data] == want
    doc = json.loads(raw.http_response.text)
    strict_response(doc)
    assert [decode_base64(d["embedding"]) for d in doc["data"]] == want
    # usage is what Titan counted (inputTextTokenCount), the model the public name
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == 6 + 5 + 6
    assert floats.model == TITAN
    # and Titan got one text per call, normalised, of the route's size, nothing else
    # (the calls are concurrent: their order is not the inputs')
    assert (TITAN, {"inputText": texts[0], "normalize": True, "dimensions": 1024}
            ) in bedrock.requests
    assert {tuple(sorted(body)) for _, body in bedrock.requests} == {
        ("dimensions", "inputText", "normalize")}


def test_several_inputs_to_titan_are_called_concurrently_within_the_bound(
        bedrock: FakeBedrockEmbed) -> None:
    # GIVEN a Titan endpoint that takes 0.2 s per call
    bedrock.delay_s = 0.2
    app = bedrock_app(bedrock)
    # WHEN 20 inputs are embedded at once
    response, doc = embed(app, {"model": TITAN, "input": [f"text {i}" for i in range(20)]})
    # THEN calls overlapped, never more than the bound (8) at a time, and the answer is whole
    assert response.status == 200, doc
    assert 1 < bedrock.most_in_flight <= 8
    assert [d["embedding"] for d in doc["data"]] == [vector(f"text {i}", 1024)
                                                     for i in range(20)]


def test_dimensions_reach_titan_and_the_vector_has_that_size(bedrock: FakeBedrockEmbed) -> None:
    app = bedrock_app(bedrock)
    with running_dev_server(app) as url:
        answer = client(url).embeddings.create(model=TITAN, input="hello there",
                                               dimensions=256, encoding_format="float")
    assert len(answer.data[0].embedding) == 256
    assert bedrock.requests[0][1] == {"inputText": "hello there", "normalize": True,
                                      "dimensions": 256}  # the client's, not the route's


def test_concurrent_titan_calls_end_at_the_deadline(bedrock: FakeBedrockEmbed) -> None:
    # GIVEN a Titan endpoint that takes 2 s per call
    bedrock.delay_s = 2.0
    s = load_settings({}, provider="bedrock", embedding_models=(TITAN,), bedrock_max_attempts=1)
    embedder = BedrockEmbedder(s, bedrock.client())
    request = EmbeddingRequest(TITAN, ("a", "b", "c"), dimensions=1024)
    # WHEN the request has 0.3 s left THEN it fails with the deadline's 504 by then
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        embedder.embed(request, TITAN, Deadline.after(0.3))
    assert time.monotonic() - started < 1.8  # not the 2 s of the calls


@pytest.mark.parametrize(("model", "dimensions"), [(TITAN, 300), (COHERE, 256)])
def test_dimensions_a_model_cannot_give_are_a_400_naming_them_before_any_call(
        bedrock: FakeBedrockEmbed, model: str, dimensions: int) -> None:
    response, doc = embed(bedrock_app(bedrock), {"model": model, "input": "x",
                                                 "dimensions": dimensions})
    assert response.status == 400
    assert doc["error"]["param"] == "dimensions"
    assert bedrock.requests == []


@pytest.mark.parametrize(("failure", "status", "retry_after"), [
    (Failure(429, "ThrottlingException", "Too many requests"), 429, "2"),
    (Failure(400, "ValidationException", "Malformed input request"), 400, None),
    (Failure(403, "AccessDeniedException", "You don't have access to the model"), 403, None),
    (Failure(503, "ServiceUnavailableException", "Service unavailable"), 503, "2"),
])
def test_bedrock_errors_become_the_status_chat_gives_them(
        bedrock: FakeBedrockEmbed, failure: Failure, status: int,
        retry_after: str | None) -> None:
    bedrock.failures = [failure]
    response, doc = embed(bedrock_app(bedrock), {"model": TITAN, "input": "x"})
    assert response.status == status
    assert response.headers.get("retry-after") == retry_after
    assert failure.message in doc["error"]["message"]


def test_a_text_too_long_for_titan_is_a_400_naming_input(bedrock: FakeBedrockEmbed) -> None:
    response, doc = embed(bedrock_app(bedrock), {"model": TITAN, "input": "a " * 9000})
    assert response.status == 400
    assert (doc["error"]["param"], doc["error"]["code"]) == ("input", "context_length_exceeded")


# -- Bedrock: Cohere Embed ----------------------------------------------------------------------

def test_cohere_takes_at_most_96_texts_a_call_with_the_default_input_type(
        bedrock: FakeBedrockEmbed) -> None:
    # GIVEN 100 texts for Cohere Embed
    texts = [f"document number {i}" for i in range(100)]
    # WHEN they are embedded
    response, doc = embed(bedrock_app(bedrock), {"model": COHERE, "input": texts})
    # THEN two calls went out, 96 and 4 texts, as search documents, never truncated
    assert response.status == 200, doc
    sent = sorted((b for _, b in bedrock.requests), key=lambda b: -len(b["texts"]))
    assert [len(b["texts"]) for b in sent] == [96, 4]
    assert {(b["input_type"], b["truncate"]) for b in sent} == {("search_document", "NONE")}
    # the vectors are in input order, usage from Bedrock's token-count header
    strict_response(doc)
    assert [d["embedding"] for d in doc["data"]] == [vector(t, 1024, unit=False)
                                                     for t in texts]
    assert doc["usage"] == {"prompt_tokens": 300, "total_tokens": 300}


def test_cohere_input_type_is_ours_to_set_and_refused_where_it_means_nothing(
        bedrock: FakeBedrockEmbed) -> None:
    app = bedrock_app(bedrock)
    with running_dev_server(app) as url:
        client(url).embeddings.create(model=COHERE, input="what is a cat?",
                                      extra_body={"input_type": "search_query"})
        with pytest.raises(openai.BadRequestError) as caught:
            client(url).embeddings.create(model=TITAN, input="x",
                                          extra_body={"input_type": "search_query"})
    assert bedrock.requests[0][1]["input_type"] == "search_query"
    assert caught.value.body["param"] == "input_type"  # type: ignore[index]


def test_token_arrays_are_a_400_on_bedrock(bedrock: FakeBedrockEmbed) -> None:
    response, doc = embed(bedrock_app(bedrock), {"model": TITAN, "input": [[1, 2, 3]]})
    assert (response.status, doc["error"]["param"]) == (400, "input")
    assert bedrock.requests == []


# -- the dialect's bounds, models and listing ---------------------------------------------------

@pytest.mark.parametrize(("body", "param"), [
    ({"model": TITAN}, "input"),
    ({"model": TITAN, "input": ""}, "input"),
    ({"model": TITAN, "input": []}, "input"),
    ({"model": TITAN, "input": ["ok", ""]}, "input[1]"),
    ({"model": TITAN, "input": ["x"] * 2049}, "input"),
    ({"model": TITAN, "input": "x" * 32_769}, "input"),
    ({"model": TITAN, "input": ["ok", 3]}, "input"),
    ({"model": TITAN, "input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"model": TITAN, "input": "x", "dimensions": 0}, "dimensions"),
    ({"model": TITAN, "input": "x", "dimensions": "256"}, "dimensions"),
    ({"model": TITAN, "input": "x", "temperature": 0.5}, "temperature"),
])
def test_requests_out_of_bounds_are_a_400_naming_the_field(
        bedrock: FakeBedrockEmbed, body: dict[str, Any], param: str) -> None:
    response, doc = embed(bedrock_app(bedrock), body)
    assert response.status == 400, doc
    assert doc["error"]["param"] == param
    assert bedrock.requests == []


def test_a_body_over_the_limit_is_a_413(bedrock: FakeBedrockEmbed) -> None:
    app = bedrock_app(bedrock, max_body_bytes=10_000)
    response, _ = embed(app, {"model": TITAN, "input": ["x" * 1000] * 11})
    assert response.status == 413


def test_all_inputs_together_are_bounded_by_the_input_cap(bedrock: FakeBedrockEmbed) -> None:
    app = bedrock_app(bedrock, max_input_chars=1_000)
    response, doc = embed(app, {"model": TITAN, "input": ["x" * 600, "y" * 600]})
    assert (response.status, doc["error"]["param"]) == (400, "input")


def test_models_lists_embedding_models_and_each_kind_is_refused_on_the_other_path(
        bedrock: FakeBedrockEmbed) -> None:
    app = bedrock_app(bedrock)
    listed = json.loads(body_bytes(app.handle(chat_event(None, method="GET",
                                                         path="/v1/models"))))
    assert [m["id"] for m in listed["data"]] == ["us.amazon.nova-lite-v1:0", TITAN, COHERE]
    # a chat model on /v1/embeddings
    response, doc = embed(app, {"model": "us.amazon.nova-lite-v1:0", "input": "x"})
    assert (response.status, doc["error"]["param"]) == (400, "model")
    # an embedding model on chat
    chat = app.handle(chat_event({"model": TITAN, "messages": [{"role": "user",
                                                                "content": "hi"}]},
                                 headers=JSON))
    doc = json.loads(body_bytes(chat))
    assert (chat.status, doc["error"]["param"]) == (400, "model")
    # a model nobody serves
    response, doc = embed(app, {"model": "nope", "input": "x"})
    assert (response.status, doc["error"]["code"]) == (404, "model_not_found")
    assert bedrock.requests == []


def test_a_provider_without_embedding_models_answers_404_not_500() -> None:
    app = App(load_settings({}, provider="local", metrics=False), ScriptedProvider())
    response, doc = embed(app, {"model": "scripted-1", "input": "x"})
    assert (response.status, doc["error"]["param"]) == (400, "model")
    response, doc = embed(app, {"input": "x"})
    assert (response.status, doc["error"]["code"]) == (404, "model_not_found")


# -- an OpenAI-compatible upstream ---------------------------------------------------------------

def upstream_answer(vectors: list[list[float]], *, base64_form: bool = False,
                    tokens: int | None = 9) -> UpstreamReply:
    from streamgate.dialects.embeddings import encode_base64

    doc: dict[str, Any] = {"object": "list", "model": "nomic-embed-text", "data": [
        {"object": "embedding", "index": i,
         "embedding": encode_base64(v) if base64_form else v}
        for i, v in reversed(list(enumerate(vectors)))]}  # out of order: index decides
    if tokens is not None:
        doc["usage"] = {"prompt_tokens": tokens, "total_tokens": tokens}
    return UpstreamReply(200, [json.dumps(doc).encode()], {"content-type": "application/json"})


def upstream_app(fake: FakeUpstream) -> App:
    s = load_settings({}, provider="openai", upstream_base_url=fake.url,
                      upstream_api_key="sk-test-0123456789", upstream_max_attempts=1,
                      upstream_models=("chat-model",),
                      embedding_models=("embed=nomic-embed-text@3",), metrics=False)
    app = App(s)
    _apps.append(app)
    return app


def test_an_upstream_gets_the_validated_request_and_its_answer_is_relayed_in_order() -> None:
    vectors = [[0.5, 0.25, -0.125], [1.0, 0.0, 0.0]]
    with FakeUpstream([upstream_answer(vectors, base64_form=True)]) as fake:
        app = upstream_app(fake)
        with running_dev_server(app) as url:
            # WHEN openai-python asks with its defaults (base64) and dimensions
            answer = client(url).embeddings.create(model="embed", input=["a", "b"],
                                                   dimensions=3, user="u-1")
        # THEN the upstream got its own model name and what the client set, nothing else
        path, headers, body = fake.requests[-1]
        assert path == "/v1/embeddings"
        assert headers["authorization"] == "Bearer sk-test-0123456789"
        assert body == {"model": "nomic-embed-text", "input": ["a", "b"],
                        "encoding_format": "base64", "dimensions": 3, "user": "u-1"}
    # and the client the vectors in input order, the upstream's usage, our model name
    assert [d.embedding for d in answer.data] == vectors
    assert (answer.usage.prompt_tokens, answer.model) == (9, "embed")


def test_token_arrays_pass_to_an_upstream() -> None:
    with FakeUpstream([upstream_answer([[0.0, 1.0, 0.0]])]) as fake:
        response, doc = embed(upstream_app(fake), {"model": "embed", "input": [[1, 2, 3]],
                                                   "encoding_format": "float"})
        assert fake.requests[-1][2]["input"] == [[1, 2, 3]]
    assert response.status == 200, doc
    strict_response(doc)


@pytest.mark.parametrize(("reply", "status", "retry_after"), [
    (error_reply(429, "slow down", headers={"retry-after": "7"}), 429, "7"),
    (error_reply(400, "input too long", param="input"), 400, None),
    (UpstreamReply(200, [b'{"data": [{"embedding": "not base64!"}]}'],
                   {"content-type": "application/json"}), 502, None),
    (UpstreamReply(200, [b'{"data": []}'], {"content-type": "application/json"}), 502, None),
])
def test_upstream_errors_map_as_chat_and_garbage_is_an_upstream_error(
        reply: UpstreamReply, status: int, retry_after: str | None) -> None:
    with FakeUpstream([reply]) as fake:
        response, doc = embed(upstream_app(fake), {"model": "embed", "input": "x"})
    assert response.status == status, doc
    assert response.headers.get("retry-after") == retry_after


def test_a_vector_of_the_wrong_size_is_an_upstream_error_not_an_answer() -> None:
    with FakeUpstream([upstream_answer([[1.0, 0.0]])]) as fake:
        response, doc = embed(upstream_app(fake), {"model": "embed", "input": "x"})
    assert (response.status, doc["error"]["code"]) == (502, "upstream_error")
    assert "2 dimensions where 3 were due" in doc["error"]["message"]


# -- routes --------------------------------------------------------------------------------------

def test_an_embeddings_route_falls_back_when_its_first_target_is_throttled() -> None:
    # GIVEN a route of Titan in two regions, the first one throttled
    with FakeBedrockEmbed([Failure(429, "ThrottlingException")]) as east, \
            FakeBedrockEmbed() as west:
        targets = [{"name": name, "kind": "bedrock", "model": TITAN, "region": region,
                    "endpoint_url": fake.url, "max_attempts": 1, "dimensions": 512}
                   for name, region, fake in (("east", "us-east-1", east),
                                              ("west", "us-west-2", west))]
        app = App(load_settings({}, routes=json.dumps({"routes": {"docs": targets}}),
                                metrics=False))
        _apps.append(app)
        # WHEN a client embeds twice
        first, doc = embed(app, {"model": "docs", "input": "hello"})
        second, _ = embed(app, {"model": "docs", "input": "hello"})
        # THEN the second region answered, with the route's size, and the first one cools
        assert first.status == 200, doc
        assert first.headers["x-streamgate-backend"] == "west"
        assert len(doc["data"][0]["embedding"]) == 512
        assert west.requests[0][1]["dimensions"] == 512
        assert second.headers["x-streamgate-backend"] == "west"
        assert len(east.requests) == 1
        assert [f["target"] for f in first.outcome.fallbacks] == ["east"]
        assert [f["outcome"] for f in second.outcome.fallbacks] == ["cooling"]


@pytest.mark.parametrize(("targets", "message"), [
    ([{"kind": "bedrock", "model": TITAN, "dimensions": 512}, {"kind": "bedrock", "model": COHERE,
                                             "name": "c"}],
     "different sizes"),
    ([{"kind": "bedrock", "model": TITAN}, {"kind": "bedrock", "model": "amazon.nova-lite-v1:0",
                                             "name": "n"}],
     "mixes chat and embedding models"),
    ([{"kind": "bedrock", "model": TITAN, "dimensions": 300}], "256, 512 or 1024"),
    ([{"kind": "bedrock", "model": "amazon.nova-lite-v1:0", "dimensions": 256}],
     "is for embedding models"),
])
def test_a_route_whose_targets_cannot_agree_is_refused_at_load(
        targets: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_routes(json.dumps({"routes": {"docs": targets}}), "routes.json",
                     defaults=Cooling())
    assert message in caught.value.message


def test_an_upstream_target_is_an_embedding_model_when_its_size_is_configured() -> None:
    table = parse_routes(json.dumps({"routes": {"docs": [
        {"kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "e5",
         "dimensions": 384},
        {"kind": "local", "model": "all-minilm-l6-v2", "name": "local"}]}}),
        "routes.json", defaults=Cooling())
    route = table.routes["docs"]
    assert route.embedding is not None and route.embedding.dimensions == 384


def test_the_same_text_gives_the_same_vector_and_related_texts_are_closer(
        bedrock: FakeBedrockEmbed) -> None:
    # The fake's vectors are hashes: only sameness is meaningful here (the embedded model's
    # test checks meaning).
    response, doc = embed(bedrock_app(bedrock), {"model": TITAN, "input": ["a", "b", "a"]})
    a, b, again = (d["embedding"] for d in doc["data"])
    assert a == again and cosine(a, again) == pytest.approx(1.0) and cosine(a, b) < 0.5


# -- keys and limits -----------------------------------------------------------------------------

class CountingEmbedder:
    """An embedder whose backend reports ``tokens`` for any request: what keys must charge."""

    name = "counting"

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens

    def embedding_models(self) -> dict[str, EmbeddingModel]:
        return {"counted": EmbeddingModel("counted", 2)}

    def embed(self, request: EmbeddingRequest, model: str, deadline: Deadline) -> Embeddings:
        return Embeddings([[1.0, 0.0] for _ in request.inputs], self.tokens)


@pytest.fixture
def store(monkeypatch: pytest.MonkeyPatch) -> Iterator[KeyStore]:
    from moto import mock_aws

    monkeypatch.delenv("AWS_ENDPOINT_URL_DYNAMODB", raising=False)
    with mock_aws():
        store = KeyStore("keys")
        store.create_table(table_definition(ROOT / "template.yaml"))
        yield store


def test_keys_count_embedding_tokens_against_limits_and_in_usage(store: KeyStore) -> None:
    # GIVEN a key with a tokens-per-minute limit and a budget, and a backend counting 42 tokens
    key, record = store.create("embedder", tpm=100, budget=1_000)
    s = load_settings({}, provider="local", auth="api_key", keys_table="keys",
                      key_cache_ttl_s=0, metrics=False)
    app = App(s, gate=Gate(s, store),
              router=Router(s, ScriptedProvider(), embedder=CountingEmbedder(42)))
    auth = {**JSON, "authorization": f"Bearer {key}"}
    # WHEN it embeds three inputs
    response = app.handle(chat_event({"model": "counted", "input": ["a", "b", "c"]},
                                     path=PATH, headers=auth))
    doc = json.loads(body_bytes(response))
    response.close()
    # THEN the answer and the key's usage record carry the backend's 42 input tokens, no output
    assert response.status == 200, doc
    assert doc["usage"] == {"prompt_tokens": 42, "total_tokens": 42}
    today = datetime.now(UTC).date()
    (usage,) = store.usage(record.id, today.replace(day=1), today)
    assert (usage.model, usage.requests, usage.prompt_tokens, usage.completion_tokens) == (
        "counted", 1, 42, 0)
    assert response.headers["x-ratelimit-limit-tokens"] == "100"
    # and an input larger than the key's minute could ever hold is a 400 naming input
    big = app.handle(chat_event({"model": "counted", "input": "x" * 500}, path=PATH,
                                headers=auth))
    error = json.loads(body_bytes(big))["error"]
    big.close()
    assert (big.status, error["param"], error["code"]) == (
        400, "input", "request_too_large_for_limit")
