"""Event adapter: Lambda Function URL (payload v2.0) and API Gateway REST (v1) events → HttpRequest.

Shapes: https://docs.aws.amazon.com/lambda/latest/dg/urls-invocation.html#urls-payloads and
https://docs.aws.amazon.com/apigateway/latest/developerguide/set-up-lambda-proxy-integrations.html

Nothing in an event is trusted to have its documented shape: a field of the wrong type is a
400, never an exception. Text that cannot be UTF-8 (a lone surrogate, which JSON can carry as
``"\\ud800"``) is refused here and by :func:`invalid_text` for the body, the one text check of
the service, so nothing downstream has to expect it.
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
    # The domain the request was sent to (requestContext.domainName): the Function URL's or
    # the API's own, whose HTTPS origin is the origin of a page the function serves.
    domain: str = ""
    # The query string's parameters (the last value of a repeated one).
    query: Mapping[str, str] = field(default_factory=dict)


def parse_event(event: Mapping[str, Any]) -> HttpRequest:
    """Read a Function URL v2 or a REST v1 event; anything else is a 400."""
    if not isinstance(event, Mapping):
        raise RequestError("Unsupported event: expected an HTTP event object")
    context = _mapping(event.get("requestContext"), "requestContext")
    if event.get("version") == "2.0" and isinstance(context.get("http"), Mapping):
        http = context["http"]
        method = http.get("method")
        path = event.get("rawPath") or http.get("path") or "/"
        headers = _headers(event.get("headers"))
        authorizer = _mapping(context.get("authorizer"), "requestContext.authorizer")
        iam = _mapping(authorizer.get("iam"), "requestContext.authorizer.iam")
        principal = iam.get("userArn")
        query = _query_string(_string(event.get("rawQueryString") or "", "rawQueryString"))
    elif "httpMethod" in event:
        method = event.get("httpMethod")
        path = event.get("path") or "/"
        headers = _headers(event.get("headers"))
        multi = _mapping(event.get("multiValueHeaders"), "multiValueHeaders")
        for name, values in multi.items():
            if isinstance(values, list) and len(values) > 1:
                headers[str(name).lower()] = ",".join(str(v) for v in values)
        identity = _mapping(context.get("identity"), "requestContext.identity")
        principal = identity.get("userArn")
        query = {str(k): _string(v, "queryStringParameters") for k, v in
                 _mapping(event.get("queryStringParameters"), "queryStringParameters").items()
                 if v is not None}
    else:
        raise RequestError("Unsupported event: expected a Function URL or API Gateway event")
    request = HttpRequest(
        method=_string(method, "method").upper(),
        path=_string(path, "path"),
        headers=headers,
        body=_body(event),
        request_id=_string(context.get("requestId") or "", "requestContext.requestId"),
        principal=_string(principal or "", "principal"),
        domain=_string(context.get("domainName") or "", "requestContext.domainName"),
        query=query,
    )
    for name, value in (("method", request.method), ("path", request.path),
                        *request.headers.items(), *request.query.items()):
        if not _is_utf8(value) or not _is_utf8(name):
            raise RequestError(f"The request's {name if _is_utf8(name) else 'headers'} "
                               "hold text that is not valid Unicode")
    return request


def invalid_text(document: Any) -> str | None:
    """The path (``messages[0].content``) of the first string in a decoded JSON document that
    has no UTF-8 form (a lone surrogate), or None. Object keys are checked too (reported as
    the object's path). Iterative, so any depth ``json.loads`` accepted is fine."""
    stack: list[tuple[Any, str]] = [(document, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if not _is_utf8(value):
                return where or "body"
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            for key in value:
                if not _is_utf8(key):
                    return where or "body"
            stack.extend((item, f"{where}.{key}" if where else key)
                         for key, item in reversed(list(value.items())))
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _mapping(value: object, name: str) -> Mapping[str, Any]:
    """An object field of the event, ``{}`` when absent; another type is a 400."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RequestError(f"Malformed event: '{name}' must be an object")
    return value


def _string(value: object, name: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise RequestError(f"Malformed event: '{name}' must be a string")
    return value


def _query_string(raw: str) -> dict[str, str]:
    """``a=1&b=x%20y`` → ``{"a": "1", "b": "x y"}`` (what cannot be decoded is replaced)."""
    from urllib.parse import parse_qsl

    try:
        return dict(parse_qsl(raw, keep_blank_values=True, max_num_fields=100))
    except ValueError as e:
        raise RequestError("The query string has too many parameters") from e


def _headers(headers: object) -> dict[str, str]:
    return {str(k).lower(): _string(v, "headers")
            for k, v in _mapping(headers, "headers").items() if v is not None}


def _body(event: Mapping[str, Any]) -> bytes | None:
    body = event.get("body")
    if body is None:
        return None
    if not isinstance(body, str):
        raise RequestError("Invalid JSON body")
    if event.get("isBase64Encoded") is True:
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError("Invalid JSON body") from e
    # A text body arrived as a str; surrogates (from invalid input) fail here, not later.
    try:
        return body.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError("Invalid JSON body") from e
