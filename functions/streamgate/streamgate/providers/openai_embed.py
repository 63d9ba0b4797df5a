"""Embeddings from any OpenAI-compatible upstream: ``POST {base_url}/embeddings``.

The request is rebuilt from our validated :class:`EmbeddingRequest` (so only the fields of
OpenAI's contract reach the upstream): ``input`` (strings or token arrays, both of which
OpenAI-compatible servers take), ``model`` (the upstream's name), ``encoding_format`` as the
client asked, ``dimensions`` and ``user`` when set. Transport, timeouts (the whole answer
within the first-token timeout and the deadline), retries and the mapping of an upstream's
HTTP errors to ours are the chat path's (:mod:`streamgate.providers.openai`). The answer is
read defensively: vectors in ``float`` or ``base64`` (little-endian float32) form, put back in
input order by ``index``; anything malformed is an ``upstream_error``. Usage is the upstream's
``prompt_tokens``; a server that reports none (some do not) is charged our estimate.

An upstream model is an embedding model when its size is configured (``name@dimensions`` in
``STREAMGATE_EMBEDDING_MODELS``, ``"dimensions"`` on a route target): nothing else says so.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from typing import TYPE_CHECKING, Any

from streamgate.credentials import ApiKey, api_key
from streamgate.errors import UpstreamError
from streamgate.httpclient import Upstream
from streamgate.providers.embedding import (
    EmbeddingModel,
    EmbeddingRequest,
    Embeddings,
    configured_models,
)
from streamgate.providers.openai import OpenAIProvider
from streamgate.retry import with_retries

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.deadline import Deadline

_BODY_LIMIT = 64 << 20  # 2,048 vectors of 3,072 floats as JSON text
_MAX_TOKENS_REPORTED = 100_000_000
WHO = "The upstream"


class OpenAIEmbedder:
    name = "openai"

    def __init__(self, settings: Settings, key: ApiKey, http: Upstream | None = None) -> None:
        self._settings = settings
        # The chat provider's exchange: same transport, key, timeouts and error mapping.
        self._upstream = OpenAIProvider(settings, key, http)
        self._models = configured_models(settings, "openai")

    def embedding_models(self) -> dict[str, EmbeddingModel]:
        return dict(self._models)

    def close(self) -> None:
        self._upstream.close()

    def embed(self, request: EmbeddingRequest, model: str, deadline: Deadline) -> Embeddings:
        body = json.dumps(upstream_body(request, model), ensure_ascii=False).encode("utf-8")
        s = self._settings

        def attempt() -> Any:
            return iter([self._upstream._fetch_json("POST", "/embeddings", body, _BODY_LIMIT,
                                                    deadline)])

        (doc,) = with_retries(attempt, attempts=s.upstream_max_attempts,
                              backoff_s=s.upstream_backoff_s, deadline=deadline,
                              upstream="Upstream")
        try:
            return read_answer(doc, request)
        except UpstreamError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as e:
            raise UpstreamError(f"{WHO} sent a malformed embeddings answer") from e


def upstream_body(request: EmbeddingRequest, model: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "input": [list(i) for i in request.inputs] if request.tokens else list(request.inputs),
        "encoding_format": request.encoding_format,
    }
    if request.dimensions is not None:
        body["dimensions"] = request.dimensions
    if request.user is not None:
        body["user"] = request.user
    return body


def read_answer(doc: Any, request: EmbeddingRequest) -> Embeddings:
    """An upstream's embeddings list → vectors in input order, and its usage."""
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list) or len(data) != len(request.inputs):
        raise UpstreamError(f"{WHO} did not return one embedding per input")
    vectors: list[list[float] | None] = [None] * len(data)
    for position, item in enumerate(data):
        index = item.get("index", position)
        if isinstance(index, bool) or not isinstance(index, int) or not (
                0 <= index < len(data)) or vectors[index] is not None:
            raise UpstreamError(f"{WHO} sent embeddings with missing or repeated indexes")
        vectors[index] = _vector(item.get("embedding"))
    usage = doc.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if tokens is None:
        tokens = request.estimate_tokens()
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not (
            0 <= tokens <= _MAX_TOKENS_REPORTED):
        raise UpstreamError(f"{WHO} sent an impossible 'prompt_tokens' in its usage")
    return Embeddings([v for v in vectors if v is not None], tokens)


def _vector(value: Any) -> list[float]:
    if isinstance(value, str):  # base64 of little-endian float32
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise UpstreamError(f"{WHO} sent an embedding that is not base64") from None
        if len(raw) % 4:
            raise UpstreamError(f"{WHO} sent a base64 embedding of a partial float")
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    if not isinstance(value, list):
        raise UpstreamError(f"{WHO} sent an embedding that is neither a list nor base64")
    return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]


def build(settings: Settings) -> OpenAIEmbedder:
    return OpenAIEmbedder(settings, api_key(settings))


def create_embedder(settings: Settings) -> OpenAIEmbedder | None:
    """The upstream's embedder when STREAMGATE_EMBEDDING_MODELS names any of its models."""
    if not settings.embedding_models:
        return None
    return build(settings)
