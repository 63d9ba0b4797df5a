"""The Embeddings dialect: ``POST /v1/embeddings``.

Requests follow OpenAI's (https://platform.openai.com/docs/api-reference/embeddings/create):
``input`` (a string, an array of strings, a token array or an array of token arrays),
``model``, ``encoding_format`` (``float``, the default, or ``base64``), ``dimensions``,
``user``; and ``input_type``, Cohere Embed's, as our extension. A field this API does not have
is a 400 naming it; what only some models honour is checked against the chosen one
(:func:`streamgate.providers.embedding.check_embedding`).

Bounds, each a 400 naming ``input`` (the body's size is a 413, as for every path): at most
:data:`MAX_INPUTS` inputs, none empty, each at most :data:`MAX_INPUT_CHARS` characters (or
:data:`MAX_INPUT_TOKENS` tokens), all of them together at most ``max_input_chars`` (the chat
cap). A model with a smaller context refuses a longer input itself (400), never cutting it.

The answer is one JSON document, not a stream: ``{"object": "list", "data": [{"object":
"embedding", "index": i, "embedding": ...}], "model", "usage": {"prompt_tokens",
"total_tokens"}}``, in input order. With ``encoding_format: "base64"`` each ``embedding`` is
the base64 of the vector's little-endian float32 bytes, as OpenAI encodes it (the openai SDKs
ask for that by default and decode it). Errors are OpenAI's, as Chat Completions gives them.
"""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from streamgate import sse
from streamgate.dialects.chat import JSON_HEADERS, error_response
from streamgate.errors import RequestError, StreamgateError
from streamgate.providers.embedding import COHERE_INPUT_TYPES, MAX_DIMENSIONS, EmbeddingRequest
from streamgate.validation import is_int, model_name, optional

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.dialects import Call
    from streamgate.events import HttpRequest
    from streamgate.providers.embedding import Embeddings

PATH = "/v1/embeddings"
FIELDS = ("input", "model", "encoding_format", "dimensions", "user", "input_type")
ENCODINGS = ("float", "base64")
MAX_INPUTS = 2_048  # OpenAI's limit per request
MAX_INPUT_CHARS = 32_768  # ~8,192 tokens, OpenAI's per-input limit
MAX_INPUT_TOKENS = 8_192
_MAX_TOKEN_ID = 2**31 - 1


@dataclass(frozen=True, slots=True)
class EmbeddingsParsed:
    request: EmbeddingRequest


class EmbeddingsDialect:
    name = "embeddings"
    path = PATH
    # Not a chat stream: the pipeline answers it with one call (handler._embed). The same word
    # is the request's gen_ai operation name in its log record.
    operation = "embeddings"

    def __init__(self, settings: Settings) -> None:
        self._settings = settings

    def parse(self, data: Mapping[str, Any], call: Call) -> EmbeddingsParsed:
        return parse_request(data, self._settings)

    def document(self, parsed: EmbeddingsParsed, model: str, result: Embeddings) -> bytes:
        return sse.json_bytes(response_document(result, model,
                                                parsed.request.encoding_format))

    def headers(self) -> Mapping[str, str]:
        return JSON_HEADERS

    def error(self, err: StreamgateError, *, stream: bool) -> tuple[int, dict[str, str], bytes]:
        return error_response(err)

    def resources(self) -> dict[str, tuple[str, ...]]:
        return {}

    def resource_methods(self, path: str) -> tuple[str, ...]:
        return ()

    def resource(self, request: HttpRequest, call: Call) -> tuple[int, Mapping[str, Any]]:
        raise AssertionError("Embeddings has no resource paths")


def parse_request(data: Mapping[str, Any], settings: Settings) -> EmbeddingsParsed:
    """Validate a decoded body. Raises :class:`RequestError` naming the offending ``param``."""
    for key, value in data.items():
        if key not in FIELDS and value is not None:
            raise RequestError(f"Unrecognized request argument supplied: {key}", param=key)
    if "input" not in data or data["input"] is None:
        raise RequestError("'input' is required", param="input")
    inputs, tokens = _inputs(data["input"], settings)
    encoding = optional(data, "encoding_format", str) or "float"
    if encoding not in ENCODINGS:
        raise RequestError("'encoding_format' must be 'float' or 'base64'",
                           param="encoding_format")
    dimensions = optional(data, "dimensions", int)
    if dimensions is not None and not 1 <= dimensions <= MAX_DIMENSIONS:
        raise RequestError(f"'dimensions' must be from 1 to {MAX_DIMENSIONS}",
                           param="dimensions")
    input_type = optional(data, "input_type", str)
    if input_type is not None and input_type not in COHERE_INPUT_TYPES:
        raise RequestError("'input_type' must be one of " + ", ".join(COHERE_INPUT_TYPES),
                           param="input_type")
    request = EmbeddingRequest(model=model_name(data), inputs=inputs, tokens=tokens,
                               dimensions=dimensions, user=optional(data, "user", str),
                               input_type=input_type, encoding_format=encoding)
    return EmbeddingsParsed(request)


def _inputs(value: object, settings: Settings) -> tuple[
        tuple[str, ...] | tuple[tuple[int, ...], ...], bool]:
    """``input`` → (strings, False) or (token arrays, True), within the bounds."""
    if isinstance(value, str):
        return (_text(value, "input"),), False
    if not isinstance(value, list) or not value:
        raise RequestError("'input' must be a non-empty string, array of strings, token array "
                           "or array of token arrays", param="input")
    if all(is_int(v) for v in value):
        return (_token_array(value, "input"),), True
    if len(value) > MAX_INPUTS:
        raise RequestError(f"'input' has {len(value)} items; at most {MAX_INPUTS} are allowed "
                           "per request", param="input")
    if all(isinstance(v, str) for v in value):
        texts = tuple(_text(v, f"input[{i}]") for i, v in enumerate(value))
        total = sum(len(t) for t in texts)
        if total > settings.max_input_chars:
            raise RequestError(f"'input' has {total} characters in all; at most "
                               f"{settings.max_input_chars} are allowed per request",
                               param="input")
        return texts, False
    if all(isinstance(v, list) for v in value):
        return tuple(_token_array(v, f"input[{i}]") for i, v in enumerate(value)), True
    raise RequestError("'input' must be all strings or all token arrays", param="input")


def _text(text: str, at: str) -> str:
    if not text:
        raise RequestError(f"'{at}' must not be empty", param=at)
    if len(text) > MAX_INPUT_CHARS:
        raise RequestError(f"'{at}' has {len(text)} characters; at most {MAX_INPUT_CHARS} are "
                           "allowed per input", param=at)
    return text


def _token_array(tokens: Sequence[object], at: str) -> tuple[int, ...]:
    if not tokens:
        raise RequestError(f"'{at}' must not be empty", param=at)
    if len(tokens) > MAX_INPUT_TOKENS:
        raise RequestError(f"'{at}' has {len(tokens)} tokens; at most {MAX_INPUT_TOKENS} are "
                           "allowed per input", param=at)
    if not all(is_int(t) and 0 <= t <= _MAX_TOKEN_ID for t in tokens):  # type: ignore[operator]
        raise RequestError(f"'{at}' must hold token ids (integers from 0)", param=at)
    return tuple(tokens)  # type: ignore[arg-type]


def response_document(result: Embeddings, model: str, encoding: str) -> dict[str, Any]:
    tokens = result.prompt_tokens
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i,
                  "embedding": encode_base64(v) if encoding == "base64" else v}
                 for i, v in enumerate(result.vectors)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def encode_base64(vector: Sequence[float]) -> str:
    """OpenAI's base64 encoding: the vector's float32 values, little-endian, as one string."""
    packed = array("f", vector)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")
