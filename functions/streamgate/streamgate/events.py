"""Event adapter: Lambda Function URL (payload v2.0) and API Gateway REST (v1) events → HttpRequest.

Shapes: https://docs.aws.amazon.com/lambda/latest/dg/urls-invocation.html#urls-payloads and
https://docs.aws.amazon.com/apigateway/latest/developerguide/set-up-lambda-proxy-integrations.html
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamgate.errors import RequestError


@dataclass(frozen=True, slots=True)
class HttpRequest:
    method: str
    path: str
    # Lower-cased names; repeated headers joined with "," as Function URLs do.
    headers: Mapping[str, str] = field(default_factory=dict)
    # Raw body bytes after base64 decoding; None when the event had no body.
    body: bytes | None = None
    request_id: str = ""
    # The caller's IAM ARN when AWS_IAM auth signed the request (Function URL or REST API);
    # "" when nothing authenticated it.
    principal: str = ""


def parse_event(event: Mapping[str, Any]) -> HttpRequest:
    """Read a Function URL v2 or a REST v1 event; anything else is a 400."""
    if not isinstance(event, Mapping):
        raise RequestError("Unsupported event: expected an HTTP event object")
    context = event.get("requestContext") or {}
    if event.get("version") == "2.0" and isinstance(context.get("http"), Mapping):
        method = context["http"].get("method", "")
        path = event.get("rawPath") or context["http"].get("path") or "/"
        headers = _lower(event.get("headers"))
        iam = (context.get("authorizer") or {}).get("iam") or {}
        principal = iam.get("userArn") if isinstance(iam, Mapping) else None
    elif "httpMethod" in event:
        method = event.get("httpMethod") or ""
        path = event.get("path") or "/"
        headers = _lower(event.get("headers"))
        for name, values in (event.get("multiValueHeaders") or {}).items():
            if isinstance(values, list) and len(values) > 1:
                headers[name.lower()] = ",".join(str(v) for v in values)
        identity = context.get("identity") or {}
        principal = identity.get("userArn") if isinstance(identity, Mapping) else None
    else:
        raise RequestError("Unsupported event: expected a Function URL or API Gateway event")
    return HttpRequest(
        method=str(method).upper(),
        path=str(path),
        headers=headers,
        body=_body(event),
        request_id=str(context.get("requestId") or ""),
        principal=str(principal or ""),
    )


def _lower(headers: object) -> dict[str, str]:
    if not isinstance(headers, Mapping):
        return {}
    return {str(k).lower(): str(v) for k, v in headers.items() if v is not None}


def _body(event: Mapping[str, Any]) -> bytes | None:
    body = event.get("body")
    if body is None:
        return None
    if not isinstance(body, str):
        raise RequestError("Invalid JSON body")
    if event.get("isBase64Encoded"):
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError("Invalid JSON body") from e
    # A text body arrived as a str; surrogates (from invalid input) fail here, not later.
    try:
        return body.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError("Invalid JSON body") from e
