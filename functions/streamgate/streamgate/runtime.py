"""The Lambda runtime loop: next → context → handler → streamed response → next.

The Python managed runtime cannot stream responses, so ``bootstrap`` (started through
``AWS_LAMBDA_EXEC_WRAPPER``) runs this loop instead of the managed one. Only the driver lives
here: the day AWS ships Python streaming, ``App.handle`` stays as it is.

Failure policy (https://docs.aws.amazon.com/lambda/latest/dg/runtimes-custom.html):

- init fails (bad configuration, provider cannot be built) → ``/runtime/init/error``, exit 1;
- an invocation that cannot be served (its event unreadable or too large, or a bug before any
  response exists) → ``/invocation/{id}/error``, logged;
- the stream fails after its first byte → the handler has already written one SSE error event;
  the chunked body then ends with the ``Lambda-Runtime-Function-Error-*`` trailers;
- the Runtime API fails while we answer (a reset, a short or refused reply) → logged;
- after init, no failure of one invocation ends the loop: it polls ``next`` again. Only ``next``
  itself failing ends it (410 is the Runtime API saying stop: exit 0; a broken connection or
  reply: exit 1, and Lambda starts a new environment), or what is not an ``Exception``
  (SystemExit from a library, say): that invocation is still answered (``/error``, or its
  body ended with trailers), then the loop ends with exit 1.

Every line logged about an invocation, by its thread or one it starts (the Bedrock reader,
the deadline watchdog acting on its sockets), carries its request id
(``function_request_id``) and trace; the waits that no call hands a deadline to (the key
lookup, the upstream's model list) read the invocation's from :func:`streamgate.deadline.current`.

A missing, unreadable or past deadline gives a context with no time left, so the handler
answers 504 without admitting the request or calling a model.

Many invocations at once (Lambda Managed Instances). When ``AWS_LAMBDA_MAX_CONCURRENCY`` is N > 1,
Lambda may send N invocations into this one environment at the same time. The managed Python
runtime answers that with N processes; this loop runs N worker threads in one process instead,
each with its own Runtime API connection doing next → handler → streamed response, all sharing
one :class:`~streamgate.handler.App`: a stream waiting on the model costs a thread, not a
process with its own init and memory. (1 or unset: one loop on the main thread, as always.)

- Init happens once, before any worker starts; its failure is posted to ``/init/error`` once.
- The policy above holds per worker: nothing one invocation does stops its worker or touches
  another's stream. ``next`` failing (or a worker ending on a SystemExit) stops them all, as
  in aws-lambda-go: the environment runs at its full concurrency or not at all. Workers in a
  stream finish it (each is bounded by its deadline); workers waiting in ``next`` have that
  poll cut, unless a byte of its answer has arrived (that invocation is served); the exit
  status is 1 if any ``next`` broke, 0 if the Runtime API only said stop (410).
- Once a streamed answer is under way, its waits for the upstream and its writes move to one
  relay thread (relay.py) where the provider can read without blocking (the OpenAI-compatible
  one): a thread blocked per stream in ``recv`` costs a wake-up and a GIL hand-over per chunk.
  The worker sleeps meanwhile, then writes the end of the answer itself.
  ``STREAMGATE_RELAY_LOOP=false`` keeps every stream on its worker.
- Per invocation, in the worker's thread: the context, the deadline, the trace header (a
  context variable read by telemetry; ``_X_AMZN_TRACE_ID``, being the process's, is left unset
  as it could only name some other invocation), the log field ``function_request_id``, the
  request's log record and its EMF metric set (telemetry.py).

What the workers share, and why that is safe:

- the settings (a frozen dataclass) and the stateless pipeline stages;
- the provider, built once under ``App``'s lock: Bedrock's boto3 client (boto3 clients are
  thread-safe; building them is not, so every boto3 client is built under one lock, in
  aws.py, with a connection pool as large as the concurrency) and each stream's own reader
  thread; the OpenAI-compatible upstream's connection pool (``httpclient.Upstream``: idle
  connections under a lock, each connection used by one request at a time, one name
  resolution in flight) and its model list (one fetch in flight); its upstream key
  (``credentials.ApiKey``: read and refreshed under a lock; while one thread refreshes, the
  others keep using the current key); the embedded model (one generation at a time, by its
  own lock; development only);
- the key gate (``auth.Gate``): its key cache is a dict under a lock, with one lookup per key
  in flight (the others wait for it), its table client built once under the key store's
  lock; the limits themselves are conditional DynamoDB writes, safe across threads as across
  environments;
- the deadline watchdog (one thread; its heap under a condition variable, each guard owned by
  one request, and fired in that request's context);
- telemetry: the Powertools logger and stdout, each line written whole under one lock; with
  tracing, the OpenTelemetry tracer and the span exporter's queue (a lock and an append per
  ended span; one export thread), each request's spans tied to it by explicit parents.

Traces (``STREAMGATE_TRACING``): after each invocation's response is written and closed, its
worker waits for the spans to be exported (at most ``STREAMGATE_TRACING_FLUSH_TIMEOUT_MS``, and
not past the deadline) before polling ``next``: the client already has the whole stream, and
Lambda may freeze the environment once ``next`` is called. A failed or hanging export is
logged and its spans dropped; it never fails an invocation.
"""

from __future__ import annotations

import http.client
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from streamgate import aws, deadline, telemetry
from streamgate.config import (
    LambdaEnvironment,
    Settings,
    load_lambda_environment,
    load_settings,
    set_trace_id,
)
from streamgate.deadline import Deadline
from streamgate.errors import ConfigError, StreamgateError
from streamgate.handler import App, Response
from streamgate.relay import RELAYING, Relay
from streamgate.routes import Router
from streamgate.runtime_api import (
    Invocation,
    InvocationError,
    RuntimeAPIClient,
    RuntimeAPIError,
)

logger = logging.getLogger(__name__)

_ERROR_NAME = re.compile(r"[^a-zA-Z]")
# How long past the deadline a response may still take to write (Lambda stops it anyway).
_WRITE_GRACE_S = 5.0


class LambdaContext:
    """The context object handlers expect (the fields Powertools' ``inject_lambda_context``
    reads), built from the ``next`` headers and the environment."""

    def __init__(self, invocation: Invocation, env: LambdaEnvironment) -> None:
        self.aws_request_id = invocation.request_id
        self.invoked_function_arn = invocation.invoked_function_arn
        self.function_name = env.function_name
        self.function_version = env.function_version
        self.memory_limit_in_mb = env.memory_limit_in_mb
        self.log_group_name = env.log_group_name
        self.log_stream_name = env.log_stream_name
        self.client_context = _json_or_none(invocation.client_context)
        self.identity = _json_or_none(invocation.cognito_identity)
        self._deadline_ms = invocation.deadline_ms

    def get_remaining_time_in_millis(self) -> int:
        if self._deadline_ms is None:
            return 0  # no deadline given: no time to start anything in
        return max(0, self._deadline_ms - int(time.time() * 1000))


def error_type(exc: BaseException, prefix: str = "Function") -> str:
    """``Function.<Name>`` matching ``(Runtime|Function)\\.[A-Z][a-zA-Z]+``."""
    name = _ERROR_NAME.sub("", type(exc).__name__) or "Error"
    return f"{prefix}.{name[0].upper()}{name[1:]}"


def _safe_message(exc: BaseException) -> str:
    if isinstance(exc, StreamgateError):
        return exc.message
    return f"{type(exc).__name__} (details in the function's log)"


def run(
    app: App | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    max_invocations: int | None = None,
) -> int:
    """Serve invocations until ``max_invocations`` (a test seam; over all workers) or the
    Runtime API says stop; ``AWS_LAMBDA_MAX_CONCURRENCY`` workers at once."""
    try:
        env = load_lambda_environment(environ)
    except ConfigError as e:
        print(f"streamgate: {e.message}", file=sys.stderr)
        return 1
    client = RuntimeAPIClient(env.runtime_api)
    try:
        if app is None:
            aws.expect_concurrency(env.max_concurrency)
            try:
                settings = _deployable(load_settings(environ), env)
                # Read the routes and build the providers now: a failure is an init error.
                app = App(settings, router=Router(settings, allow_local=False)
                          if settings.routed else None)
                app.router.kinds()
            except Exception as e:
                logger.exception("init failed")
                try:
                    client.post_init_error(error_type(e, "Runtime"), _safe_message(e))
                except (OSError, RuntimeAPIError, http.client.HTTPException):
                    logger.exception("could not report the init error")
                return 1
        return _Workers(app, env, client, max_invocations).run()
    finally:
        client.close()


class _Workers:
    """``env.max_concurrency`` workers sharing one app; the first (or only) one uses the init
    connection and, alone, runs on the calling thread."""

    def __init__(self, app: App, env: LambdaEnvironment, client: RuntimeAPIClient,
                 max_invocations: int | None) -> None:
        self.app, self.env = app, env
        self.clients = [client] + [RuntimeAPIClient(env.runtime_api)
                                   for _ in range(env.max_concurrency - 1)]
        self.concurrent = env.max_concurrency > 1
        # Streams under way wait in one relay thread, not each in its worker (relay.py).
        self.relay = Relay() if self.concurrent and app.settings.relay_loop else None
        self._polls_left = max_invocations
        self._lock = threading.Lock()
        self._stopping = False
        self._status = 0

    def run(self) -> int:
        if not self.concurrent:
            self._loop(0)
            return self._status
        # No process-wide trace header: with invocations side by side it would name some
        # other invocation than the one a library reads it for.
        set_trace_id(None)
        logger.info("serving up to %d invocations at once", len(self.clients))
        threads = [threading.Thread(target=self._work, args=(i,), name=f"streamgate-worker-{i}",
                                    daemon=True) for i in range(len(self.clients))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for client in self.clients[1:]:
            client.close()
        return self._status

    def _work(self, i: int) -> None:
        """One worker thread."""
        try:
            self._loop(i)
        except BaseException:  # noqa: BLE001 - a bug in the loop itself, or an exit asked for
            # (SystemExit): stop everything rather than shrink. The log has the traceback; a
            # thread's exception has nowhere else to go.
            logger.exception("runtime worker %d failed", i)
            self._stop(1)

    def _loop(self, i: int) -> None:
        client = self.clients[i]
        while self._poll_allowed():
            try:
                invocation = client.next_invocation()
            except InvocationError as e:
                logger.error("invocation %s cannot be served: %s", e.request_id, e)
                _report(client, e.request_id, "Runtime.InvalidEvent", str(e))
                continue
            except RuntimeAPIError as e:
                logger.info("runtime loop ends: %s", e)
                self._stop(0)
                return
            except (OSError, http.client.HTTPException) as e:
                if not self._stopping:  # else this poll was cut by _stop
                    logger.error("runtime loop ends: GET next failed (%s)", type(e).__name__)
                    self._stop(1)
                return
            _invoke(client, self.app, self.env, invocation, concurrent=self.concurrent,
                    relay=self.relay)

    def _poll_allowed(self) -> bool:
        """Whether a worker may poll ``next`` again (and one poll fewer is left)."""
        with self._lock:
            if self._stopping or self._polls_left == 0:
                return False
            if self._polls_left is not None:
                self._polls_left -= 1
            return True

    def _stop(self, status: int) -> None:
        """Stop every worker: no more polls, and the polls waiting now are cut (a worker in a
        stream finishes it, and so does one whose poll has just brought an invocation). The
        exit status is the worst given."""
        with self._lock:
            self._stopping = True
            self._status = max(self._status, status)
        for client in self.clients:
            client.stop_polling()


def _invoke(
    client: RuntimeAPIClient, app: App, env: LambdaEnvironment, invocation: Invocation, *,
    concurrent: bool = False, relay: Relay | None = None,
) -> None:
    """Serve one invocation; nothing that goes wrong here leaves this function but what is
    not an ``Exception`` (SystemExit, say: the invocation is answered, then it ends the
    worker). Every line logged about it, by this thread or one it starts, carries its request
    id; with ``concurrent`` workers, its trace header stays in this thread."""
    response: Response | None = None
    try:
        set_trace_id(invocation.trace_id, process_wide=not concurrent)
        telemetry.bind_request(invocation.request_id)
        context = LambdaContext(invocation, env)
        try:
            event = json.loads(invocation.event)
        except (ValueError, RecursionError):
            event = None  # the handler answers an unreadable event with a 400
        # The waits deep in the request (the key lookup, the model list) read it from here.
        with deadline.bound(_deadline(context, app.settings)):
            response = app.handle(event, context)
            # Writes may wait on a Runtime API that reads slowly, but not past the deadline.
            timeout = context.get_remaining_time_in_millis() / 1000 + _WRITE_GRACE_S
            if env.sam_local:
                client.post_response(invocation.request_id, proxy_response(response))
            else:
                relaying = RELAYING.set(relay)  # the body's upstream reads may then park
                try:
                    client.stream_response(
                        invocation.request_id, prelude(response), response.body,
                        lambda: _stream_failure(response), timeout=timeout, relay=relay,
                    )
                finally:
                    RELAYING.reset(relaying)
    except BaseException as e:
        if response is None:
            logger.exception("invocation %s failed before its response", invocation.request_id)
            _report(client, invocation.request_id, error_type(e), _safe_message(e))
        elif isinstance(e, Exception):
            logger.exception("could not deliver the response of %s to the Runtime API",
                             invocation.request_id)
        if not isinstance(e, Exception):
            raise
    finally:
        if response is not None:
            response.close()
        app.telemetry.flush(_remaining_s(invocation))
        telemetry.bind_request(None)
        if concurrent:
            set_trace_id(None, process_wide=False)  # lines between invocations name none


def _remaining_s(invocation: Invocation) -> float:
    """Seconds left before the invocation's deadline (0 without one)."""
    if invocation.deadline_ms is None:
        return 0.0
    return max(0.0, invocation.deadline_ms / 1000 - time.time())


def _deadline(context: LambdaContext, settings: Settings) -> Deadline:
    """The handler's own: the Lambda deadline less the margin."""
    remaining_ms = context.get_remaining_time_in_millis() - settings.deadline_margin_ms
    return Deadline(time.monotonic() + remaining_ms / 1000)


def _report(client: RuntimeAPIClient, request_id: str, kind: str, message: str) -> None:
    """``/invocation/{id}/error``; if even that fails, the log has it."""
    try:
        client.post_error(request_id, kind, message)
    except Exception:  # noqa: BLE001 - the loop goes on whatever the Runtime API does
        logger.exception("could not report the failure of %s to the Runtime API", request_id)


def _deployable(settings: Settings, env: LambdaEnvironment) -> Settings:
    """Lambda refuses to serve without auth unless told so explicitly (``sam local``, being
    local development, is allowed)."""
    if settings.auth == "none" and not settings.allow_unauthenticated and not env.sam_local:
        raise ConfigError("STREAMGATE_AUTH=none lets anyone who finds the URL use the model; "
                          "set STREAMGATE_ALLOW_UNAUTHENTICATED=true if that is intended")
    return settings


def prelude(response: Response) -> dict[str, Any]:
    """The HTTP integration prelude a Function URL (or a streaming REST API) turns into the
    status line and headers."""
    return {"statusCode": response.status, "headers": response.headers, "cookies": []}


def proxy_response(response: Response) -> bytes:
    """The whole response as API Gateway proxy JSON, what `sam local start-api` can parse."""
    body = b"".join(response.body).decode("utf-8")
    return json.dumps({
        "statusCode": response.status,
        "headers": response.headers,
        "body": body,
        "isBase64Encoded": False,
    }).encode()


def _stream_failure(response: Response) -> tuple[str, str] | None:
    """Trailers only for a stream that failed after its 200 was committed."""
    err = response.outcome.error
    if err is None or response.status != 200:
        return None
    return error_type(err), err.message


def _json_or_none(raw: str | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s %(message)s")
    return run()


if __name__ == "__main__":
    sys.exit(main())
