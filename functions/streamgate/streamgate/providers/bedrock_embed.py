"""Embeddings on Amazon Bedrock (InvokeModel): Titan Text Embeddings V2 and Cohere Embed v3.

Request and response bodies per https://docs.aws.amazon.com/bedrock/latest/userguide/
model-parameters-titan-embed-text.html and .../model-parameters-embed.html:

- **Titan Text Embeddings V2** (``amazon.titan-embed-text-v2:0``) takes one text per call:
  ``{"inputText", "dimensions": 256|512|1024, "normalize": true}`` → ``{"embedding": [...],
  "inputTextTokenCount"}``. Vectors are asked normalised, as OpenAI's are. Several inputs are
  called concurrently, at most :data:`CONCURRENCY` at a time.
- **Cohere Embed v3** (``cohere.embed-english-v3``, ``cohere.embed-multilingual-v3``) takes up to
  :data:`COHERE_BATCH` texts per call: ``{"texts", "input_type", "truncate": "NONE"}`` →
  ``{"embeddings": [[...]], "id", "response_type", "texts"}``. ``input_type`` is
  ``search_document`` unless the request's ``input_type`` (our extension) says otherwise; a
  text too long is refused (``truncate: NONE``), never cut. Its body reports no usage: the
  tokens are Bedrock's ``X-Amzn-Bedrock-Input-Token-Count`` header (our estimate if absent).

Every call is bounded: botocore's connect and read timeouts, the shared retry policy for
transient errors (throttling...), and the request's deadline, past which the request fails
with 504 and calls still running are left to end on their own. Errors are mapped as the chat
path maps them (:func:`streamgate.providers.bedrock.map_error`): throttling 429 with
Retry-After, validation 400, access 403, unknown model 404.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from streamgate.deadline import DEADLINE_MESSAGE
from streamgate.errors import (
    DeadlineExceededError,
    RequestError,
    StreamgateError,
    UpstreamError,
)
from streamgate.providers.bedrock import BedrockAccess, BedrockProvider, map_error
from streamgate.providers.embedding import (
    COHERE_MODELS,
    TITAN_V2,
    EmbeddingModel,
    EmbeddingRequest,
    Embeddings,
    configured_models,
)
from streamgate.retry import with_retries

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.deadline import Deadline

logger = logging.getLogger(__name__)

CONCURRENCY = 8  # InvokeModel calls in flight for one request
COHERE_BATCH = 96  # Cohere Embed's limit of texts per call
COHERE_INPUT_TYPE = "search_document"
_TOKEN_HEADER = "x-amzn-bedrock-input-token-count"
_MAX_TOKENS_REPORTED = 100_000_000
WHO = "Amazon Bedrock"


class BedrockEmbedder:
    name = "bedrock"

    def __init__(self, settings: Settings, client: Any = None, *,
                 access: BedrockAccess | None = None) -> None:
        self._settings = settings
        # The chat provider's client: built on first use, shared, thread-safe.
        self._bedrock = BedrockProvider(settings, client, access=access)
        self._models = configured_models(settings, "bedrock")

    def embedding_models(self) -> dict[str, EmbeddingModel]:
        return dict(self._models)

    def embed(self, request: EmbeddingRequest, model: str, deadline: Deadline) -> Embeddings:
        if request.tokens:  # check_embedding says so first
            raise UpstreamError("Amazon Bedrock's embedding models take text only")
        texts = [str(i) for i in request.inputs]
        if _is(model, COHERE_MODELS):
            calls = [self._cohere_call(model, texts[i:i + COHERE_BATCH],
                                       request.input_type or COHERE_INPUT_TYPE)
                     for i in range(0, len(texts), COHERE_BATCH)]
        else:
            calls = [self._titan_call(model, text, request.dimensions) for text in texts]
        vectors: list[list[float]] = []
        tokens = 0
        for batch_vectors, batch_tokens in self._run(calls, deadline):
            vectors.extend(batch_vectors)
            tokens += batch_tokens
        return Embeddings(vectors, tokens)

    def _titan_call(self, model: str, text: str, dimensions: int | None,
                    ) -> Callable[[], tuple[list[list[float]], int]]:
        body: dict[str, Any] = {"inputText": text, "normalize": True}
        if dimensions is not None:
            body["dimensions"] = dimensions

        def call() -> tuple[list[list[float]], int]:
            doc, _ = self._invoke(model, body)
            return [_floats(doc["embedding"])], _count(doc.get("inputTextTokenCount"))

        return call

    def _cohere_call(self, model: str, texts: list[str], input_type: str,
                     ) -> Callable[[], tuple[list[list[float]], int]]:
        body = {"texts": texts, "input_type": input_type, "truncate": "NONE"}

        def call() -> tuple[list[list[float]], int]:
            doc, headers = self._invoke(model, body)
            embeddings = doc["embeddings"]
            if isinstance(embeddings, dict):  # asked by type, answered by type
                embeddings = embeddings["float"]
            if not isinstance(embeddings, list) or len(embeddings) != len(texts):
                raise UpstreamError(f"{WHO} did not return one embedding per text")
            reported = headers.get(_TOKEN_HEADER)
            tokens = (_count(int(reported)) if reported is not None
                      else sum(max(1, len(t) // 4) for t in texts))
            return [_floats(e) for e in embeddings], tokens

        return call

    def _invoke(self, model: str, body: dict[str, Any]) -> tuple[Any, dict[str, str]]:
        """One InvokeModel call: the decoded body and the response's HTTP headers."""
        try:
            response = self._bedrock.client.invoke_model(
                modelId=model, body=json.dumps(body, ensure_ascii=False).encode("utf-8"),
                contentType="application/json", accept="application/json")
            raw = response["body"].read()
        except Exception as e:  # noqa: BLE001 - every botocore failure is mapped
            err = map_error(e)
            if isinstance(err, RequestError) and (
                    err.param == "messages" or "too many input tokens" in err.message.lower()):
                # an input too long for the model (Titan: "Too many input tokens"): our field
                err.param, err.code = "input", "context_length_exceeded"
            raise err from e
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise UpstreamError(f"{WHO} sent an answer that is not JSON") from e
        headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        return doc, {str(k).lower(): str(v) for k, v in headers.items()}

    def _run(self, calls: Sequence[Callable[[], tuple[list[list[float]], int]]],
             deadline: Deadline) -> list[tuple[list[list[float]], int]]:
        """Every call's result in order, at most CONCURRENCY at once, each retried under the
        shared policy; the first failure (or the deadline) ends the request."""
        s = self._settings

        def retried(call: Callable[[], tuple[list[list[float]], int]],
                    ) -> tuple[list[list[float]], int]:
            def attempt() -> Any:
                try:
                    return iter([call()])
                except StreamgateError:
                    raise
                except (AttributeError, KeyError, TypeError, ValueError, OverflowError) as e:
                    raise UpstreamError(f"{WHO} sent a malformed embeddings answer") from e

            (result,) = with_retries(attempt, attempts=s.bedrock_max_attempts,
                                     backoff_s=s.bedrock_backoff_s, deadline=deadline,
                                     upstream=WHO, honour_retry_after=False)
            return result  # type: ignore[no-any-return]

        if len(calls) == 1:
            return [retried(calls[0])]
        pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=min(CONCURRENCY, len(calls)), thread_name_prefix="bedrock-embed")
        try:
            futures = [pool.submit(retried, call) for call in calls]
            # Each call is bounded by botocore's timeouts; all of them by the deadline.
            remaining = deadline.remaining()
            done, pending = concurrent.futures.wait(
                futures, timeout=None if math.isinf(remaining) else max(0.0, remaining),
                return_when=concurrent.futures.FIRST_EXCEPTION)
            for future in futures:
                if future in done and future.exception() is not None:
                    raise future.exception()  # type: ignore[misc]
            if pending:
                raise DeadlineExceededError(DEADLINE_MESSAGE)
            return [f.result() for f in futures]
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


def _is(model: str, known: Sequence[str]) -> bool:
    return any(model == k or model.endswith("." + k) for k in known)


def _floats(value: Any) -> list[float]:
    if not isinstance(value, list):
        raise UpstreamError(f"{WHO} sent an embedding that is not a list")
    return value


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (
            0 <= value <= _MAX_TOKENS_REPORTED):
        raise UpstreamError(f"{WHO} sent an impossible token count")
    return value


def create_embedder(settings: Settings) -> BedrockEmbedder | None:
    """Bedrock's embedder when STREAMGATE_EMBEDDING_MODELS names any of its models."""
    if not settings.embedding_models:
        return None
    return BedrockEmbedder(settings)


__all__ = ["BedrockEmbedder", "COHERE_BATCH", "CONCURRENCY", "TITAN_V2", "create_embedder"]
