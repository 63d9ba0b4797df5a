"""Browsers: CORS as a Function URL answers it with the template's ``CorsAllowOrigins``
(https://docs.aws.amazon.com/lambda/latest/dg/urls-configuration.html#urls-cors), and the
Origin rule that CORS cannot give.

CORS decides what a page may *read*; it does not stop a page from *sending*. A browser sends a
"simple" cross-origin POST (``text/plain``, form encodings) without asking first, so any page
could make an unauthenticated server generate text. Hence the Origin rule, applied by the
pipeline to every request before any work: a request that carries an ``Origin`` header is
served only if that origin is the server's own (where the playground lives) or one of the
allowed origins; anything else is refused 403. Requests without ``Origin`` (curl, the SDKs,
servers) are not browsers' and pass.

In the cloud the Function URL adds the CORS headers itself, so the handler never does; the
dev server adds them from the same lists. A test keeps these lists equal to the template's
``FunctionUrlConfig.Cors``, which cannot reflect what a preflight asks for: the request headers
are listed one by one (at most 100, each at most 1,024 characters).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit

ALLOW_METHODS = ("POST", "GET", "DELETE")  # DELETE: /v1/responses/{id}
# What browser clients send: ours (the playground, fetch), and the official OpenAI JavaScript
# SDK's own headers (its preflight, captured by tests/integration/test_browser.py, must ask
# for nothing outside this list), plus the headers OpenAI and Anthropic document for clients.
ALLOW_HEADERS = (
    "content-type", "authorization", "accept",
    "x-stainless-arch", "x-stainless-lang", "x-stainless-os", "x-stainless-package-version",
    "x-stainless-retry-count", "x-stainless-runtime", "x-stainless-runtime-version",
    "x-stainless-timeout", "x-stainless-helper-method", "x-stainless-poll-helper",
    "x-stainless-custom-poll-interval",
    "openai-organization", "openai-project", "openai-beta",
    "idempotency-key", "x-request-id", "x-client-request-id",
    # Anthropic's SDK (the Messages dialect) and W3C trace context (streamgate/tracing.py)
    "x-api-key", "anthropic-version", "anthropic-beta",
    "anthropic-dangerous-direct-browser-access", "traceparent", "tracestate",
)
EXPOSE_HEADERS = ("retry-after", "retry-after-ms", "x-request-id",
                  "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                  "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
                  "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
                  "x-streamgate-backend", "request-id")
MAX_AGE = 600


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    """An OPTIONS request a browser sends before the real one (lower-cased header names)."""
    return method == "OPTIONS" and bool(headers.get("access-control-request-method"))


def cors_headers(origins: tuple[str, ...], origin: str | None, *,
                 preflight: bool) -> dict[str, str]:
    """What the Function URL adds for an allowed ``origin``; nothing for others."""
    if not origin or not ("*" in origins or origin in origins):
        return {}
    headers = {"access-control-allow-origin": "*" if "*" in origins else origin,
               "vary": "origin"}
    if preflight:
        headers.update({"access-control-allow-methods": ", ".join(ALLOW_METHODS),
                        "access-control-allow-headers": ", ".join(ALLOW_HEADERS),
                        "access-control-max-age": str(MAX_AGE)})
    else:
        headers["access-control-expose-headers"] = ", ".join(EXPOSE_HEADERS)
    return headers


def origin_allowed(origins: tuple[str, ...], origin: str | None, own: str | None) -> bool:
    """The Origin rule: no ``Origin`` (not a browser page), the server's own origin ``own``,
    or an allowed one (``*`` allows every origin)."""
    if not origin:
        return True
    return "*" in origins or origin in origins or (own is not None and origin == own)


def function_url_origin(domain: str) -> str | None:
    """The origin of a page served by the function itself: its Function URL (or API) domain,
    always HTTPS, from the event's ``requestContext.domainName``."""
    return f"https://{domain}" if domain else None


def local_origin(host: str | None) -> str | None:
    """The dev server's own origin, from the request's ``Host``: ``http://<host>`` when the
    host is ``localhost`` or an IP address, else none. A DNS name is not trusted: a page that
    rebinds its own name to 127.0.0.1 would otherwise pass as the server's own origin (list
    such a name in the allowed origins if you really serve the playground under it)."""
    if not host:
        return None
    try:
        name = urlsplit(f"//{host}").hostname
    except ValueError:
        return None
    if not name:
        return None
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761 §6.3: always loopback
        return f"http://{host.lower()}"
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return None
    return f"http://{host.lower()}"
