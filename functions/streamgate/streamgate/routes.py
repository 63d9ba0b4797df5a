"""Model routes: one public model name, an ordered list of backends ("targets") that may serve it.

The document (JSON; YAML too where PyYAML is installed, as it is for local development but not
in the Lambda package)::

    {"cooldown_s": 30, "failures_to_cool": 3, "failure_window_s": 60,
     "routes": {
       "claude": {"targets": [
          {"name": "claude-east", "kind": "bedrock", "model": "us.anthropic.claude-...",
           "region": "us-east-1"},
          {"name": "claude-partner", "kind": "bedrock", "model": "anthropic.claude-...",
           "region": "eu-west-1", "role_arn": "arn:aws:iam::222222222222:role/streamgate"},
          {"name": "openai", "kind": "openai", "base_url": "https://api.openai.com/v1",
           "model": "gpt-4o-mini", "api_key_secret": "arn:aws:secretsmanager:..."}]},
       "llama": {"targets": [{"kind": "openai", "base_url": "http://vllm:8000/v1",
                              "model": "meta-llama/Llama-3.1-8B-Instruct"}]}}}

It comes from ``STREAMGATE_ROUTES`` (the text, or ``@path``) or from the SSM parameter
``STREAMGATE_ROUTES_PARAMETER``, re-read after ``STREAMGATE_ROUTES_TTL_S`` so a change needs no
deployment (a document that no longer parses keeps the last good one, with an error logged).
Without either, the configured provider is the one-target route of each of its models.

Serving a request (:meth:`Router.open`): its targets are tried in order until one answers,
and nothing has reached the client until then. A target has answered with its first model
output (content, reasoning or a tool-call piece: what :class:`~streamgate.providers.OutputTimer`
counts), or with a finish reason and no output (an empty answer the backend chose: a stop
sequence at once, ``max_tokens`` spent on nothing visible, a content filter). Usage that
comes before is kept (the latest) and relayed after; a target that ends with neither has
failed.
Failing over: a failure that another backend may not share (throttled, unavailable, 5xx,
unreachable, too slow to its first output, a stream that breaks or ends empty, the backend
refusing our access) moves on to the next target; a client error (400, 404, context too long)
ends the request there, unless the route says ``fallback_on_client_errors`` - except on a
fallback target, whose own refusal means only that it cannot honour this request, so it is
skipped. A fallback target whose capabilities cannot honour the request is skipped too: the
request was checked against the first target's. After the first byte there is no fallback.
When every target fails, the answer is the most meaningful of their errors: 429 (with the
shortest Retry-After) if all were throttled, else 504 if all timed out, else 503 if any was
unavailable, else 502: never a generic 500.

Cooling down (:class:`Cooling`): a target is skipped for ``cooldown_s`` on evidence that its
backend, not one request, is unwell: at once when it throttles (429), says it is unavailable
(503), refuses our credentials or role, or cannot be reached at all (connection refused, a
name that does not resolve, no connection to Bedrock's endpoint); after ``failures_to_cool``
failures in a row (no answer between them) within ``failure_window_s`` for anything one
request may cause (a 5xx, a timeout, a broken or empty stream). Client errors never count. An
answer clears the count, and a cooling target that answers (every target cooling: all are
tried) stops cooling.

Embeddings (``POST /v1/embeddings``): a route whose targets are embedding models (a documented
one, such as ``amazon.titan-embed-text-v2:0``, or any target given ``"dimensions"``, which an
upstream's model needs) routes and falls back by the same rules, through :meth:`Router.embed`.
Its targets must all give vectors of one size, and a route may not mix chat and embedding
models: either is refused when the document loads (providers/embedding.py says how sizes are
known).

Shared state (several requests at once): the table is replaced whole, never changed in place;
providers are built once per distinct backend (kind and settings, not model) and shared by
every route that names it, their clients being thread-safe; each target's record of failures
and cooldown sits in a dict under a lock.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar, cast

from streamgate.errors import (
    ConfigError,
    DeadlineExceededError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestError,
    StreamgateError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from streamgate.providers import Batch, Delta, Provider, Usage, create_provider
from streamgate.providers.embedding import (
    MAX_DIMENSIONS,
    Embedder,
    EmbeddingModel,
    EmbeddingRequest,
    Embeddings,
    check_embedding,
    check_vectors,
    model_info,
)
from streamgate.validation import check_supported

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.deadline import Deadline
    from streamgate.validation import ChatRequest

logger = logging.getLogger(__name__)

KINDS = ("bedrock", "openai", "local")
# The settings a target may carry, by kind (anything else is a typo, refused at load).
_COMMON = {"kind", "name", "model", "connect_timeout_s", "first_token_timeout_s",
           "idle_timeout_s", "max_attempts", "dimensions"}
_FIELDS: dict[str, frozenset[str]] = {
    "bedrock": frozenset(_COMMON | {"region", "endpoint_url", "role_arn", "external_id",
                                    "guardrail_id", "guardrail_version"}),
    "openai": frozenset(_COMMON | {"base_url", "api_key_secret", "api_key_parameter",
                                   "api_key"}),
    "local": frozenset(_COMMON),
}
_ROUTE_FIELDS = frozenset({"targets", "fallback_on_client_errors"})


@dataclass(frozen=True, slots=True)
class Target:
    """One backend of a route: a provider kind, its settings, and the model it is asked for."""

    name: str
    kind: str
    model: str
    # Settings of the backend itself (region, base URL, key source, timeouts...): targets with
    # equal settings share one provider, whatever model they ask it for.
    options: tuple[tuple[str, Any], ...] = ()
    # Set for an embedding model: what it gives and takes (providers/embedding.py).
    embedding: EmbeddingModel | None = None

    @property
    def backend(self) -> str:
        return json.dumps([self.kind, self.options], sort_keys=True, default=str)


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    targets: tuple[Target, ...]
    fallback_on_client_errors: bool = False

    @property
    def embedding(self) -> EmbeddingModel | None:
        """Set when this is an embeddings route: its first target's model."""
        return self.targets[0].embedding


@dataclass(frozen=True, slots=True)
class Cooling:
    """When a target is skipped (see the module docstring): for ``cooldown_s`` seconds, at once
    on evidence its backend is unwell, or after ``failures`` failures in a row within
    ``window_s`` seconds that one request may have caused. A routes document sets its own
    (``cooldown_s``, ``failures_to_cool``, ``failure_window_s``); the settings give the rest."""

    cooldown_s: float = 30.0
    failures: int = 3
    window_s: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Cooling:
        return cls(settings.route_cooldown_s, settings.route_failures_to_cool,
                   settings.route_failure_window_s)


@dataclass(frozen=True, slots=True)
class RouteTable:
    routes: Mapping[str, Route]  # in the document's order: /v1/models lists them so
    cooling: Cooling
    source: str = ""


_DOC_FIELDS = frozenset({"routes", "cooldown_s", "failures_to_cool", "failure_window_s"})


def parse_routes(text: str, source: str, *, defaults: Cooling) -> RouteTable:
    """A routes document → :class:`RouteTable`; :class:`ConfigError` naming what is wrong,
    whatever the text (JSON or YAML, any depth, any key)."""
    doc = _load(text, source)
    if not isinstance(doc, dict) or not isinstance(doc.get("routes"), dict) or not doc["routes"]:
        raise ConfigError(f"{source}: a routes document is an object with a non-empty "
                          "\"routes\" object (public model name -> route)")
    unknown = set(doc) - _DOC_FIELDS
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {_names(unknown)}")
    cooldown = doc.get("cooldown_s", defaults.cooldown_s)
    if not _number(cooldown) or not 0 <= cooldown <= 3600:
        raise ConfigError(f"{source}: \"cooldown_s\" must be a number of seconds from 0 to 3600")
    failures = doc.get("failures_to_cool", defaults.failures)
    if isinstance(failures, bool) or not isinstance(failures, int) or not 1 <= failures <= 100:
        raise ConfigError(f"{source}: \"failures_to_cool\" must be a whole number from 1 to 100")
    window = doc.get("failure_window_s", defaults.window_s)
    if not _number(window) or not 0 < window <= 3600:
        raise ConfigError(f"{source}: \"failure_window_s\" must be a number of seconds above 0, "
                          "at most 3600")
    routes: dict[str, Route] = {}
    for public, spec in doc["routes"].items():
        if not isinstance(public, str):
            # YAML reads `1:` as a number and `~:` as null; a client's "model" is a string.
            raise ConfigError(f"{source}: route name {public!r} is not a string (YAML reads "
                              "1 as a number and ~ as null): quote it")
        routes[public] = _route(public, spec, source)
    return RouteTable(routes, Cooling(float(cooldown), failures, float(window)), source)


def _number(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and math.isfinite(value))


def _names(keys: set[Any]) -> str:
    """Field names for a message, whatever their type (YAML keys may be numbers or null)."""
    return ", ".join(sorted(k if isinstance(k, str) else repr(k) for k in keys))


def _load(text: str, source: str) -> Any:
    """The document's JSON, else its YAML; a ConfigError for anything unreadable, including a
    document nested too deeply for the parser (it recurses once per level)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ConfigError(f"{source} nests too deeply to be a routes document") from None
    except ValueError as json_error:
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{source} is not valid JSON ({json_error}); YAML needs PyYAML, "
                              "which the Lambda package does not include") from None
        try:
            return yaml.safe_load(text)
        except RecursionError:
            raise ConfigError(f"{source} nests too deeply to be a routes document") from None
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
            # A YAML date that is no date (2024-13-45) is a ValueError of the constructor.
            raise ConfigError(f"{source} is neither valid JSON nor valid YAML: "
                              f"{str(e)[:300]}") from None


def _route(public: str, spec: Any, source: str) -> Route:
    where = f"{source}: route {public!r}"
    if not public.strip() or len(public) > 256:
        raise ConfigError(f"{where}: a public model name is 1 to 256 characters")
    if isinstance(spec, list):
        spec = {"targets": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be an object with \"targets\" (or a list of targets)")
    unknown = set(spec) - _ROUTE_FIELDS
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {_names(unknown)}")
    targets = spec.get("targets")
    if not isinstance(targets, list) or not targets:
        raise ConfigError(f"{where}: \"targets\" must be a non-empty list")
    fallback = spec.get("fallback_on_client_errors", False)
    if not isinstance(fallback, bool):
        raise ConfigError(f"{where}: \"fallback_on_client_errors\" must be true or false")
    built = tuple(_target(public, i, t, where) for i, t in enumerate(targets))
    names = [t.name for t in built]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: target names must differ ({', '.join(names)})")
    _check_embedding_route(built, where)
    return Route(public, built, fallback)


def _target(public: str, index: int, spec: Any, where: str) -> Target:
    at = f"{where}, target {index + 1}"
    if not isinstance(spec, dict):
        raise ConfigError(f"{at} must be an object")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{at}: \"kind\" must be one of {', '.join(KINDS)}")
    unknown = set(spec) - _FIELDS[kind]
    if unknown:
        raise ConfigError(f"{at}: unknown field(s) for kind {kind}: {_names(unknown)}")
    for key, value in spec.items():
        if key in ("connect_timeout_s", "first_token_timeout_s", "idle_timeout_s"):
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or value <= 0):
                raise ConfigError(f"{at}: {key!r} must be a positive number of seconds")
        elif key == "dimensions":
            if isinstance(value, bool) or not isinstance(value, int) or not (
                    1 <= value <= MAX_DIMENSIONS):
                raise ConfigError(f"{at}: 'dimensions' must be an integer from 1 to "
                                  f"{MAX_DIMENSIONS}")
        elif key == "max_attempts":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10:
                raise ConfigError(f"{at}: 'max_attempts' must be an integer from 1 to 10")
        elif not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{at}: {key!r} must be a non-empty string")
    name = spec.get("name") or f"{public}#{index + 1}"
    model = spec.get("model", "")
    if kind != "local" and not model:
        raise ConfigError(f"{at}: \"model\" is required for kind {kind}")
    if kind == "openai":
        if not spec.get("base_url", "").startswith(("http://", "https://")):
            raise ConfigError(f"{at}: \"base_url\" must be an http:// or https:// URL")
        sources = [k for k in ("api_key_secret", "api_key_parameter", "api_key") if k in spec]
        if len(sources) > 1:
            raise ConfigError(f"{at}: set only one of {', '.join(sources)}")
    if kind == "bedrock" and "external_id" in spec and "role_arn" not in spec:
        raise ConfigError(f"{at}: \"external_id\" goes with \"role_arn\"")
    if kind == "bedrock" and "guardrail_version" in spec and "guardrail_id" not in spec:
        raise ConfigError(f"{at}: \"guardrail_version\" goes with \"guardrail_id\"")
    options = tuple(sorted((k, v) for k, v in spec.items()
                           if k not in ("kind", "name", "model", "dimensions")))
    try:
        embedding = model_info(kind, str(model), spec.get("dimensions"))
    except ConfigError as e:
        raise ConfigError(f"{at}: {e.message}") from None
    if embedding is None and "dimensions" in spec:
        raise ConfigError(f"{at}: \"dimensions\" is for embedding models, and {model!r} is not "
                          f"one the {kind} kind serves")
    return Target(str(name), kind, str(model), options, embedding)


def _check_embedding_route(targets: tuple[Target, ...], where: str) -> None:
    """An embeddings route's targets are all embedding models of one vector size."""
    sizes = {t.embedding.dimensions for t in targets if t.embedding is not None}
    if not sizes:
        return
    if any(t.embedding is None for t in targets):
        raise ConfigError(f"{where} mixes chat and embedding models: a route serves one or "
                          "the other")
    if len(sizes) > 1:
        listed = ", ".join(f"{t.name}: {t.embedding.dimensions}" for t in targets
                           if t.embedding is not None)
        raise ConfigError(f"{where}: its targets give vectors of different sizes ({listed}); "
                          "clients could not compare them")


def build_provider(settings: Settings, target: Target) -> Provider:
    """The provider for a target's backend: the configured settings with the target's own."""
    o = dict(target.options)
    common = {"first_token_timeout_s", "idle_timeout_s", "connect_timeout_s", "max_attempts"}
    if target.kind == "bedrock":
        from streamgate.providers import bedrock

        s = replace(settings, provider="bedrock", default_model=target.model,
                    bedrock_region=o.get("region", settings.bedrock_region),
                    bedrock_guardrail_id=o.get("guardrail_id", ""),
                    bedrock_guardrail_version=o.get("guardrail_version", ""),
                    **{f"bedrock_{k}": o[k] for k in common if k in o})
        access = bedrock.BedrockAccess(endpoint_url=o.get("endpoint_url", ""),
                                       role_arn=o.get("role_arn", ""),
                                       external_id=o.get("external_id", ""))
        return bedrock.BedrockProvider(s, access=access)
    if target.kind == "openai":
        s = replace(settings, provider="openai", upstream_base_url=o["base_url"],
                    upstream_models=(), default_model=target.model,
                    upstream_api_key_secret=o.get("api_key_secret", ""),
                    upstream_api_key_parameter=o.get("api_key_parameter", ""),
                    upstream_api_key=o.get("api_key", ""),
                    **{f"upstream_{k}": o[k] for k in common if k in o})
        return create_provider(s)
    return create_provider(replace(settings, provider="local"))


def build_embedder(settings: Settings, target: Target) -> Embedder:
    """The embedder for an embedding target's backend, configured as build_provider does."""
    o = dict(target.options)
    if target.kind == "bedrock":
        from streamgate.providers import bedrock, bedrock_embed

        s = replace(settings, provider="bedrock",
                    bedrock_region=o.get("region", settings.bedrock_region),
                    **{f"bedrock_{k}": o[k] for k in ("connect_timeout_s", "first_token_timeout_s",
                                                      "max_attempts") if k in o})
        return bedrock_embed.BedrockEmbedder(s, access=bedrock.BedrockAccess(
            endpoint_url=o.get("endpoint_url", ""), role_arn=o.get("role_arn", ""),
            external_id=o.get("external_id", "")))
    if target.kind == "openai":
        from streamgate.providers import openai_embed

        s = replace(settings, provider="openai", upstream_base_url=o["base_url"],
                    upstream_api_key_secret=o.get("api_key_secret", ""),
                    upstream_api_key_parameter=o.get("api_key_parameter", ""),
                    upstream_api_key=o.get("api_key", ""),
                    **{f"upstream_{k}": o[k] for k in ("connect_timeout_s",
                                                       "first_token_timeout_s", "max_attempts")
                       if k in o})
        return openai_embed.build(s)
    from streamgate.providers import local_embed

    return local_embed.LocalEmbedder(replace(settings, provider="local", embedding_models=()))


@dataclass
class Attempt:
    """What happened to one target of a request, for the log: skipped or failed, and why."""

    target: str
    outcome: str  # "cooling", "cannot_honour", or the error code

    def record(self) -> dict[str, str]:
        return {"target": self.target, "outcome": self.outcome}


@dataclass
class RoutedStream:
    """The deltas of the target that answered (``target``): those read before its answer
    began (``head``, ending with the first output or the finish), then the rest."""

    target: Target
    head: list[Delta]
    rest: Iterator[Delta]
    _sent: int = field(default=0, repr=False)

    def __iter__(self) -> RoutedStream:
        return self

    def __next__(self) -> Delta:
        if self._sent < len(self.head):
            self._sent += 1
            return self.head[self._sent - 1]
        return next(self.rest)

    def remaining(self) -> Iterator[Delta]:
        """The deltas not yet taken, as one iterator that costs no Python call per delta (the
        relay's loop takes them from it; :meth:`close` still ends the stream): past the
        provider's own layers too where they offer theirs
        (:meth:`streamgate.retry.Retrying.remaining`)."""
        head = self.head[self._sent:]
        self._sent = len(self.head)
        rest = self.rest
        handover = getattr(rest, "remaining", None)
        if handover is not None:
            rest = handover()
        return itertools.chain(head, rest) if head else rest

    def close(self) -> None:
        close = getattr(self.rest, "close", None)
        if close is not None:
            close()


class Router:
    """Public model names → routes → the providers of their targets; see the module docstring.

    ``provider``: the one configured provider, every model of it a one-target route.
    Otherwise the routes come from ``settings.routes`` / ``settings.routes_parameter``.
    """

    def __init__(self, settings: Settings, provider: Provider | None = None, *,
                 build: Callable[[Settings, Target], Provider] = build_provider,
                 read_parameter: Callable[[str], tuple[str, str]] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 allow_local: bool = True, embedder: Embedder | None = None,
                 build_embedder: Callable[[Settings, Target], Embedder] = build_embedder,
                 ) -> None:
        self._settings = settings
        self._single = provider
        # Without routes: the provider's embedding models (its own embedder, or the provider
        # itself when it embeds too, as test fakes do), each a one-target route.
        if embedder is None and provider is not None and hasattr(provider, "embed"):
            embedder = cast("Embedder", provider)
        self._single_embedder = embedder
        self._build_embedder = build_embedder
        self._embedders: dict[str, Embedder] = {}
        self._build = build
        self._read_parameter = read_parameter or _read_parameter
        self._clock = clock
        self._allow_local = allow_local  # the embedded model: development only, never Lambda
        self._refreshing = threading.Lock()  # one request re-reads the routes; others go on
        self._providers_lock = threading.RLock()
        self._health_lock = threading.Lock()
        self._providers: dict[str, Provider] = {}
        self._health: dict[str, _Health] = {}  # target backend + model -> its recent record
        self._table: RouteTable | None = None
        self._version = ""
        self._refresh_at = math.inf
        if provider is None:
            self._load_initial()

    # -- the table --------------------------------------------------------------------------

    def _load_initial(self) -> None:
        s = self._settings
        if s.routes_parameter:
            text, self._version = self._read_parameter(s.routes_parameter)
            source = f"SSM parameter {s.routes_parameter}"
            self._refresh_at = self._clock() + s.routes_ttl_s
        elif s.routes.startswith("@"):
            path = s.routes[1:]
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except OSError as e:
                raise ConfigError(f"STREAMGATE_ROUTES names {path}, which cannot be read: "
                                  f"{e.strerror}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"STREAMGATE_ROUTES names {path}, which is not UTF-8 "
                                  "text") from None
            source = path
        else:
            text, source = s.routes, "STREAMGATE_ROUTES"
        table = self._parse(text, source)
        for route in table.routes.values():  # build now: a bad key source fails the init
            for target in route.targets:
                self._backend_for(target)
        self._table = table

    def _parse(self, text: str, source: str) -> RouteTable:
        table = parse_routes(text, source, defaults=Cooling.from_settings(self._settings))
        if not self._allow_local:
            for route in table.routes.values():
                if any(t.kind == "local" for t in route.targets):
                    raise ConfigError(
                        f"{source}: route {route.name!r} targets the embedded model (kind "
                        "local), which is for local development and not in the Lambda package")
        return table

    def _current(self) -> RouteTable:
        """The routes in force, re-read from SSM once the TTL has passed (by one request;
        the others keep using the table they have). A failed read keeps the old table."""
        if self._table is None:
            return self._single_table()
        if self._clock() < self._refresh_at or not self._refreshing.acquire(blocking=False):
            return self._table
        try:
            name = self._settings.routes_parameter
            self._refresh_at = self._clock() + self._settings.routes_ttl_s
            text, version = self._read_parameter(name)
            if version != self._version:
                table = self._parse(text, f"SSM parameter {name}")
                for route in table.routes.values():
                    for target in route.targets:
                        self._backend_for(target)
                self._table, self._version = table, version
                logger.info("routes re-read from %s (version %s)", name, version)
        except StreamgateError as e:
            logger.error("routes not re-read; keeping the ones in force: %s", e.message)
        except Exception:  # noqa: BLE001 - a failed refresh must not fail requests
            logger.exception("routes not re-read; keeping the ones in force")
        finally:
            self._refreshing.release()
        return self._table

    def _single_table(self) -> RouteTable:
        provider = self._single
        assert provider is not None
        routes = {m: Route(m, (Target(provider.name, provider.name, m),))
                  for m in provider.models()}
        embedder = self._single_embedder
        if embedder is not None:
            routes.update({m: Route(m, (Target(embedder.name, embedder.name, info.model,
                                               embedding=info),))
                           for m, info in embedder.embedding_models().items()})
        return RouteTable(routes, Cooling.from_settings(self._settings))

    def _backend_for(self, target: Target) -> Provider | Embedder:
        return (self._embedder_for(target) if target.embedding is not None
                else self._provider_for(target))

    def _embedder_for(self, target: Target) -> Embedder:
        if self._single is not None:
            assert self._single_embedder is not None
            return self._single_embedder
        key = target.backend
        embedder = self._embedders.get(key)
        if embedder is None:
            with self._providers_lock:
                embedder = self._embedders.get(key)
                if embedder is None:
                    embedder = self._embedders[key] = self._build_embedder(self._settings,
                                                                           target)
        return embedder

    def _provider_for(self, target: Target) -> Provider:
        if self._single is not None:
            return self._single
        key = target.backend
        provider = self._providers.get(key)
        if provider is None:
            with self._providers_lock:
                provider = self._providers.get(key)
                if provider is None:
                    provider = self._providers[key] = self._build(self._settings, target)
        return provider

    @property
    def provider(self) -> Provider | None:
        """The one provider, when there are no routes."""
        return self._single

    # -- what the pipeline asks -------------------------------------------------------------

    def kinds(self) -> set[str]:
        """The provider kinds the routes in force use (builds the single provider)."""
        if self._single is not None:
            return {self._single.name}
        return {t.kind for r in self._current().routes.values() for t in r.targets}

    def models(self) -> list[str]:
        return list(self._current().routes)

    def default_model(self) -> str:
        if self._single is not None:
            return self._single.default_model()
        return next(iter(self._current().routes))

    def route(self, model: str) -> Route:
        route = self._current().routes.get(model)
        if route is None:
            raise NotFoundError(
                f"The model `{model}` does not exist or you do not have access to it.",
                param="model", code="model_not_found")
        return route

    def owner(self, route: Route) -> str:
        """Who serves a route, for ``/v1/models``: the first target's kind."""
        return self._backend_for(route.targets[0]).name

    def first(self, route: Route) -> tuple[Provider, str]:
        """The provider of a route's first target and the model it asks it for: the backend
        a request is checked against (and that counts its tokens)."""
        target = route.targets[0]
        return self._provider_for(target), target.model

    def capabilities(self, route: Route) -> frozenset[str]:
        """What the route honours: its first target's capabilities."""
        return self._provider_for(route.targets[0]).capabilities

    def open(self, route: Route, chat: ChatRequest, deadline: Deadline, *,
             attempts: list[dict[str, str]] | None = None,
             observe: Callable[[Target], AbstractContextManager[object]] | None = None,
             ) -> RoutedStream:
        """The first target that answers, per the module docstring's rules; raises the most
        meaningful error when none does. What was skipped or failed on the
        way is appended to ``attempts`` (for the request's log), whatever the outcome.
        ``observe(target)`` is entered around each provider call's opening (telemetry: a span
        per attempt), and sees its failure."""
        observed = observe or _unobserved

        def honours(target: Target, fallback: bool) -> bool:
            if fallback:
                try:
                    check_supported(chat, self._provider_for(target).capabilities)
                except RequestError:
                    return False
            return True

        def attempt(target: Target) -> RoutedStream:
            provider = self._provider_for(target)
            deltas: Iterator[Delta] = iter(())
            try:
                with observed(target):
                    deltas = provider.stream(chat, target.model, deadline)
                    head = _until_answered(deltas)
            except BaseException:
                _close(deltas)
                raise
            return RoutedStream(target, head, deltas)

        return self._first_answer(route, deadline, attempts, honours, attempt)[1]

    def embed(self, route: Route, request: EmbeddingRequest, deadline: Deadline, *,
              attempts: list[dict[str, str]] | None = None,
              observe: Callable[[Target], AbstractContextManager[object]] | None = None,
              ) -> tuple[Target, Embeddings]:
        """The embeddings of the first target that gives them, by :meth:`open`'s rules (a
        target skipped while cooling, or when it cannot honour the request as a fallback),
        each answer checked to hold one vector of the route's size per input."""
        observed = observe or _unobserved

        def honours(target: Target, fallback: bool) -> bool:
            assert target.embedding is not None
            try:
                check_embedding(request, target.embedding)
            except RequestError:
                if not fallback:
                    raise  # the route's own model cannot: the client's to hear
                return False
            return True

        def attempt(target: Target) -> Embeddings:
            info = target.embedding
            assert info is not None
            # A model of several sizes gives the route's unless the request asks another.
            ask = replace(request, dimensions=request.dimensions or (
                info.dimensions if info.choices else None))
            with observed(target):
                result = self._embedder_for(target).embed(ask, target.model, deadline)
            return check_vectors(result, request, request.dimensions or info.dimensions,
                                 f"Backend {target.name}")

        return self._first_answer(route, deadline, attempts, honours, attempt)

    def _first_answer(self, route: Route, deadline: Deadline,
                      attempts: list[dict[str, str]] | None,
                      honours: Callable[[Target, bool], bool],
                      attempt: Callable[[Target], T]) -> tuple[Target, T]:
        """The route's targets in turn (those cooling last), ``attempt(target)`` on each that
        ``honours(target, fallback)`` the request, until one answers: the rules of the module
        docstring, shared by :meth:`open` and :meth:`embed`. What was skipped or failed is
        appended to ``attempts``; with no answer, the most meaningful failure is raised."""
        tried: list[dict[str, str]] = attempts if attempts is not None else []
        cooling = self._current().cooling
        order = [t for t in route.targets if not self._cooling_down(t)]
        if not order:  # every target cooling: try them all rather than fail outright
            order = list(route.targets)
        tried += [Attempt(t.name, "cooling").record() for t in route.targets if t not in order]
        failures: list[StreamgateError] = []
        for position, target in enumerate(order):
            deadline.check()
            fallback = position > 0 or target is not route.targets[0]
            if not honours(target, fallback):
                tried.append(Attempt(target.name, "cannot_honour").record())
                continue
            try:
                answer = attempt(target)
            except StreamgateError as e:
                if isinstance(e, DeadlineExceededError):
                    raise
                if not _worth_another_backend(e, route):
                    if fallback and isinstance(e, RequestError):
                        tried.append(Attempt(target.name, e.code or "invalid_request").record())
                        continue  # this backend cannot honour what the first one could
                    raise
                tried.append(Attempt(target.name, e.code or e.type).record())
                failures.append(e)
                health = ("" if isinstance(e, RequestError)  # the client's, never the backend's
                          else self._failed(target, e, cooling))
                logger.warning("route %s: target %s failed (%s%s); %s", route.name, target.name,
                               e.code, health, "trying the next" if position + 1 < len(order)
                               else "no target left")
                continue
            self._answered(target)
            return target, answer
        if not failures:
            raise UpstreamUnavailableError(
                f"No backend of model `{route.name}` can serve this request now",
                retry_after=1)
        raise _most_meaningful(failures)

    def close(self) -> None:
        backends: list[Any] = [*self._providers.values(), *self._embedders.values()]
        if self._single_embedder is not None and not hasattr(self._single_embedder, "stream"):
            backends.append(self._single_embedder)  # an embedder of its own, not the provider
        for backend in {id(b): b for b in backends}.values():
            close = getattr(backend, "close", None)
            if close is not None:
                close()

    # -- cooldowns ----------------------------------------------------------------------------

    def _cooling_down(self, target: Target) -> bool:
        with self._health_lock:
            health = self._health.get(_cooling_key(target))
            return health is not None and self._clock() < health.cooling_until

    def _failed(self, target: Target, err: StreamgateError, cooling: Cooling) -> str:
        """Record a failure of ``target``; cool it on evidence its backend is unwell (see the
        module docstring). What was decided, for the log."""
        now = self._clock()
        with self._health_lock:
            health = self._health.setdefault(_cooling_key(target), _Health())
            if _backend_unwell(err):
                reason = "its backend is unwell"
            else:
                health.failures = [t for t in health.failures if t > now - cooling.window_s]
                health.failures.append(now)
                if len(health.failures) < cooling.failures:
                    return f", failure {len(health.failures)} of {cooling.failures} in a row"
                reason = f"{len(health.failures)} failures in a row"
            health.failures = []
            if cooling.cooldown_s <= 0:
                return ""
            health.cooling_until = now + cooling.cooldown_s
        return f"; {reason}: cooling for {cooling.cooldown_s:g} s"

    def _answered(self, target: Target) -> None:
        """The target answered: its failures so far were not its backend's (nor is it cool)."""
        with self._health_lock:
            self._health.pop(_cooling_key(target), None)


@dataclass(slots=True)
class _Health:
    """A target's recent record: its failures since its last answer, and its cooldown."""

    failures: list[float] = field(default_factory=list)  # monotonic instants, oldest first
    cooling_until: float = -math.inf


T = TypeVar("T")


def _unobserved(target: Target) -> AbstractContextManager[object]:
    return nullcontext()


def _cooling_key(target: Target) -> str:
    return target.backend + "\0" + target.model


def _until_answered(deltas: Iterator[Delta]) -> list[Delta]:
    """The deltas up to and including the target's first model output (content, reasoning, a
    tool-call piece: what OutputTimer counts) or its finish, whichever comes first. Before it
    only usage can come, and only the latest is kept (the pipeline keeps the last anyway): a
    backend streaming usage chunks until its first-token timeout costs no memory. A stream
    that ends with neither has failed: nothing in it is an answer."""
    usage: Usage | None = None
    for delta in deltas:
        if isinstance(delta, Usage):
            usage = delta
            continue
        if isinstance(delta, Batch) and all(isinstance(d, Usage) for d in delta.deltas):
            usage = cast("Usage", delta.deltas[-1])
            continue
        return [delta] if usage is None else [usage, delta]
    raise UpstreamError("The model's backend ended its answer without any output")


def _backend_unwell(err: StreamgateError) -> bool:
    """Whether ``err`` says something about the backend rather than about one request: it
    throttles or is unavailable, it refuses our credentials (or STS the target's role), or it
    cannot be reached at all."""
    if isinstance(err, (RateLimitError, UpstreamUnavailableError, PermissionDeniedError)):
        return True
    if err.code == "upstream_auth_failed":  # an OpenAI-compatible upstream's 401/403
        return True
    # botocore is loaded only where Bedrock is used, and none of its errors exist elsewhere.
    botocore_errors = sys.modules.get("botocore.exceptions")
    cause: BaseException | None = err.__cause__ or err.__context__
    for _ in range(8):  # the chain is short; never follow a cycle
        if cause is None:
            return False
        if isinstance(cause, (ConnectionRefusedError, socket.gaierror)):
            return True  # nobody listens there, or the name does not resolve
        if botocore_errors is not None and isinstance(cause, botocore_errors.ConnectionError):
            return True  # no connection to the endpoint: refused, unresolved, timed out, TLS
        if (botocore_errors is not None and isinstance(cause, botocore_errors.ClientError)
                and cause.operation_name == "AssumeRole"):
            return True  # STS refuses us the target's role: so it will for every request
        cause = cause.__cause__ or cause.__context__
    return False


def _worth_another_backend(err: StreamgateError, route: Route) -> bool:
    """Whether another backend may well succeed where this one failed."""
    if isinstance(err, (RateLimitError, UpstreamError, PermissionDeniedError)):
        return True  # throttled, unavailable, 5xx, unreachable, timed out, access refused
    return route.fallback_on_client_errors and isinstance(err, RequestError)


def _most_meaningful(failures: list[StreamgateError]) -> StreamgateError:
    """All throttled: the 429 with the shortest wait; all timed out: a 504; any unavailable
    or throttled: a 503 with the shortest wait; else the last failure (a 502, or a 403)."""
    def wait(e: StreamgateError) -> float:
        return e.retry_after if e.retry_after is not None else math.inf

    throttled = [e for e in failures if isinstance(e, RateLimitError)]
    if len(throttled) == len(failures):
        return min(throttled, key=wait)
    if all(isinstance(e, UpstreamTimeoutError) for e in failures):
        return failures[-1]
    waiting = [e for e in failures if isinstance(e, (RateLimitError, UpstreamUnavailableError))]
    if waiting:
        best = min(waiting, key=wait)
        if isinstance(best, UpstreamUnavailableError):
            return best
        return UpstreamUnavailableError(
            "Every backend of this model is throttled or failing; retry shortly",
            retry_after=best.retry_after)
    return failures[-1]


def _close(deltas: Iterator[Delta]) -> None:
    close = getattr(deltas, "close", None)
    if close is not None:
        close()


def _read_parameter(name: str) -> tuple[str, str]:
    """An SSM parameter's value and version, bounded in time (the request path waits)."""
    from botocore.config import Config

    from streamgate import aws

    client = aws.client("ssm", config=Config(
        connect_timeout=2, read_timeout=3, retries={"mode": "standard", "total_max_attempts": 2}))
    try:
        parameter = client.get_parameter(Name=name, WithDecryption=True)["Parameter"]
    except Exception as e:
        code = str(getattr(e, "response", {}).get("Error", {}).get("Code", type(e).__name__))
        if code == "ParameterNotFound":
            raise ConfigError(f"SSM parameter {name} (the routes) does not exist") from None
        raise ConfigError(f"Could not read the routes from SSM parameter {name}: {code}") from None
    return str(parameter["Value"]), str(parameter.get("Version", ""))
