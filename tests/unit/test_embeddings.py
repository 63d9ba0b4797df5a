"""The embeddings dialect's pure parts: OpenAI's base64 encoding, the request parser, and the
table of what each embedding model gives and takes."""

from __future__ import annotations

import base64
import struct

import pytest

from streamgate.config import load_settings
from streamgate.dialects.embeddings import encode_base64, parse_request
from streamgate.errors import ConfigError, RequestError
from streamgate.providers.embedding import (
    EmbeddingModel,
    EmbeddingRequest,
    check_embedding,
    configured_models,
    model_info,
)

SETTINGS = load_settings({})


@pytest.mark.parametrize(("vector", "encoded"), [
    ([1.0, -2.0], "AACAPwAAAMA="),  # b"\x00\x00\x80?" b"\x00\x00\x00\xc0": little-endian
    ([0.0], "AAAAAA=="),
    ([0.1], "zczMPQ=="),  # 0.1 rounded to float32, as OpenAI sends it
    ([], ""),
])
def test_base64_is_little_endian_float32_as_openai_encodes_it(vector: list[float],
                                                               encoded: str) -> None:
    assert encode_base64(vector) == encoded
    raw = base64.b64decode(encoded)
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(vector)


@pytest.mark.parametrize(("body", "inputs", "tokens"), [
    ({"input": "one"}, ("one",), False),
    ({"input": ["a", "b"]}, ("a", "b"), False),
    ({"input": [1, 2, 3]}, ((1, 2, 3),), True),
    ({"input": [[1], [2, 3]]}, ((1,), (2, 3)), True),
])
def test_every_form_of_input_openai_takes_is_parsed(body: dict[str, object],
                                                    inputs: tuple[object, ...],
                                                    tokens: bool) -> None:
    request = parse_request(body, SETTINGS).request
    assert (request.inputs, request.tokens, request.encoding_format) == (inputs, tokens, "float")


@pytest.mark.parametrize(("body", "param"), [
    ({"input": [[1], "a"]}, "input"),
    ({"input": [[]]}, "input[0]"),
    ({"input": [[-1]]}, "input[0]"),
    ({"input": [True]}, "input"),
    ({"input": [[1.5]]}, "input[0]"),
    ({"input": "x", "input_type": "query"}, "input_type"),
    ({"input": "x", "user": 3}, "user"),
    ({"input": "x", "model": " "}, "model"),
    ({"input": "x", "stream": True}, "stream"),
])
def test_malformed_requests_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_request(body, SETTINGS)
    assert caught.value.param == param


def test_null_optional_fields_say_nothing() -> None:
    request = parse_request({"input": "x", "dimensions": None, "encoding_format": None,
                             "user": None, "extra": None}, SETTINGS).request
    assert (request.dimensions, request.encoding_format, request.user) == (None, "float", None)


@pytest.mark.parametrize(("kind", "model", "dimensions", "size"), [
    ("local", "all-minilm-l6-v2", None, 384),
    ("bedrock", "amazon.titan-embed-text-v2:0", None, 1024),
    ("bedrock", "amazon.titan-embed-text-v2:0", 256, 256),
    ("bedrock", "cohere.embed-multilingual-v3", None, 1024),
    ("bedrock", "us.cohere.embed-english-v3", None, 1024),
    ("openai", "nomic-embed-text", 768, 768),
])
def test_sizes_are_documented_or_configured(kind: str, model: str, dimensions: int | None,
                                            size: int) -> None:
    info = model_info(kind, model, dimensions)
    assert info is not None and info.dimensions == size


@pytest.mark.parametrize(("kind", "model"), [
    ("bedrock", "amazon.nova-lite-v1:0"), ("openai", "gpt-4o-mini"), ("local", "gemma-3-270m")])
def test_a_chat_model_is_not_an_embedding_model(kind: str, model: str) -> None:
    assert model_info(kind, model, None) is None


@pytest.mark.parametrize(("kind", "model", "dimensions"), [
    ("bedrock", "amazon.titan-embed-text-v2:0", 300),
    ("bedrock", "cohere.embed-english-v3", 512),
    ("local", "all-minilm-l6-v2", 768),
    ("openai", "e5", 0),
])
def test_a_size_the_model_cannot_give_is_a_config_error(kind: str, model: str,
                                                        dimensions: int) -> None:
    with pytest.raises(ConfigError):
        model_info(kind, model, dimensions)


def test_configured_models_read_public_names_backend_models_and_sizes() -> None:
    settings = load_settings({}, embedding_models=(
        "amazon.titan-embed-text-v2:0", "docs=amazon.titan-embed-text-v2:0@512"))
    models = configured_models(settings, "bedrock")
    assert {name: (m.model, m.dimensions) for name, m in models.items()} == {
        "amazon.titan-embed-text-v2:0": ("amazon.titan-embed-text-v2:0", 1024),
        "docs": ("amazon.titan-embed-text-v2:0", 512)}
    with pytest.raises(ConfigError, match="needs its size"):
        configured_models(load_settings({}, embedding_models=("e5",)), "openai")
    with pytest.raises(ConfigError, match="not name"):
        configured_models(load_settings({}, embedding_models=("e5@big",)), "openai")


@pytest.mark.parametrize(("request_", "info", "param"), [
    (EmbeddingRequest("m", ("x",), dimensions=512), EmbeddingModel("m", 384), "dimensions"),
    (EmbeddingRequest("m", ((1,),), tokens=True), EmbeddingModel("m", 384), "input"),
    (EmbeddingRequest("m", ("x",), input_type="search_query"), EmbeddingModel("m", 384),
     "input_type"),
])
def test_what_a_model_cannot_honour_is_a_400(request_: EmbeddingRequest, info: EmbeddingModel,
                                             param: str) -> None:
    with pytest.raises(RequestError) as caught:
        check_embedding(request_, info)
    assert caught.value.param == param
    check_embedding(EmbeddingRequest("m", ("x",), dimensions=384), info)  # its own size: fine
