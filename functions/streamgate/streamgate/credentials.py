"""The upstream API key: from AWS Secrets Manager, SSM Parameter Store, or the environment.

The key is read once when the provider is built (so a missing secret is a Lambda init error,
reported with a clear message) and then reused for ``ttl_s`` seconds per container; a refresh
that fails keeps the previous key and logs the reason. The key itself is never logged, never
put in an error message, and not shown in ``repr()``. boto3 is imported only when a secret or
parameter is configured.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from streamgate.errors import ConfigError

if TYPE_CHECKING:
    from streamgate.config import Settings

logger = logging.getLogger(__name__)

# Field names tried, in order, when a secret holds a JSON object rather than the bare key.
_JSON_FIELDS = ("api_key", "apiKey", "key", "OPENAI_API_KEY")


class ApiKey:
    """A cached key with a time-to-live; ``get()`` returns "" when no key is configured."""

    def __init__(self, fetch: Callable[[], str] | None, ttl_s: float, *, value: str = "",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch = fetch
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._value = value
        self._expires = float("-inf")

    def __repr__(self) -> str:
        return "ApiKey(<hidden>)"

    def get(self) -> str:
        """The key. One thread refreshes an expired key while the others go on with the key
        they have (concurrent invocations must not all queue behind one Secrets Manager
        call); only the very first read, with no key yet, waits for it."""
        if self._fetch is None or self._clock() < self._expires:
            return self._value
        if not self._lock.acquire(blocking=not self._value):
            return self._value  # being refreshed by another thread
        try:
            if self._clock() >= self._expires:
                try:
                    self._value = self._fetch()
                except ConfigError:
                    if not self._value:
                        raise
                    logger.warning("could not refresh the upstream API key; keeping the old one",
                                   exc_info=True)
                self._expires = self._clock() + self._ttl_s
            return self._value
        finally:
            self._lock.release()

    def invalidate(self) -> None:
        """Read the key again on next use (the upstream rejected it: it may have rotated)."""
        with self._lock:
            self._expires = float("-inf")


def api_key(settings: Settings) -> ApiKey:
    """The configured key source; at most one may be set."""
    sources = [name for name, value in (
        ("STREAMGATE_UPSTREAM_API_KEY_SECRET", settings.upstream_api_key_secret),
        ("STREAMGATE_UPSTREAM_API_KEY_PARAMETER", settings.upstream_api_key_parameter),
        ("STREAMGATE_UPSTREAM_API_KEY", settings.upstream_api_key)) if value]
    if len(sources) > 1:
        raise ConfigError(f"Set only one of {', '.join(sources)}")
    ttl = settings.upstream_api_key_ttl_s
    if settings.upstream_api_key_secret:
        secret_id = settings.upstream_api_key_secret
        key = ApiKey(lambda: read_secret(secret_id), ttl)
    elif settings.upstream_api_key_parameter:
        name = settings.upstream_api_key_parameter
        key = ApiKey(lambda: read_parameter(name), ttl)
    else:
        key = ApiKey(None, ttl, value=settings.upstream_api_key)
    key.get()  # fail now, at init, rather than on the first request
    return key


def read_secret(secret_id: str) -> str:
    """A Secrets Manager secret (name or ARN): the bare string, or one field of a JSON object."""
    client = _client("secretsmanager", _arn_region(secret_id))
    try:
        value = client.get_secret_value(SecretId=secret_id).get("SecretString")
    except Exception as e:
        raise _lookup_error(e, f"Secrets Manager secret {secret_id!r}") from e
    if not value:
        raise ConfigError(f"Secrets Manager secret {secret_id!r} has no string value")
    return _from_json(value, f"Secrets Manager secret {secret_id!r}")


def read_parameter(name: str) -> str:
    """An SSM parameter (name or ARN), decrypted if it is a SecureString."""
    client = _client("ssm", _arn_region(name))
    try:
        value = str(client.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"])
    except Exception as e:
        raise _lookup_error(e, f"SSM parameter {name!r}") from e
    return _from_json(value, f"SSM parameter {name!r}")


def _from_json(value: str, what: str) -> str:
    text = value.strip()
    if not text.startswith("{"):
        return text
    try:
        doc = json.loads(text)
    except ValueError:
        return text
    for field in _JSON_FIELDS:
        if isinstance(doc.get(field), str) and doc[field]:
            return str(doc[field])
    raise ConfigError(f"{what} is a JSON object without any of {', '.join(_JSON_FIELDS)}")


def _lookup_error(exc: Exception, what: str) -> ConfigError:
    """A clear message from the AWS error code; never the secret, never the raw response."""
    code = ""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
    if code in ("ResourceNotFoundException", "ParameterNotFound"):
        return ConfigError(f"{what} does not exist")
    if code in ("AccessDeniedException", "AccessDenied"):
        return ConfigError(f"The function is not allowed to read {what}")
    return ConfigError(f"Could not read {what}: {code or type(exc).__name__}")


def _arn_region(identifier: str) -> str | None:
    """The region inside an ARN (arn:partition:service:region:...), else the default."""
    parts = identifier.split(":")
    return parts[3] or None if identifier.startswith("arn:") and len(parts) > 3 else None


def _client(service: str, region: str | None) -> Any:
    from streamgate import aws

    # botocore logs whole response bodies at DEBUG, the secret value included: keep that
    # logger at INFO or above even when someone turns on DEBUG logging for everything.
    parsers = logging.getLogger("botocore.parsers")
    if parsers.getEffectiveLevel() < logging.INFO:
        parsers.setLevel(logging.INFO)
    return aws.client(service, region_name=region)
