"""Who is calling, may they use this model, and are they within their limits.

The pipeline asks, in this order, before any model call: :meth:`Gate.authenticate` (401),
:meth:`Gate.authorize` (403), :meth:`Gate.admit` (429). An :class:`Admission` then travels with
the response: its headers go on it, and :meth:`Admission.settle` charges what the request really
used once the response is closed (normally, in error, at the deadline, or on disconnect).

An admitted request is in its day's usage record from the start, as unsettled with what it
reserved; settling closes it there. So a request whose process dies (on Lambda: the function's
timeout, out of memory) is still recorded, and keeps what it reserved: its minute's tokens until
the minute ends, its budget tokens for good (see docs/operating.md).

The keys table failing (:class:`~streamgate.keystore.KeyStoreError`) fails the request closed
(503), after giving back what it had reserved; each failure is logged once, naming its cause. A
settle that fails is logged as one ERROR record, ``"usage not recorded"``, with everything
needed to reconcile the usage record by hand.

Limits, per key (see docs/operating.md for the user-facing account):

- requests per minute: counted before the call; the request that would pass the limit is
  refused.
- tokens per minute and the monthly budget: before the call the request reserves its estimated
  prompt plus its ``max_tokens`` (as OpenAI counts), refused if that does not fit in what is
  left; when it ends the reservation is corrected to the real usage. Windows are clock minutes
  and calendar months, UTC.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from streamgate import deadline
from streamgate.errors import (
    AuthenticationError,
    ModelNotAllowedError,
    RateLimitError,
    RequestError,
)
from streamgate.events import HttpRequest
from streamgate.keystore import (
    MONTH_TTL_S,
    UNAVAILABLE,
    KeyRecord,
    KeyStore,
    KeyStoreError,
    LimitReached,
    day_of,
    key_digest,
    looks_like_key,
    minute_of,
    month_of,
    next_month_start,
)
from streamgate.validation import ChatRequest, Image, input_chars

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.outcome import Outcome

logger = logging.getLogger(__name__)

_CACHE_LIMIT = 1_024
_LOOKUP_SLACK_S = 1.0  # beyond a table call's two attempts, before a waiter gives up on it
# Rough prompt-size estimate, used only to reserve tokens and to charge streams that ended
# without the provider reporting usage: ~4 characters per token, ~4 tokens of framing per
# message, and a flat figure per image (a ~1 megapixel image costs about this much).
_CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4
_TOKENS_PER_IMAGE = 1_600


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: a key (auth ``api_key``), an IAM principal, or nobody."""

    key: KeyRecord | None = None
    principal: str = ""

    @property
    def id(self) -> str:
        """Safe to log: the key id (never the key) or the IAM ARN."""
        return self.key.id if self.key is not None else self.principal or "anonymous"


class Gate:
    def __init__(self, settings: Settings, store: KeyStore | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.mode = settings.auth
        self.cache_ttl_s = settings.key_cache_ttl_s
        self.clock = clock
        if store is None and self.mode == "api_key":
            store = KeyStore(settings.keys_table, clock=clock,
                             timeout_s=settings.keys_timeout_s)
        self.store = store
        self._cache: dict[str, tuple[float, KeyRecord | None]] = {}
        # The lookup in flight per key id: one GetItem per key at a time, however many
        # requests want it (a cold container, a key whose cache entry just expired).
        self._lookups: dict[str, Future[KeyRecord | None]] = {}
        self._lock = threading.Lock()

    def authenticate(self, request: HttpRequest) -> Caller:
        if self.mode == "none":
            return Caller()
        if self.mode == "iam":
            if not request.principal:
                raise AuthenticationError(
                    "This endpoint needs requests signed with AWS SigV4 (IAM auth)",
                    code="unauthenticated")
            return Caller(principal=request.principal)
        scheme, _, key = request.headers.get("authorization", "").strip().partition(" ")
        key = key.strip()
        if not scheme and "x-api-key" in request.headers:  # Anthropic's SDKs send it there
            scheme, key = "bearer", request.headers["x-api-key"].strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationError(
                "You didn't provide an API key. Send it in an Authorization header using "
                "Bearer auth (Authorization: Bearer YOUR_KEY), or in x-api-key.",
                code="missing_api_key")
        record = self._lookup(key) if looks_like_key(key) else None
        if record is None or not record.matches(key):
            raise AuthenticationError("Incorrect API key provided.")
        if record.revoked:
            raise AuthenticationError("This API key has been revoked.", code="revoked_api_key")
        return Caller(key=record)

    def _lookup(self, key: str) -> KeyRecord | None:
        """The key's record (None: no such key), from the cache or the table. One request
        looks a key up at a time; the others wait for its answer (or its failure), each
        bounded by its own deadline and by what the lookup itself may take."""
        key_id = key_digest(key)[:16]
        with self._lock:
            hit = self._cache.get(key_id)
            if hit is not None and hit[0] > time.monotonic():
                return hit[1]
            flight = self._lookups.get(key_id)
            if flight is None:
                flight = self._lookups[key_id] = Future()
                leader = True
            else:
                leader = False
        if not leader:
            return self._await(flight, key_id)
        assert self.store is not None
        try:
            record = self.store.get(key_id)
        except BaseException as e:
            if isinstance(e, KeyStoreError):
                _log_outage(e, "look up the key", key_id)
            with self._lock:
                del self._lookups[key_id]
            flight.set_exception(e)
            raise
        with self._lock:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key_id] = (time.monotonic() + self.cache_ttl_s, record)
            del self._lookups[key_id]
        flight.set_result(record)
        return record

    def _await(self, flight: Future[KeyRecord | None], key_id: str) -> KeyRecord | None:
        """Another request's lookup of the same key: its record, or its failure (logged once,
        by that request). A table call takes at most about twice its time budget (two
        attempts); past that, or past this request's deadline, this request stops waiting."""
        assert self.store is not None
        wait = deadline.current().cap(2 * self.store.timeout_s + _LOOKUP_SLACK_S)
        try:
            return flight.result(timeout=wait)
        except TimeoutError:
            deadline.current().check()
            err = KeyStoreError(UNAVAILABLE, f"the lookup of key {key_id} in flight did not "
                                             f"finish within {wait:.1f} s")
            _log_outage(err, "look up the key", key_id)
            raise err from None

    def allowed_models(self, caller: Caller, models: list[str]) -> list[str]:
        return [m for m in models if caller.key is None or caller.key.allows(m)]

    def authorize(self, caller: Caller, model: str) -> None:
        if caller.key is not None and not caller.key.allows(model):
            raise ModelNotAllowedError(
                f"This API key may not use the model `{model}`.", param="model")

    def admission(self, caller: Caller, chat: ChatRequest, model: str) -> Admission:
        """This request's claim on its caller's limits; :meth:`Admission.take` makes it."""
        return Admission(self, caller, model, chat.max_tokens or 0,
                         estimate_prompt_tokens(chat))


class Admission:
    """One request's claim on its caller's limits: taken before the call, settled after."""

    def __init__(self, gate: Gate, caller: Caller, model: str, max_tokens: int,
                 prompt_estimate: int) -> None:
        self.gate = gate
        self.caller = caller
        self.model = model
        self.max_tokens = max_tokens
        self.prompt_estimate = prompt_estimate
        self.id = uuid.uuid4().hex  # names this request's idempotent table writes
        self.reset_s = 0.0
        self.counts: dict[str, int] = {}
        self.window: tuple[int, int] | None = None  # (minute, tokens reserved)
        self.month: tuple[str, int] | None = None  # (month, tokens reserved)
        self.day = ""  # the usage record it was admitted in (UTC day)
        self.reserved = 0
        self.admitted = False
        self._settled = False

    def take(self) -> None:
        """Count the request and reserve its tokens, or raise 429 (400 when the request could
        never fit in the key's limits, 503 when the table fails: nothing stays reserved)."""
        key, store = self.caller.key, self.gate.store
        if key is None or store is None:
            self.admitted = True
            return
        reserve = self.prompt_estimate + self.max_tokens
        for limit, what in ((key.tpm, "tokens-per-minute limit"),
                            (key.budget, "monthly token budget")):
            if limit is not None and reserve > limit and not self.max_tokens:
                # No output tokens (embeddings): only the input can be made smaller.
                raise RequestError(
                    f"This request's input is about {reserve} tokens, more than this key's "
                    f"{what} of {limit}. Send fewer or shorter inputs.",
                    param="input", code="request_too_large_for_limit")
            if limit is not None and reserve > limit:
                raise RequestError(
                    f"This request may use up to {reserve} tokens (about "
                    f"{self.prompt_estimate} in the prompt plus max_tokens "
                    f"{self.max_tokens}), more than this key's {what} of {limit}. "
                    "Lower max_tokens or shorten the prompt.",
                    param="max_tokens", code="request_too_large_for_limit")
        now = self.gate.clock()
        self.reserved, self.day = reserve, day_of(now)
        if key.rpm is not None or key.tpm is not None:
            minute = minute_of(now)
            self.reset_s = (minute + 1) * 60 - now
            try:
                self.counts = store.take_window(key.id, minute, reserve=reserve,
                                                rpm=key.rpm, tpm=key.tpm)
            except LimitReached as e:
                self.counts = e.old
                over_requests = key.rpm is not None and e.old.get("requests", 0) >= key.rpm
                limit_text = f"{key.rpm} requests" if over_requests else f"{key.tpm} tokens"
                raise _limited(f"Rate limit reached: this key's limit is {limit_text} per "
                               f"minute. Try again in {math.ceil(self.reset_s)} s.",
                               self.reset_s, "rate_limit_exceeded") from None
            except KeyStoreError as e:
                _log_outage(e, "take the minute window", key.id)
                raise
            self.window = (minute, reserve)
        if key.budget is not None:
            month = month_of(now)
            ends = next_month_start(now)
            try:
                store.take_budget(key.id, month, reserve=reserve, budget=key.budget,
                                  expires=int(ends) + MONTH_TTL_S)
            except LimitReached as e:
                self._give_back()
                left = max(0, key.budget - e.old.get("tokens", 0))
                raise _limited(f"This key's monthly token budget of {key.budget} has {left} "
                               f"tokens left, fewer than this request may use ({reserve}). "
                               "It renews at the start of next month (UTC).",
                               ends - now, "insufficient_quota") from None
            except KeyStoreError as e:
                _log_outage(e, "take the monthly budget", key.id)
                self._give_back()
                raise
            self.month = (month, reserve)
        try:
            store.open_usage(key.id, day=self.day, model=self.model, reserved=reserve)
        except KeyStoreError as e:
            _log_outage(e, "open the usage record", key.id)
            self._give_back()
            raise
        self.admitted = True

    def _give_back(self) -> None:
        """Return the tokens this request reserved in its minute window and monthly budget
        (it was refused, or the table failed); when even that fails, log what is still held."""
        key, store = self.caller.key, self.gate.store
        if key is None or store is None or (self.window is None and self.month is None):
            return
        try:
            store.give_back(key.id, window=self.window, month=self.month,
                            token=self._token("give-back"))
        except KeyStoreError as e:
            logger.error("reserved tokens not given back", extra={
                "key_id": key.id, "cause": e.cause, "detail": e.detail,
                "tokens": self.reserved,
                "minute": None if self.window is None else self.window[0],
                "month": None if self.month is None else self.month[0]})
            return
        if self.window is not None:
            self.counts["tokens"] = self.counts.get("tokens", self.reserved) - self.reserved
        self.window = self.month = None

    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the limits this key has."""
        key = self.caller.key
        if key is None:
            return {}
        headers: dict[str, str] = {}
        reset = _duration(self.reset_s)
        if key.rpm is not None:
            headers["x-ratelimit-limit-requests"] = str(key.rpm)
            headers["x-ratelimit-remaining-requests"] = str(
                max(0, key.rpm - self.counts.get("requests", 0)))
            headers["x-ratelimit-reset-requests"] = reset
        if key.tpm is not None:
            headers["x-ratelimit-limit-tokens"] = str(key.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(
                max(0, key.tpm - self.counts.get("tokens", 0)))
            headers["x-ratelimit-reset-tokens"] = reset
        return headers

    def settle(self, outcome: Outcome) -> None:
        """Charge what the request used (once): the provider's usage when it reported it,
        else the estimated prompt plus the output produced, and nothing if there was none.
        It goes to the usage record the request was admitted in, even after midnight."""
        key, store = self.caller.key, self.gate.store
        if self._settled or not self.admitted or key is None or store is None:
            return
        self._settled = True
        if outcome.usage is not None:
            prompt, completion = outcome.usage.prompt_tokens, outcome.usage.completion_tokens
        elif outcome.deltas:
            prompt = self.prompt_estimate
            completion = max(outcome.deltas,
                             math.ceil(outcome.produced_chars / _CHARS_PER_TOKEN))
        else:
            prompt = completion = 0
        used = prompt + completion
        window = None if self.window is None else (self.window[0], used - self.window[1])
        month = None if self.month is None else (self.month[0], used - self.month[1])
        try:
            store.settle(key.id, day=self.day, model=self.model, prompt_tokens=prompt,
                         completion_tokens=completion, error=outcome.error is not None,
                         reserved=self.reserved, window=window, month=month,
                         token=self._token("settle"))
        except Exception as e:  # noqa: BLE001 - whatever the cause, leave what reconciles it
            logger.error("usage not recorded", extra={
                "key_id": key.id, "day": self.day, "model": self.model,
                "prompt_tokens": prompt, "completion_tokens": completion,
                "error": outcome.error is not None, "reserved_tokens": self.reserved,
                "minute": None if window is None else window[0],
                "minute_correction": None if window is None else window[1],
                "month": None if month is None else month[0],
                "month_correction": None if month is None else month[1],
                "cause": e.cause if isinstance(e, KeyStoreError) else type(e).__name__,
                "detail": e.detail if isinstance(e, KeyStoreError) else str(e)})

    def _token(self, purpose: str) -> str:
        """A ``ClientRequestToken`` for one of this request's transactions (at most 36
        characters): the same on every retry of that write, different for any other."""
        return hashlib.sha256(f"{self.id}:{purpose}".encode()).hexdigest()[:32]


def estimate_prompt_tokens(chat: ChatRequest) -> int:
    images = sum(isinstance(part, Image) for message in chat.messages for part in message.parts)
    return (math.ceil(input_chars(chat.messages, chat.tools, chat.response_format)
                      / _CHARS_PER_TOKEN)
            + _TOKENS_PER_MESSAGE * len(chat.messages) + _TOKENS_PER_IMAGE * images)


def _log_outage(error: KeyStoreError, doing: str, key_id: str) -> None:
    logger.error("keys table failed, request refused (503): could not %s: %s", doing,
                 error.detail, extra={"cause": error.cause, "key_id": key_id})


def _limited(message: str, retry_after: float, code: str) -> RateLimitError:
    err = RateLimitError(message, code=code, retry_after=max(retry_after, 0.001))
    if code == "insufficient_quota":
        err.type = "insufficient_quota"
    return err


def _duration(seconds: float) -> str:
    """OpenAI's reset format: ``"20ms"``, ``"17.5s"``, ``"6m0s"``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest}s"
