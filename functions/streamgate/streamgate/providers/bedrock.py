"""Amazon Bedrock ConverseStream.

Request and stream mapping per ../shared/DESIGN.md ("Bedrock ConverseStream mapping") and
https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_ConverseStream.html.
The boto3 client is built on first use (importing boto3 costs ~150 ms of cold start) and
reused for the life of the container; tests inject their own.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from streamgate.errors import (
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestError,
    StreamgateError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from streamgate.providers import Delta, Finish, FinishReason, TextDelta, Usage

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.validation import ChatRequest

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "us.amazon.nova-lite-v1:0"

STOP_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}

# Bedrock error code (HTTP errors and in-stream exceptions alike) → our error class.
_ERRORS: dict[str, type[StreamgateError]] = {
    "AccessDeniedException": PermissionDeniedError,
    "UnrecognizedClientException": PermissionDeniedError,
    "ResourceNotFoundException": NotFoundError,
    "ValidationException": RequestError,
    "ThrottlingException": RateLimitError,
    "ServiceQuotaExceededException": RateLimitError,
    "ModelNotReadyException": RateLimitError,
    "ModelTimeoutException": UpstreamTimeoutError,
    "ModelErrorException": UpstreamError,
    "ModelStreamErrorException": UpstreamError,
    "InternalServerException": UpstreamError,
    "ServiceUnavailableException": UpstreamUnavailableError,
}
_RETRY_AFTER_S = 2.0


class BedrockProvider:
    name = "bedrock"
    capabilities: frozenset[str] = frozenset()

    def __init__(self, settings: Settings, client: Any = None) -> None:
        self._settings = settings
        self._client = client
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = _build_client(self._settings)
        return self._client

    def default_model(self) -> str:
        return self._settings.default_model or DEFAULT_MODEL

    def models(self) -> list[str]:
        return list(dict.fromkeys([self.default_model(), *self._settings.bedrock_models]))

    def stream(self, request: ChatRequest, model: str) -> Iterator[Delta]:
        kwargs = converse_request(request, model, self._settings)
        events = None
        try:
            events = self.client.converse_stream(**kwargs)["stream"]
            for event in events:
                yield from _deltas(event)
        except StreamgateError:
            raise
        except Exception as e:
            raise map_error(e) from e
        finally:
            if events is not None:
                events.close()  # client gone or stream failed: free the connection now


def converse_request(request: ChatRequest, model: str, settings: Settings) -> dict[str, Any]:
    """ChatRequest → ConverseStream keyword arguments."""
    if request.temperature is not None and request.temperature > 1:
        raise RequestError("'temperature' must be between 0 and 1 for Bedrock models",
                           param="temperature")
    system = [{"text": m.content} for m in request.messages
              if m.role in ("system", "developer") and m.content]
    messages: list[dict[str, Any]] = []
    for m in request.messages:
        if m.role in ("system", "developer"):
            continue
        block = {"text": m.content}
        if messages and messages[-1]["role"] == m.role:
            messages[-1]["content"].append(block)  # Converse needs alternating roles
        else:
            messages.append({"role": m.role, "content": [block]})
    if not messages:
        raise RequestError("At least one user message is required", param="messages")
    inference: dict[str, Any] = {}
    if request.max_tokens is not None:
        inference["maxTokens"] = request.max_tokens
    if request.temperature is not None:
        inference["temperature"] = request.temperature
    if request.top_p is not None:
        inference["topP"] = request.top_p
    if request.stop:
        inference["stopSequences"] = list(request.stop)
    kwargs: dict[str, Any] = {"modelId": model, "messages": messages}
    if system:
        kwargs["system"] = system
    if inference:
        kwargs["inferenceConfig"] = inference
    if request.user:
        kwargs["requestMetadata"] = {"user": request.user[:256]}
    if settings.bedrock_guardrail_id:
        kwargs["guardrailConfig"] = {
            "guardrailIdentifier": settings.bedrock_guardrail_id,
            "guardrailVersion": settings.bedrock_guardrail_version or "DRAFT",
            "streamProcessingMode": settings.bedrock_guardrail_stream_mode,
        }
    return kwargs


def _deltas(event: dict[str, Any]) -> Iterator[Delta]:
    if "contentBlockDelta" in event:
        text = event["contentBlockDelta"].get("delta", {}).get("text")
        if text:
            yield TextDelta(text)
    elif "messageStop" in event:
        reason = event["messageStop"].get("stopReason", "")
        if reason not in STOP_REASONS:
            raise UpstreamError(f"The model stopped abnormally ({reason or 'no reason'})")
        yield Finish(STOP_REASONS[reason])
    elif "metadata" in event:
        usage = event["metadata"].get("usage")
        if usage:
            output = int(usage.get("outputTokens", 0))
            total = int(usage.get("totalTokens", output + usage.get("inputTokens", 0)))
            yield Usage(prompt_tokens=total - output, completion_tokens=output)
    else:
        for key, value in event.items():  # in-stream exceptions arrive as events too
            if key.endswith("Exception"):
                raise _error(key[0].upper() + key[1:], str(value.get("message", "")))


def map_error(exc: Exception) -> StreamgateError:
    """botocore exceptions → our errors; messages from Bedrock are kept, secrets never appear."""
    from botocore.exceptions import (
        ClientError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        return _error(code[0].upper() + code[1:] if code else "", str(error.get("Message", "")))
    from urllib3.exceptions import ProtocolError
    from urllib3.exceptions import ReadTimeoutError as StreamReadTimeout

    if isinstance(exc, (ReadTimeoutError, ConnectTimeoutError, StreamReadTimeout)):
        return UpstreamTimeoutError("Amazon Bedrock did not answer in time")
    if isinstance(exc, EndpointConnectionError):
        return UpstreamError("Could not reach Amazon Bedrock")
    if isinstance(exc, ProtocolError):
        return UpstreamError("The connection to Amazon Bedrock broke mid-stream")
    logger.exception("unexpected Bedrock failure")
    return UpstreamError("Amazon Bedrock failed unexpectedly")


def _error(code: str, message: str) -> StreamgateError:
    cls = _ERRORS.get(code, UpstreamError)
    text = f"Amazon Bedrock: {message}" if message else f"Amazon Bedrock: {code}"
    if cls is RequestError and _is_context_overflow(message):
        return RequestError(text, param="messages", code="context_length_exceeded")
    if cls is RateLimitError:
        return RateLimitError(text, retry_after=_RETRY_AFTER_S)
    if cls is UpstreamUnavailableError:
        return UpstreamUnavailableError(text, retry_after=_RETRY_AFTER_S)
    if cls is NotFoundError:
        return NotFoundError(text, param="model", code="model_not_found")
    return cls(text)


def _is_context_overflow(message: str) -> bool:
    lowered = message.lower()
    return "too long" in lowered or "context length" in lowered or "too many tokens" in lowered


def _build_client(settings: Settings) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=settings.bedrock_connect_timeout_s,
        read_timeout=settings.bedrock_read_timeout_s,
        retries={"mode": "standard", "total_max_attempts": settings.bedrock_max_attempts},
    )
    return boto3.client("bedrock-runtime", region_name=settings.bedrock_region or None,
                        config=config)


def create(settings: Settings) -> BedrockProvider:
    return BedrockProvider(settings)
