"""CORS as a Function URL answers it with the template's ``CorsAllowOrigins``
(https://docs.aws.amazon.com/lambda/latest/dg/urls-configuration.html#urls-cors).

In the cloud the Function URL adds these headers itself, so the handler adds them only where
nothing else does: the REST API, whose OPTIONS routes reach the function (API Gateway's proxy
integration passes CORS to the backend), and the dev server. A test keeps the methods, headers
and max-age equal to the template's ``FunctionUrlConfig.Cors``.
"""

from __future__ import annotations

from collections.abc import Mapping

ALLOW_METHODS = ("POST", "GET")
ALLOW_HEADERS = ("content-type", "authorization", "accept")
EXPOSE_HEADERS = ("retry-after", "retry-after-ms", "x-request-id",
                  "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                  "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
                  "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")
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
