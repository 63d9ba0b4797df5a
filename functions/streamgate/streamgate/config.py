"""Settings, read once from the environment into a frozen dataclass.

This is the only module that reads ``os.environ``. Precedence: explicit argument > environment
variable > default (the same order as Powertools' ``resolve_env_var_choice``).
"""

from __future__ import annotations

import contextvars
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from streamgate.errors import ConfigError

# "routes": a routes document maps each public model to its backends (streamgate/routes.py).
PROVIDERS = ("bedrock", "openai", "local", "routes")
# api_key: Bearer keys checked against the keys table; iam: the Function URL's AWS_IAM auth
# (requests must carry a signed identity); none: anyone (local development).
AUTH_MODES = ("api_key", "iam", "none")
RESPONSE_STORES = ("memory", "sqlite", "dynamodb", "off")  # see responsestore.py
# What a browser sends as Origin (RFC 6454 §6.1): scheme://host[:port], nothing after it.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the pipeline and the providers are configured with."""

    provider: str = "bedrock"
    # "none" is the default so local tools and tests need no keys; on Lambda the runtime loop
    # refuses it unless allow_unauthenticated says so (the template always sets the mode).
    auth: str = "none"
    allow_unauthenticated: bool = False
    keys_table: str = ""  # DynamoDB table of keys, limits and usage (auth "api_key")
    # How long a key looked up in the table is trusted per container: revoking a key takes
    # effect within this time.
    key_cache_ttl_s: float = 10.0
    # Longest a keys-table call may take, its retry included; then the request fails closed
    # (503) and what it had reserved is given back.
    keys_timeout_s: float = 3.0
    # Model used when a request names none; empty means "the provider's default".
    default_model: str = ""
    # Origins browsers may call from (the template's CorsAllowOrigins, or "*"). A request
    # carrying any other Origin is refused 403 before any work (the caller's own origin always
    # passes). The Function URL answers CORS itself; the REST API's OPTIONS routes (through
    # the handler) and the dev server answer it from this list.
    cors_origins: tuple[str, ...] = ()
    # Serve the playground page at GET / (the dev server turns it on; the template's
    # Playground parameter, off by default, on Lambda).
    playground: bool = False
    max_body_bytes: int = 1_048_576
    max_prompt_chars: int = 5_000
    # Caps on chat requests: how many messages, and how many characters of text in them all
    # (message text, tool-call arguments and tool definitions).
    max_messages: int = 500
    max_input_chars: int = 400_000
    # Used when a request gives no max_tokens; requests asking for more than the cap get a 400.
    default_max_tokens: int = 1_024
    max_tokens_cap: int = 4_096
    # Generation stops this long before the Lambda deadline so the stream can end cleanly.
    deadline_margin_ms: int = 3_000
    # Telemetry: EMF metrics on stdout, their namespace, X-Ray subsegments for provider calls,
    # and (for debugging only) prompt and completion text in the request log.
    metrics: bool = True
    metrics_namespace: str = "Streamgate"
    tracing: bool = False
    log_content: bool = False
    # With AWS_LAMBDA_MAX_CONCURRENCY > 1: streams under way wait in one relay thread
    # (streamgate.relay), not each in its worker thread.
    relay_loop: bool = True
    # Local (embedded) model.
    local_model_path: str = ""
    # Models served on POST /v1/embeddings by the configured provider (without routes):
    # "name[=backend-model][@dimensions]", comma-separated (providers/embedding.py). Empty:
    # the embedded all-minilm-l6-v2 for the local provider, none for the others.
    embedding_models: tuple[str, ...] = ()
    local_threads: int = 0  # 0 = all available cores
    local_context_tokens: int = 4_096
    # How long a request waits for the embedded model while another request holds it.
    local_queue_timeout_s: float = 120.0
    # min_tokens for requests that set none: the base model ends many answers early (see
    # providers/local.py); 0 lets it stop whenever it likes.
    local_default_min_tokens: int = 384
    # Amazon Bedrock.
    # STREAMGATE_BEDROCK_REGION, else the function's own region (AWS_REGION on Lambda).
    bedrock_region: str = ""
    # Models requests may name (ids or inference profiles); empty: only the default model.
    bedrock_models: tuple[str, ...] = ()
    bedrock_connect_timeout_s: float = 5.0
    # Longest wait from the call to the first content (text, reasoning or a tool call).
    bedrock_first_token_timeout_s: float = 60.0
    # Longest silence between events once content flows.
    bedrock_idle_timeout_s: float = 30.0
    # Attempts for the call, retried (throttling, unavailable, 5xx) only before the first
    # content, with full-jitter exponential backoff from this base, capped at 8x the base.
    bedrock_max_attempts: int = 3
    bedrock_backoff_s: float = 0.5
    bedrock_guardrail_id: str = ""
    bedrock_guardrail_version: str = ""
    bedrock_guardrail_stream_mode: str = "async"
    # OpenAI-compatible upstream (vLLM, Ollama, llama.cpp server, OpenAI, ...).
    upstream_base_url: str = ""  # e.g. http://127.0.0.1:8000/v1
    # Models clients may name: "name" or "public=upstream"; empty: the upstream's /models.
    upstream_models: tuple[str, ...] = ()
    # The API key: from Secrets Manager, from SSM Parameter Store, or given directly (local use).
    upstream_api_key_secret: str = ""
    upstream_api_key_parameter: str = ""
    upstream_api_key: str = field(default="", repr=False)
    upstream_api_key_ttl_s: float = 300.0  # how long a fetched key (and /models) is reused
    upstream_connect_timeout_s: float = 5.0
    upstream_first_token_timeout_s: float = 60.0
    upstream_idle_timeout_s: float = 30.0
    upstream_max_attempts: int = 3
    upstream_backoff_s: float = 0.5
    # A kept-alive connection idle longer than this is not reused (NAT gateways forget silent
    # flows; a request sent on one would wait for its timeout).
    upstream_max_idle_s: float = 60.0
    # Largest upstream SSE event (or line) read; past it the stream ends with upstream_error.
    upstream_max_event_chars: int = 1_048_576
    # Model routes (streamgate/routes.py): the document inline, or "@path" to a file (local
    # use); or the name of an SSM parameter holding it, re-read after routes_ttl_s. Either one
    # makes the deployment routed, whatever the provider setting says.
    routes: str = field(default="", repr=False)
    routes_parameter: str = ""
    routes_ttl_s: float = 60.0
    # How long a route's target is skipped by this container once its backend looks unwell:
    # at once when it throttles, is unavailable, refuses our access or cannot be reached; after
    # route_failures_to_cool failures in a row within route_failure_window_s for what one
    # request may cause (5xx, timeouts, broken or empty streams). A routes document may set
    # its own (cooldown_s, failures_to_cool, failure_window_s); see routes.py.
    route_cooldown_s: float = 30.0
    route_failures_to_cool: int = 3
    route_failure_window_s: float = 60.0
    # Stored responses of the Responses API (responsestore.py): "memory" (this process only,
    # the dev server's), "sqlite" (responses_file: shared by the processes on one machine, the
    # dev server's with --workers), "dynamodb" (responses_table; what Lambda uses) or "off".
    responses_store: str = "memory"
    responses_table: str = ""
    responses_file: str = ""
    responses_ttl_s: float = 30 * 86_400.0  # as long as OpenAI keeps a stored response
    responses_max_bytes: int = 4 << 20  # one record, as compressed JSON
    responses_memory_items: int = 1_000

    @property
    def routed(self) -> bool:
        """Whether a routes document decides which backend serves each model."""
        return bool(self.routes or self.routes_parameter)


_ENV: dict[str, tuple[str, type]] = {
    "provider": ("STREAMGATE_PROVIDER", str),
    "auth": ("STREAMGATE_AUTH", str),
    "allow_unauthenticated": ("STREAMGATE_ALLOW_UNAUTHENTICATED", bool),
    "keys_table": ("STREAMGATE_KEYS_TABLE", str),
    "key_cache_ttl_s": ("STREAMGATE_KEY_CACHE_TTL_S", float),
    "keys_timeout_s": ("STREAMGATE_KEYS_TIMEOUT_S", float),
    "default_model": ("STREAMGATE_DEFAULT_MODEL", str),
    "cors_origins": ("STREAMGATE_CORS_ALLOW_ORIGINS", tuple),
    "playground": ("STREAMGATE_PLAYGROUND", bool),
    "max_body_bytes": ("STREAMGATE_MAX_BODY_BYTES", int),
    "max_prompt_chars": ("STREAMGATE_MAX_PROMPT_CHARS", int),
    "max_messages": ("STREAMGATE_MAX_MESSAGES", int),
    "max_input_chars": ("STREAMGATE_MAX_INPUT_CHARS", int),
    "default_max_tokens": ("STREAMGATE_DEFAULT_MAX_TOKENS", int),
    "max_tokens_cap": ("STREAMGATE_MAX_TOKENS_CAP", int),
    "deadline_margin_ms": ("STREAMGATE_DEADLINE_MARGIN_MS", int),
    "metrics": ("STREAMGATE_METRICS", bool),
    "metrics_namespace": ("STREAMGATE_METRICS_NAMESPACE", str),
    "tracing": ("STREAMGATE_TRACING", bool),
    "log_content": ("STREAMGATE_LOG_CONTENT", bool),
    "relay_loop": ("STREAMGATE_RELAY_LOOP", bool),
    "local_model_path": ("STREAMGATE_LOCAL_MODEL_PATH", str),
    "embedding_models": ("STREAMGATE_EMBEDDING_MODELS", tuple),
    "local_threads": ("STREAMGATE_LOCAL_THREADS", int),
    "local_context_tokens": ("STREAMGATE_LOCAL_CONTEXT_TOKENS", int),
    "local_queue_timeout_s": ("STREAMGATE_LOCAL_QUEUE_TIMEOUT_S", float),
    "local_default_min_tokens": ("STREAMGATE_LOCAL_DEFAULT_MIN_TOKENS", int),
    "bedrock_region": ("STREAMGATE_BEDROCK_REGION", str),
    "bedrock_models": ("STREAMGATE_BEDROCK_MODELS", tuple),
    "bedrock_connect_timeout_s": ("STREAMGATE_BEDROCK_CONNECT_TIMEOUT_S", float),
    "bedrock_first_token_timeout_s": ("STREAMGATE_BEDROCK_FIRST_TOKEN_TIMEOUT_S", float),
    "bedrock_idle_timeout_s": ("STREAMGATE_BEDROCK_IDLE_TIMEOUT_S", float),
    "bedrock_max_attempts": ("STREAMGATE_BEDROCK_MAX_ATTEMPTS", int),
    "bedrock_backoff_s": ("STREAMGATE_BEDROCK_BACKOFF_S", float),
    "bedrock_guardrail_id": ("STREAMGATE_BEDROCK_GUARDRAIL_ID", str),
    "bedrock_guardrail_version": ("STREAMGATE_BEDROCK_GUARDRAIL_VERSION", str),
    "bedrock_guardrail_stream_mode": ("STREAMGATE_BEDROCK_GUARDRAIL_STREAM_MODE", str),
    "upstream_base_url": ("STREAMGATE_UPSTREAM_BASE_URL", str),
    "upstream_models": ("STREAMGATE_UPSTREAM_MODELS", tuple),
    "upstream_api_key_secret": ("STREAMGATE_UPSTREAM_API_KEY_SECRET", str),
    "upstream_api_key_parameter": ("STREAMGATE_UPSTREAM_API_KEY_PARAMETER", str),
    "upstream_api_key": ("STREAMGATE_UPSTREAM_API_KEY", str),
    "upstream_api_key_ttl_s": ("STREAMGATE_UPSTREAM_API_KEY_TTL_S", float),
    "upstream_connect_timeout_s": ("STREAMGATE_UPSTREAM_CONNECT_TIMEOUT_S", float),
    "upstream_first_token_timeout_s": ("STREAMGATE_UPSTREAM_FIRST_TOKEN_TIMEOUT_S", float),
    "upstream_idle_timeout_s": ("STREAMGATE_UPSTREAM_IDLE_TIMEOUT_S", float),
    "upstream_max_attempts": ("STREAMGATE_UPSTREAM_MAX_ATTEMPTS", int),
    "upstream_backoff_s": ("STREAMGATE_UPSTREAM_BACKOFF_S", float),
    "upstream_max_idle_s": ("STREAMGATE_UPSTREAM_MAX_IDLE_S", float),
    "upstream_max_event_chars": ("STREAMGATE_UPSTREAM_MAX_EVENT_CHARS", int),
    "routes": ("STREAMGATE_ROUTES", str),
    "routes_parameter": ("STREAMGATE_ROUTES_PARAMETER", str),
    "routes_ttl_s": ("STREAMGATE_ROUTES_TTL_S", float),
    "route_cooldown_s": ("STREAMGATE_ROUTE_COOLDOWN_S", float),
    "route_failures_to_cool": ("STREAMGATE_ROUTE_FAILURES_TO_COOL", int),
    "route_failure_window_s": ("STREAMGATE_ROUTE_FAILURE_WINDOW_S", float),
    "responses_store": ("STREAMGATE_RESPONSES_STORE", str),
    "responses_table": ("STREAMGATE_RESPONSES_TABLE", str),
    "responses_file": ("STREAMGATE_RESPONSES_FILE", str),
    "responses_ttl_s": ("STREAMGATE_RESPONSES_TTL_S", float),
    "responses_max_bytes": ("STREAMGATE_RESPONSES_MAX_BYTES", int),
    "responses_memory_items": ("STREAMGATE_RESPONSES_MEMORY_ITEMS", int),
}


def _parse(kind: type, raw: str) -> object:
    if kind is tuple:  # a comma-separated list
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(raw)
        return lowered in ("true", "1", "yes")
    return kind(raw)


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    defaults: Mapping[str, str] | None = None,
    **overrides: object,
) -> Settings:
    """Build :class:`Settings` from ``overrides`` > ``environ`` > ``defaults`` > class defaults.

    ``defaults`` lets a driver change a default without hiding the environment (the dev server
    defaults to the ``local`` provider, yet ``STREAMGATE_PROVIDER`` still wins).
    """
    env = os.environ if environ is None else environ
    fallback = defaults or {}
    values: dict[str, object] = {}
    for key, (name, kind) in _ENV.items():
        if key in overrides:
            values[key] = overrides[key]
            continue
        raw = env.get(name, fallback.get(name))
        if raw is None or raw == "":
            continue
        try:
            value = _parse(kind, raw)
        except ValueError as e:
            raise ConfigError(f"{name} must be {kind.__name__}, got {raw!r}") from e
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {raw!r}")
        if isinstance(value, (int, float)) and value < 0:
            raise ConfigError(f"{name} must not be negative, got {raw!r}")
        values[key] = value
    if "bedrock_region" not in values:
        values["bedrock_region"] = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or ""
    cap = values.get("max_tokens_cap")
    if "default_max_tokens" not in values and isinstance(cap, int):
        # A cap under the default's default lowers the default with it: setting the cap alone
        # is enough. Only a default given explicitly above the cap is an error.
        default = Settings.__dataclass_fields__["default_max_tokens"].default
        assert isinstance(default, int)
        values["default_max_tokens"] = min(default, cap)
    unknown = set(overrides) - set(_ENV)
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(sorted(unknown))}")
    settings = Settings(**values)  # type: ignore[arg-type]
    if settings.provider not in PROVIDERS:
        raise ConfigError(
            f"STREAMGATE_PROVIDER must be one of {', '.join(PROVIDERS)}, got {settings.provider!r}"
        )
    if settings.auth not in AUTH_MODES:
        raise ConfigError(
            f"STREAMGATE_AUTH must be one of {', '.join(AUTH_MODES)}, got {settings.auth!r}")
    if settings.auth == "api_key" and not settings.keys_table:
        raise ConfigError("STREAMGATE_AUTH=api_key needs STREAMGATE_KEYS_TABLE (the keys table)")
    if settings.bedrock_guardrail_stream_mode not in ("sync", "async"):
        raise ConfigError("STREAMGATE_BEDROCK_GUARDRAIL_STREAM_MODE must be sync or async")
    if settings.bedrock_max_attempts < 1 or settings.upstream_max_attempts < 1:
        raise ConfigError("STREAMGATE_BEDROCK_MAX_ATTEMPTS and STREAMGATE_UPSTREAM_MAX_ATTEMPTS "
                          "must be at least 1")
    if settings.routes and settings.routes_parameter:
        raise ConfigError("Set only one of STREAMGATE_ROUTES and STREAMGATE_ROUTES_PARAMETER")
    if settings.provider == "routes" and not (settings.routes or settings.routes_parameter):
        raise ConfigError("STREAMGATE_PROVIDER=routes needs STREAMGATE_ROUTES (the document, or "
                          "@file) or STREAMGATE_ROUTES_PARAMETER (an SSM parameter holding it)")
    if not 1 <= settings.route_failures_to_cool <= 100:
        raise ConfigError("STREAMGATE_ROUTE_FAILURES_TO_COOL must be from 1 to 100")
    if not 0 < settings.route_failure_window_s <= 3600:
        raise ConfigError("STREAMGATE_ROUTE_FAILURE_WINDOW_S must be above 0 and at most 3600 "
                          "seconds")
    if settings.responses_store not in RESPONSE_STORES:
        raise ConfigError("STREAMGATE_RESPONSES_STORE must be one of "
                          f"{', '.join(RESPONSE_STORES)}, got {settings.responses_store!r}")
    if settings.responses_store == "dynamodb" and not settings.responses_table:
        raise ConfigError("STREAMGATE_RESPONSES_STORE=dynamodb needs STREAMGATE_RESPONSES_TABLE")
    if settings.responses_store == "sqlite" and not settings.responses_file:
        raise ConfigError("STREAMGATE_RESPONSES_STORE=sqlite needs STREAMGATE_RESPONSES_FILE "
                          "(the database file's path)")
    if settings.keys_timeout_s <= 0:
        raise ConfigError("STREAMGATE_KEYS_TIMEOUT_S must be more than 0")
    if settings.default_max_tokens > settings.max_tokens_cap:
        raise ConfigError("STREAMGATE_DEFAULT_MAX_TOKENS must not exceed STREAMGATE_MAX_TOKENS_CAP")
    for origin in settings.cors_origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ConfigError(
                f"STREAMGATE_CORS_ALLOW_ORIGINS: {origin!r} is not an origin; write "
                "scheme://host[:port] with no path or trailing slash "
                "(http://localhost:3000), or *")
    return settings


@dataclass(frozen=True, slots=True)
class LambdaEnvironment:
    """What the Lambda execution environment tells the runtime loop through its variables
    (https://docs.aws.amazon.com/lambda/latest/dg/configuration-envvars.html#configuration-envvars-runtime).
    """

    runtime_api: str
    function_name: str = ""
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 0
    log_group_name: str = ""
    log_stream_name: str = ""
    # `sam local` sets AWS_SAM_LOCAL=true in its containers; it cannot read a streamed response.
    sam_local: bool = False
    # Lambda Managed Instances: how many invocations Lambda may send this environment at once
    # (AWS_LAMBDA_MAX_CONCURRENCY, the function's PerExecutionEnvironmentMaxConcurrency).
    # 1 when unset, as on classic Lambda; a value that is not a whole number from 1 to
    # MAX_CONCURRENCY is 1, as aws-lambda-go and SAM CLI read it.
    max_concurrency: int = 1


# PerExecutionEnvironmentMaxConcurrency's upper bound (AWS::Lambda::Function
# LambdaManagedInstancesCapacityProviderConfig).
MAX_CONCURRENCY = 1600


def load_lambda_environment(environ: Mapping[str, str] | None = None) -> LambdaEnvironment:
    env = os.environ if environ is None else environ
    runtime_api = env.get("AWS_LAMBDA_RUNTIME_API", "")
    if not runtime_api:
        raise ConfigError("AWS_LAMBDA_RUNTIME_API is not set: this runs inside Lambda only")
    memory = _whole_number(env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", ""))
    raw_concurrency = env.get("AWS_LAMBDA_MAX_CONCURRENCY", "")
    concurrency = _whole_number(raw_concurrency)
    if concurrency is None or not 1 <= concurrency <= MAX_CONCURRENCY:
        if raw_concurrency.strip():
            logging.getLogger(__name__).warning(
                "AWS_LAMBDA_MAX_CONCURRENCY=%r is not a whole number from 1 to %d: serving one "
                "invocation at a time", raw_concurrency[:40], MAX_CONCURRENCY)
        concurrency = 1
    return LambdaEnvironment(
        runtime_api=runtime_api,
        function_name=env.get("AWS_LAMBDA_FUNCTION_NAME", ""),
        function_version=env.get("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        memory_limit_in_mb=memory or 0,
        log_group_name=env.get("AWS_LAMBDA_LOG_GROUP_NAME", ""),
        log_stream_name=env.get("AWS_LAMBDA_LOG_STREAM_NAME", ""),
        sam_local=env.get("AWS_SAM_LOCAL", "").lower() == "true",
        max_concurrency=concurrency,
    )


def _whole_number(text: str) -> int | None:
    """ASCII digits only, at most 9 of them, spaces around allowed: ``str.isdigit`` would pass
    "²" and "١٢", and ``int`` refuses a number of over 4,300 digits."""
    text = text.strip()
    return int(text) if re.fullmatch(r"[0-9]{1,9}", text) else None


# This invocation's X-Ray trace header, per thread: with AWS_LAMBDA_MAX_CONCURRENCY > 1 several
# invocations run at once in one process, and each must see its own (telemetry reads it).
_TRACE_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("streamgate_trace_id")
_TRACE_HEADER = "_X_AMZN_TRACE_ID"


def set_trace_id(trace_id: str | None, *, process_wide: bool = True) -> None:
    """Make ``trace_id`` (``Lambda-Runtime-Trace-Id``) this thread's trace header, for
    :func:`trace_id`. ``process_wide`` also exposes it as the SDKs expect, in
    ``_X_AMZN_TRACE_ID`` (botocore forwards that as ``X-Amzn-Trace-Id``): right when one
    invocation runs at a time, wrong when several do, since the variable is the process's. A
    value no environment variable can hold (a NUL) is dropped."""
    value = trace_id if trace_id and "\0" not in trace_id else None
    _TRACE_ID.set(value)
    if not process_wide:
        return
    if value:
        os.environ[_TRACE_HEADER] = value
    else:
        os.environ.pop(_TRACE_HEADER, None)


def trace_id() -> str | None:
    """The trace header of the invocation this thread serves (:func:`set_trace_id`); in a
    thread that never set one, the process's ``_X_AMZN_TRACE_ID``."""
    try:
        return _TRACE_ID.get()
    except LookupError:
        return os.environ.get(_TRACE_HEADER) or None


@dataclass(frozen=True, slots=True)
class OtlpSettings:
    """Where traces go when ``STREAMGATE_TRACING`` is on (streamgate/tracing.py): OTLP over
    HTTP with protobuf bodies, configured by the exporter variables of the OpenTelemetry
    specification (``OTEL_EXPORTER_OTLP_*``, the ``_TRACES_`` ones first; "OpenTelemetry
    Protocol Exporter", specification 1.x) and the batch processor's (``OTEL_BSP_*``)."""

    endpoint: str = "http://localhost:4318/v1/traces"
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    timeout_s: float = 10.0
    gzip: bool = False
    service_name: str = "streamgate"
    # Sign each export with SigV4 for X-Ray (service "xray") in this region: set from an
    # https://xray.<region>.amazonaws.com endpoint, or by STREAMGATE_TRACING_SIGV4_REGION (an
    # X-Ray VPC endpoint). Empty: unsigned.
    sigv4_region: str = ""
    # How long the Lambda loop waits, after a response is written, for its spans to leave.
    flush_timeout_s: float = 2.0
    schedule_delay_s: float = 5.0
    max_queue_size: int = 2048
    max_export_batch_size: int = 512
    # Resource attributes from the Lambda environment (cloud.*, faas.*), when there is one.
    resource: tuple[tuple[str, str | int], ...] = ()


# X-Ray's OTLP traces endpoint (https://docs.aws.amazon.com/xray/latest/devguide/
# xray-opentelemetry.html): SigV4-signed for service "xray" in the region it names.
_XRAY_ENDPOINT = re.compile(r"https://xray\.([a-z0-9-]+)\.amazonaws\.com(?:\.cn)?(?::443)?/")


def load_otlp_settings(environ: Mapping[str, str] | None = None) -> OtlpSettings:
    """:class:`OtlpSettings` from the environment; :class:`ConfigError` naming the variable
    that is wrong."""
    import urllib.parse

    env = os.environ if environ is None else environ

    def otel(name: str) -> str:
        return (env.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}")
                or env.get(f"OTEL_EXPORTER_OTLP_{name}") or "").strip()

    def number(name: str, default: float, *, low: float = 0) -> float:
        raw = (otel(name[len("OTEL_EXPORTER_OTLP_"):]) if name.startswith("OTEL_EXPORTER")
               else env.get(name, "").strip())
        if not raw:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw[:40]!r}") from None
        if not math.isfinite(value) or value <= low:
            raise ConfigError(f"{name} must be more than {low:g}, got {raw[:40]!r}")
        return value

    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if not endpoint:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
        endpoint = base.rstrip("/") + "/v1/traces"
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"The OTLP traces endpoint must be an http:// or https:// URL, got "
                          f"{endpoint[:80]!r}")
    protocol = otel("PROTOCOL") or "http/protobuf"
    if protocol != "http/protobuf":
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: Streamgate exports traces "
                          "as http/protobuf only")
    compression = otel("COMPRESSION") or "none"
    if compression not in ("gzip", "none"):
        raise ConfigError(f"OTEL_EXPORTER_OTLP_COMPRESSION must be gzip or none, got "
                          f"{compression[:40]!r}")
    headers: list[tuple[str, str]] = []
    for item in otel("HEADERS").split(","):
        key, sep, value = item.partition("=")
        if not item.strip():
            continue
        if not sep or not key.strip():
            raise ConfigError("OTEL_EXPORTER_OTLP_HEADERS must be key=value pairs separated "
                              "by commas")
        headers.append((key.strip().lower(), urllib.parse.unquote(value.strip())))
    xray = _XRAY_ENDPOINT.match(endpoint)
    region = env.get("STREAMGATE_TRACING_SIGV4_REGION", "").strip() or (
        xray.group(1) if xray else "")
    resource: list[tuple[str, str | int]] = []
    if env.get("AWS_LAMBDA_FUNCTION_NAME"):
        resource += [("cloud.provider", "aws"), ("cloud.platform", "aws_lambda"),
                     ("faas.name", env["AWS_LAMBDA_FUNCTION_NAME"])]
        for key, name in (("cloud.region", "AWS_REGION"),
                          ("faas.version", "AWS_LAMBDA_FUNCTION_VERSION"),
                          ("faas.instance", "AWS_LAMBDA_LOG_STREAM_NAME")):
            if env.get(name):
                resource.append((key, env[name]))
        memory = _whole_number(env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", ""))
        if memory:
            resource.append(("faas.max_memory", memory * 1024 * 1024))
    return OtlpSettings(
        endpoint=endpoint, headers=tuple(headers),
        timeout_s=number("OTEL_EXPORTER_OTLP_TIMEOUT", 10_000) / 1000,
        gzip=compression == "gzip",
        service_name=env.get("OTEL_SERVICE_NAME", "").strip() or "streamgate",
        sigv4_region=region,
        flush_timeout_s=number("STREAMGATE_TRACING_FLUSH_TIMEOUT_MS", 2_000) / 1000,
        schedule_delay_s=number("OTEL_BSP_SCHEDULE_DELAY", 5_000) / 1000,
        max_queue_size=int(number("OTEL_BSP_MAX_QUEUE_SIZE", 2048, low=0)),
        max_export_batch_size=int(number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512, low=0)),
        resource=tuple(resource),
    )
