"""Every failure the service reports, and the only place that maps them to statuses and bodies.

Error bodies follow OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``
(https://platform.openai.com/docs/guides/error-codes). The OpenAI SDKs choose exception classes
by HTTP status, so the status is part of the contract.

Hierarchy::

    StreamgateError                  status, type, code, param; never carries secrets or paths
    ├── ConfigError                  bad server configuration (an init failure on Lambda)
    ├── AuthenticationError          401 missing, unknown or revoked API key
    ├── PermissionDeniedError        403 the backend refused us access
    │   ├── ModelNotAllowedError     403 the caller's key may not use that model
    │   └── OriginNotAllowedError    403 a browser page from an origin not allowed (cors.py)
    ├── RequestError                 400 invalid_request_error
    │   ├── NotFoundError            404 (unknown path, model_not_found)
    │   ├── MethodNotAllowedError    405
    │   ├── PayloadTooLargeError     413
    │   └── HTTPProtocolError        400/408/414/431/505 the dev server could not read the request
    ├── RateLimitError               429, with Retry-After
    ├── UpstreamError                502 the model backend failed
    │   ├── UpstreamUnavailableError 503
    │   └── UpstreamTimeoutError     504
    ├── DeadlineExceededError        504 generation stopped before the Lambda deadline
    ├── ClientClosedError            499 the client left before the answer began (dev server)
    ├── ServiceUnavailableError      503 a dependency of ours (a DynamoDB table) is down
    │   ├── KeyStoreError            (keystore.py) the keys table failed; names the cause for logs
    │   └── ResponseStoreError       (responsestore_dynamodb.py) the Responses store failed
    └── InternalError                500 a bug; its message never leaks internals
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

# Longest Retry-After we send or relay: a backend asking for more (or for ``inf``) is asked
# to be waited a day, which says "long" without promising a time. Our own monthly budget
# refusals point at the start of next month, up to 31 days away.
RETRY_AFTER_CAP_S = 86_400.0
_RETRY_AFTER_MAX_S = 32 * 86_400.0


class StreamgateError(Exception):
    """Base class: a message safe to show to the client, plus OpenAI error fields."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        transient: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = _finite_wait(retry_after)
        # A provider may retry a transient failure, but only before anything reached the client.
        self.transient = transient

    def body(self) -> dict[str, Any]:
        """The OpenAI error object, ``{"error": {...}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        """Extra response headers the status needs (``Retry-After`` for 429/503; the OpenAI
        SDKs also read the exact ``retry-after-ms``)."""
        if self.retry_after is None:
            return {}
        return {"retry-after": str(max(1, math.ceil(self.retry_after))),
                "retry-after-ms": str(max(0, math.ceil(self.retry_after * 1000)))}


def _finite_wait(seconds: float | None) -> float | None:
    """A wait that a header can carry: finite, 0 to 32 days (NaN: none)."""
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), _RETRY_AFTER_MAX_S)


class ConfigError(StreamgateError):
    """The server is misconfigured; on Lambda this is reported as an init error."""

    type = "server_error"
    code = "configuration_error"


class RequestError(StreamgateError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(StreamgateError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"www-authenticate": 'Bearer realm="streamgate"'}


class PermissionDeniedError(StreamgateError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class ModelNotAllowedError(PermissionDeniedError):
    code = "model_not_allowed"


class OriginNotAllowedError(PermissionDeniedError):
    code = "origin_not_allowed"


class NotFoundError(RequestError):
    status = 404
    code = "not_found"


class MethodNotAllowedError(RequestError):
    status = 405
    code = "method_not_allowed"

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message)
        self.allow = allow

    def headers(self) -> dict[str, str]:
        return {"allow": self.allow}


class PayloadTooLargeError(RequestError):
    status = 413
    code = "request_too_large"


class HTTPProtocolError(RequestError):
    """The dev server could not read the HTTP request itself (the status says why)."""

    code = "bad_http_request"

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class RateLimitError(StreamgateError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(StreamgateError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamUnavailableError(UpstreamError):
    status = 503
    code = "upstream_unavailable"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    code = "upstream_timeout"


class DeadlineExceededError(StreamgateError):
    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class ClientClosedError(StreamgateError):
    """Nobody reads this answer: the client closed its connection first (nginx's 499)."""

    status = 499
    type = "client_closed"
    code = "client_closed"


class ServiceUnavailableError(StreamgateError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class InternalError(StreamgateError):
    status = 500
    type = "server_error"
    code = "internal_error"


def from_exception(exc: BaseException) -> StreamgateError:
    """Our error for any exception; unknown ones become a generic 500 that reveals nothing."""
    if isinstance(exc, StreamgateError):
        return exc
    return InternalError("The server had an error while processing your request.")


# What a backend's own message may carry that must never reach our client: bearer tokens,
# OpenAI-style secret keys (also masked, as "sk-abc***xyz"), AWS access key ids.
_SECRET_SHAPES = re.compile(
    r"(?i)\bbearer\s+\S+|\b(?:sk|rk|pk)-[A-Za-z0-9_*.\-]{6,}|\b(?:AKIA|ASIA)[A-Z0-9]{12,}")
_TOKENISH = re.compile(r"[A-Za-z0-9_\-]{8,}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
RELAYED_TEXT_LIMIT = 500


def relayed(text: str, secrets: Iterable[str] = ()) -> str:
    """A backend's message made safe to show our client: secrets we hold (and any fragment of
    eight characters or more of one) and anything shaped like a credential replaced by
    ``[redacted]``, control characters removed, and at most ``RELAYED_TEXT_LIMIT`` characters.
    """
    held = [s for s in secrets if len(s) >= 8]
    for secret in held:
        text = text.replace(secret, "[redacted]")
    text = _SECRET_SHAPES.sub("[redacted]", text)
    if held:
        text = _TOKENISH.sub(
            lambda m: "[redacted]" if any(m.group() in s for s in held) else m.group(), text)
    text = _CONTROL.sub("", text).strip()
    if len(text) > RELAYED_TEXT_LIMIT:
        text = text[: RELAYED_TEXT_LIMIT - 1] + "…"
    return text
