"""Client for the Lambda Runtime API, 2018-06-01, with response streaming (stdlib only).

https://docs.aws.amazon.com/lambda/latest/dg/runtimes-api.html and
https://docs.aws.amazon.com/lambda/latest/dg/runtimes-custom.html#runtimes-custom-response-streaming.
The only module that talks to the Runtime API.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

# --- Wire constants -----------------------------------------------------------------------------
API_VERSION = "2018-06-01"
NEXT_PATH = f"/{API_VERSION}/runtime/invocation/next"
RESPONSE_PATH = f"/{API_VERSION}/runtime/invocation/{{request_id}}/response"
ERROR_PATH = f"/{API_VERSION}/runtime/invocation/{{request_id}}/error"
INIT_ERROR_PATH = f"/{API_VERSION}/runtime/init/error"

HEADER_REQUEST_ID = "Lambda-Runtime-Aws-Request-Id"
HEADER_DEADLINE_MS = "Lambda-Runtime-Deadline-Ms"
HEADER_FUNCTION_ARN = "Lambda-Runtime-Invoked-Function-Arn"
HEADER_TRACE_ID = "Lambda-Runtime-Trace-Id"
HEADER_CLIENT_CONTEXT = "Lambda-Runtime-Client-Context"
HEADER_COGNITO_IDENTITY = "Lambda-Runtime-Cognito-Identity"
HEADER_RESPONSE_MODE = "Lambda-Runtime-Function-Response-Mode"
HEADER_ERROR_TYPE = "Lambda-Runtime-Function-Error-Type"
HEADER_ERROR_BODY = "Lambda-Runtime-Function-Error-Body"

STREAMING = "streaming"
HTTP_INTEGRATION_CONTENT_TYPE = "application/vnd.awslambda.http-integration-response"
# The prelude JSON and the body are separated by exactly eight NUL bytes.
PRELUDE_SEPARATOR = b"\x00" * 8
# ------------------------------------------------------------------------------------------------


class RuntimeAPIError(Exception):
    """The Runtime API answered something a runtime cannot continue from."""


@dataclass(frozen=True, slots=True)
class Invocation:
    request_id: str
    deadline_ms: int
    invoked_function_arn: str
    trace_id: str | None
    client_context: str | None
    cognito_identity: str | None
    event: bytes


def error_payload(error_type: str, message: str) -> dict[str, Any]:
    """The error document Lambda expects; never a stack trace from our code."""
    return {"errorType": error_type, "errorMessage": message, "stackTrace": []}


class RuntimeAPIClient:
    """One keep-alive connection to the Runtime API, used for one request at a time."""

    def __init__(self, address: str) -> None:
        host, _, port = address.rpartition(":")
        self._host, self._port = host, int(port)
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            conn = http.client.HTTPConnection(self._host, self._port)
            conn.connect()
            # Each SSE event is written as soon as it is made: no Nagle delay on small chunks.
            assert conn.sock is not None
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._conn = conn
        return self._conn

    def _exchange(
        self, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=headers or {})
                response = conn.getresponse()
                return response.status, response.headers, response.read()
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def next_invocation(self) -> Invocation:
        """Long-poll ``GET next``; raises RuntimeAPIError if the API says stop (e.g. 410)."""
        status, headers, body = self._exchange("GET", NEXT_PATH)
        if status != 200:
            raise RuntimeAPIError(f"GET next answered {status}")
        request_id = headers.get(HEADER_REQUEST_ID)
        if not request_id:
            raise RuntimeAPIError(f"GET next answered without {HEADER_REQUEST_ID}")
        return Invocation(
            request_id=request_id,
            deadline_ms=int(headers.get(HEADER_DEADLINE_MS) or 0),
            invoked_function_arn=headers.get(HEADER_FUNCTION_ARN, ""),
            trace_id=headers.get(HEADER_TRACE_ID),
            client_context=headers.get(HEADER_CLIENT_CONTEXT),
            cognito_identity=headers.get(HEADER_COGNITO_IDENTITY),
            event=body,
        )

    def post_response(self, request_id: str, body: bytes) -> None:
        """A buffered (non-streaming) response, for `sam local`."""
        status, _, _ = self._exchange(
            "POST", RESPONSE_PATH.format(request_id=request_id), body,
            {"Content-Type": "application/json"},
        )
        if status != 202:
            raise RuntimeAPIError(f"POST response answered {status}")

    def post_error(self, request_id: str, error_type: str, message: str) -> None:
        """Report a failure before any response byte was sent."""
        self._post_error(ERROR_PATH.format(request_id=request_id), error_type, message)

    def post_init_error(self, error_type: str, message: str) -> None:
        self._post_error(INIT_ERROR_PATH, error_type, message)

    def _post_error(self, path: str, error_type: str, message: str) -> None:
        body = json.dumps(error_payload(error_type, message)).encode()
        status, _, _ = self._exchange(
            "POST", path, body,
            {"Content-Type": "application/json", HEADER_ERROR_TYPE: error_type},
        )
        if status != 202:
            raise RuntimeAPIError(f"POST {path} answered {status}")

    def stream_response(
        self,
        request_id: str,
        prelude: dict[str, Any],
        events: Iterable[bytes],
        failure: Callable[[], tuple[str, str] | None],
    ) -> None:
        """One chunked POST: prelude JSON + 8 NULs, then each event as its own chunk, then the
        terminator, with real trailers if ``failure()`` - asked once ``events`` is exhausted -
        names an error type and message.
        """
        conn = self._connection()
        try:
            conn.putrequest("POST", RESPONSE_PATH.format(request_id=request_id),
                            skip_accept_encoding=True)
            conn.putheader(HEADER_RESPONSE_MODE, STREAMING)
            conn.putheader("Transfer-Encoding", "chunked")
            conn.putheader("Content-Type", HTTP_INTEGRATION_CONTENT_TYPE)
            conn.putheader("Trailer", f"{HEADER_ERROR_TYPE}, {HEADER_ERROR_BODY}")
            conn.endheaders()
            _chunk(conn, json.dumps(prelude, separators=(",", ":")).encode() + PRELUDE_SEPARATOR)
            for event in events:
                if event:
                    _chunk(conn, event)
            conn.send(b"0\r\n" + _trailers(failure()) + b"\r\n")
            response = conn.getresponse()
            response.read()
        except (ConnectionError, http.client.HTTPException):
            self.close()
            raise
        if response.status != 202:
            raise RuntimeAPIError(f"POST response answered {response.status}")


def _chunk(conn: http.client.HTTPConnection, data: bytes) -> None:
    conn.send(b"%x\r\n%s\r\n" % (len(data), data))


def _trailers(failure: tuple[str, str] | None) -> bytes:
    if failure is None:
        return b""
    error_type, message = failure
    encoded = base64.b64encode(json.dumps(error_payload(error_type, message)).encode())
    return (f"{HEADER_ERROR_TYPE}: {error_type}\r\n".encode()
            + f"{HEADER_ERROR_BODY}: ".encode() + encoded + b"\r\n")
