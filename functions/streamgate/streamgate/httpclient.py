"""HTTP/1.1 to an upstream, on the standard library's ``http.client``, every wait bounded.

It streams, takes a timeout per read, keeps connections alive for reuse across invocations of
the container, and costs nothing at cold start; urllib3 (present in the Lambda runtime through
botocore) would add ~20 ms of imports for nothing we use. http.client sends the request and
reads the status and headers; a chunked body is then unframed here (:class:`Dechunker`) from
the socket's reads as they come, so all that one read brought is handed on at once.

Waits: each call names the monotonic instant by which it must have made progress (the caller
combines its own timeout with the request's deadline). Until the response's headers are in,
that instant is both the socket timeout of every ``recv`` and a
:func:`streamgate.deadline.guard` on the socket, so a peer that trickles bytes (a status line, a
chunk-size line, a TLS handshake) cannot stretch a wait past it. The body is then read on a
blocking socket with the guard alone as its bound: moving it is an attribute write, where a
socket timeout costs a ``poll`` and two ``ioctl`` calls around every ``recv`` of a stream. A
wait that ends either way raises :class:`WaitExpired`; the caller says what it was waiting for.
Resolving the host's name (``getaddrinfo``, which takes no timeout and cannot be interrupted)
runs on a helper thread that the connect waits for until the same instant; one resolution per
upstream runs at a time, so a resolver that hangs holds one thread, not one per request.

Kept-alive connections: the upstream may close one while it sits idle (the normal case after
Lambda thaws a container). One that is readable before reuse (a FIN or stray bytes) is
discarded; a write or read that finds the connection closed is retried once on a new one.

The idle pool is a stack: the connection given back last is reused first, so under light
load the same few stay warm and the rest age. Each use (taking one, giving one back) first
closes the idle connections older than ``max_idle_s`` (NAT gateways drop silent flows without
telling either side) and the oldest beyond ``max_idle`` (16), so a burst of N streams leaves
at most that many sockets open, not N, within Lambda's 1,024 descriptors.
"""

from __future__ import annotations

import contextvars
import http.client
import io
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, overload
from urllib.parse import urlsplit

from streamgate.deadline import Deadline, Guard, guard
from streamgate.errors import ConfigError, UpstreamError, UpstreamTimeoutError

# At least the size of http.client's read buffer (io.DEFAULT_BUFFER_SIZE): the first read of a
# chunked body must take all that buffer holds, as later reads bypass it.
READ_SIZE = max(65536, io.DEFAULT_BUFFER_SIZE)
_SMALL_READ = 4096
# Idle connections kept per upstream. Under steady load few are idle at any moment (each is
# taken again as the next request comes), so the cap only trims what a burst left behind;
# past it, a request pays one new connection.
MAX_IDLE = 16


class WaitExpired(Exception):
    """A wait reached the instant it was given, with nothing (or not enough) read."""


class Upstream:
    """Keep-alive HTTP/1.1 connections to one base URL, reused across invocations."""

    def __init__(self, base_url: str, connect_timeout_s: float, *,
                 max_idle_s: float = 60.0, max_idle: int = MAX_IDLE,
                 resolver: Resolver | None = None) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("STREAMGATE_UPSTREAM_BASE_URL must be an http:// or https:// URL "
                              "such as http://127.0.0.1:8000/v1")
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path.rstrip("/")
        self.where = f"{self._host}:{self._port}"  # for messages: never the path or userinfo
        self._connect_timeout_s = connect_timeout_s
        self._max_idle_s = max_idle_s
        self._max_idle = max_idle
        # (given back at, connection), oldest first: taken from the end, trimmed from the front
        self._idle: list[tuple[float, http.client.HTTPConnection]] = []
        self._lock = threading.Lock()
        self._resolver = resolver or _getaddrinfo
        self._resolving: Future[list[AddrInfo]] | None = None  # the resolution in flight

    def open(self, method: str, path: str, body: bytes | None, headers: Mapping[str, str],
             *, until: float, deadline: Deadline) -> Exchange:
        """Send a request and read the response's status and headers by ``until``."""
        reused = self._take_idle()
        if reused is not None:
            try:
                return self._send(reused, method, path, body, headers, until, deadline,
                                  fresh=False)
            except _Stale:
                pass  # the upstream closed a kept-alive connection: use a new one
        return self._send(self._connect(until, deadline), method, path, body, headers, until,
                          deadline, fresh=True)

    def _take_idle(self) -> http.client.HTTPConnection | None:
        while True:
            with self._lock:
                stale = self._trim()
                conn = self._idle.pop()[1] if self._idle else None
            for old in stale:
                old.close()
            if conn is None or not _readable(conn.sock):
                return conn
            conn.close()

    def _trim(self) -> list[http.client.HTTPConnection]:
        """Under the lock: take out the idle connections older than ``max_idle_s`` and the
        oldest beyond ``max_idle``, for the caller to close (outside the lock)."""
        now = time.monotonic()
        cut = 0
        while cut < len(self._idle) and (len(self._idle) - cut > self._max_idle
                                         or now - self._idle[cut][0] > self._max_idle_s):
            cut += 1
        stale = [conn for _, conn in self._idle[:cut]]
        del self._idle[:cut]
        return stale

    def _connect(self, until: float, deadline: Deadline) -> http.client.HTTPConnection:
        """A new connection, TCP and TLS done here so the guard covers the handshake too."""
        conn = (http.client.HTTPSConnection(self._host, self._port, context=self._tls)
                if self._tls is not None else http.client.HTTPConnection(self._host, self._port))
        wait = min(self._connect_timeout_s, until - time.monotonic())
        sock: socket.socket | None = None
        g: Guard | None = None
        try:
            if wait <= 0:
                raise TimeoutError
            sock = self._open_socket(time.monotonic() + wait)
            # As http.client's own connect() does: http.client writes a request's headers and
            # body separately, and on a kept-alive connection Nagle's algorithm would hold the
            # body until the upstream's delayed ACK of the headers, ~40 ms on Linux.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            g = guard(sock, time.monotonic() + wait)
            if self._tls is not None:
                sock = self._tls.wrap_socket(sock, server_hostname=self._host,
                                             do_handshake_on_connect=False)
                g.sock = sock
                sock.do_handshake()
            if g.fired:
                raise TimeoutError
        except OSError as e:  # refused, unreachable, DNS, TLS, or out of time
            _discard(sock, g)
            if isinstance(e, TimeoutError) or (g is not None and g.fired):
                deadline.check()
                raise UpstreamTimeoutError(f"Could not connect to the upstream at {self.where} "
                                           "in time", transient=True) from e
            if isinstance(e, ssl.SSLError):
                raise UpstreamError(f"TLS with the upstream at {self.where} failed") from e
            raise UpstreamError(f"Could not reach the upstream at {self.where}",
                                transient=True) from e
        assert g is not None
        g.cancel()
        conn.sock = sock
        return conn

    def _open_socket(self, until: float) -> socket.socket:
        """A TCP connection to the first of the host's addresses that accepts one by ``until``
        (as ``socket.create_connection``, the name resolved within the same limit)."""
        error: OSError = OSError(f"no address for {self._host}")
        for family, kind, proto, _, address in self._addresses(until):
            left = until - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(left)
                sock.connect(address)
                return sock
            except OSError as e:
                sock.close()
                error = e
        raise error

    def _addresses(self, until: float) -> list[AddrInfo]:
        """The host's addresses by ``until`` (``TimeoutError`` past it). A numeric host needs
        no resolver; a name is resolved on a helper thread, one resolution at a time."""
        try:
            return list(socket.getaddrinfo(self._host, self._port, 0, socket.SOCK_STREAM, 0,
                                           socket.AI_NUMERICHOST))
        except socket.gaierror:
            pass  # a name
        with self._lock:
            flight = self._resolving
            if flight is None:
                flight = self._resolving = Future()
                threading.Thread(target=contextvars.copy_context().run,
                                 args=(self._resolve, flight), name="streamgate-resolve",
                                 daemon=True).start()
        return flight.result(timeout=max(until - time.monotonic(), 0.0))

    def _resolve(self, flight: Future[list[AddrInfo]]) -> None:
        """On the helper thread: one resolution, handed to everyone waiting for it."""
        try:
            addresses = list(self._resolver(self._host, self._port))
        except BaseException as e:  # noqa: BLE001 - handed to the waiters
            with self._lock:
                self._resolving = None
            flight.set_exception(e if isinstance(e, OSError)
                                 else OSError(f"resolving {self._host} failed: {e!r}"))
            return
        with self._lock:
            self._resolving = None
        flight.set_result(addresses)

    def _send(self, conn: http.client.HTTPConnection, method: str, path: str,
              body: bytes | None, headers: Mapping[str, str], until: float,
              deadline: Deadline, *, fresh: bool) -> Exchange:
        # The socket, kept: when the answer will close the connection, getresponse() drops
        # conn.sock (the response reads on through its own file object).
        sock = conn.sock
        assert sock is not None
        g = guard(sock, until)
        try:
            sock.settimeout(max(until - time.monotonic(), 0.001))
            conn.request(method, self._prefix + path, body=body, headers=dict(headers))
            response = conn.getresponse()
            sock.settimeout(None)  # the body's reads: bounded by the guard alone
        except (OSError, http.client.HTTPException) as e:
            g.cancel()
            conn.close()
            if g.fired or isinstance(e, TimeoutError):
                deadline.check()
                raise UpstreamTimeoutError(
                    f"The upstream at {self.where} did not answer in time") from e
            if isinstance(e, ConnectionError):  # RemoteDisconnected is one too
                if not fresh:
                    raise _Stale from e
                raise UpstreamError(f"The upstream at {self.where} closed the connection",
                                    transient=True) from e
            raise UpstreamError(f"The upstream at {self.where} sent a broken response") from e
        return Exchange(self, conn, response, g, sock)

    def give_back(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            self._idle.append((time.monotonic(), conn))
            stale = self._trim()
        for old in stale:
            old.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for _, conn in idle:
            conn.close()


AddrInfo = tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]
# (host, port) -> socket.getaddrinfo's answer; injected by tests (a resolver that hangs).
Resolver = Callable[[str, int], Sequence[AddrInfo]]


def _getaddrinfo(host: str, port: int) -> list[AddrInfo]:
    return list(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))


class _Stale(Exception):
    """A reused connection turned out to be closed before the upstream read our request."""


def _readable(sock: socket.socket | None) -> bool:
    """An idle connection with something to read has been closed (or spoilt) by the peer."""
    if sock is None:
        return True
    try:
        ready, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(ready)


def _discard(sock: socket.socket | None, g: Guard | None) -> None:
    if g is not None:
        g.cancel()
    if sock is not None:
        sock.close()


class Exchange:
    """One request's response: reads bounded by an instant each, then either back to the pool
    (``finish()`` after a complete, keep-alive response) or closed (``close()``)."""

    def __init__(self, upstream: Upstream, conn: http.client.HTTPConnection,
                 response: http.client.HTTPResponse, g: Guard, sock: socket.socket) -> None:
        self._upstream = upstream
        self._conn = conn
        self._response = response
        self._guard = g
        self._done = False
        self.status = response.status
        # A chunked body is read from the socket and unframed here: all that one read brought
        # comes back at once (http.client's read1 stops at each chunk's end, one call per
        # event when an upstream writes each as a chunk), with a fraction of its calls.
        self._chunks = Dechunker() if response.chunked else None
        self._fresh = True
        self._size = _SMALL_READ
        self._recv = sock.recv
        self.sock = sock
        # Reads that must not wait (read(nowait=True)): MSG_DONTWAIT on a plain socket; a TLS
        # socket, which takes no flags, is switched to non-blocking mode instead.
        self._flags = -1  # not set up yet
        self._drained = False
        self._finish_by: float | None = None

    @property
    def chunked(self) -> bool:
        """Whether the body is chunked: only such a body can be read with ``nowait``."""
        return self._chunks is not None

    def header(self, name: str) -> str:
        return self._response.getheader(name, "") or ""

    @overload
    def read(self, until: float) -> bytes: ...

    @overload
    def read(self, until: float, nowait: bool) -> bytes | None: ...

    def read(self, until: float, nowait: bool = False) -> bytes | None:
        """The next bytes of the body (b"" at its end): everything one read of the socket
        delivered. Raises :class:`WaitExpired` when ``until`` passes first, ``UpstreamError``
        if the connection breaks or the chunked framing is broken. With ``nowait`` (a chunked
        body only), None when nothing has arrived: the caller waits for :attr:`sock` to be
        readable (streamgate.relay), and the guard still bounds that wait by ``until``."""
        self._guard.move(until)
        chunks = self._chunks
        if chunks is None:  # a body with a length, or one that ends when the peer closes
            return self._read_plain()
        if nowait and self._flags < 0:
            self._nowait_reads()
        while not chunks.done:
            try:
                if self._fresh:  # all that http.client's buffer holds after the headers
                    # (the first read, always taken before the answer can be relayed)
                    self._fresh = False
                    raw = self._response.fp.read1(READ_SIZE)
                elif nowait:
                    if self._drained:  # the last read took less than it asked: nothing left
                        self._drained = False
                        return None
                    raw = self._recv(self._size, self._flags)
                    self._drained = self._flags != 0 and len(raw) < self._size
                else:
                    raw = self._recv(self._size)
                # Small reads while events come one at a time; whole buffers once a read
                # comes back full (a burst). A 64 KB read for each 200-byte event costs the
                # allocator: its per-thread arenas fragment (+7 MiB of RSS at 50 streams).
                self._size = READ_SIZE if len(raw) == self._size else _SMALL_READ
            except OSError as e:
                if nowait and isinstance(e, (BlockingIOError, ssl.SSLWantReadError)):
                    return None
                if self._guard.fired:
                    raise WaitExpired from e
                raise UpstreamError("The connection to the upstream broke mid-stream") from e
            if not raw:
                if self._guard.fired:
                    raise WaitExpired
                if chunks.ended:  # closed after the last chunk, before the final CRLF:
                    chunks.done = chunks.extra = True  # the body is whole (http.client took it
                    return b""  # so too); the connection is not reused
                raise UpstreamError("The connection to the upstream broke mid-stream")
            data = chunks.feed(raw)
            if data:
                return data
        return b""

    def _read_plain(self) -> bytes:
        try:
            data = self._response.read1(READ_SIZE)
        except TimeoutError as e:
            raise WaitExpired from e
        except (OSError, http.client.HTTPException) as e:
            if self._guard.fired:
                raise WaitExpired from e
            raise UpstreamError("The connection to the upstream broke mid-stream") from e
        if not data and self._guard.fired:
            raise WaitExpired
        return data

    def body(self, limit: int, until: float) -> bytes:
        """The whole body, at most ``limit`` bytes; :class:`WaitExpired` if it is not all there
        by ``until``, ``UpstreamError`` if the connection breaks or it is larger."""
        chunks: list[bytes] = []
        size = 0
        while True:
            data = self.read(until)
            if not data:
                return b"".join(chunks)
            size += len(data)
            if size > limit:
                raise UpstreamError(f"The upstream's answer is larger than {limit} bytes")
            chunks.append(data)

    def finish(self, nowait: bool = False) -> bool:
        """After a complete answer: keep the connection if the upstream allows it. With
        ``nowait``, False when the end of the body has not arrived yet (call again once
        :attr:`sock` is readable); True once done either way."""
        if self._finish_by is None:  # one second for the end, however many calls it takes
            self._finish_by = time.monotonic() + 1.0
        try:
            data = self.read(self._finish_by, nowait)
            if data is None:
                return False
            clean = not data and not self._response.will_close
        except (WaitExpired, UpstreamError):
            clean = False
        if self._chunks is not None and self._chunks.extra:
            clean = False  # bytes after the body: the connection's framing cannot be trusted
        if clean:
            self._done = True
            self._guard.cancel()
            self._response.close()
            if self._flags == 0:  # a TLS socket made non-blocking: as the pool expects it
                self.sock.setblocking(True)
            self._upstream.give_back(self._conn)
        return True

    def _nowait_reads(self) -> None:
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.setblocking(False)
            self._flags = 0
        else:
            self._flags = socket.MSG_DONTWAIT

    def close(self) -> None:
        """Drop the connection unless ``finish()`` returned it (client gone, error, timeout)."""
        if not self._done:
            self._done = True
            self._guard.cancel()
            self._response.close()
            self._conn.close()


# A chunk-size line (RFC 9112 section 7.1): hex digits, then extensions after ";" (ignored),
# and a trailer field line: neither may grow past this.
_MAX_LINE = 4096
_MAX_TRAILER = 65536
_SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)


class Dechunker:
    """``Transfer-Encoding: chunked`` undone incrementally: :meth:`feed` takes bytes as the
    socket gave them, cut anywhere, and returns the body bytes among them. Lines end with
    CRLF or a bare LF (as http.client accepts); a size is 1-16 hex digits; any other framing
    is an ``UpstreamError``. ``done`` once the last chunk and the trailer section have ended;
    ``extra`` if bytes came after that."""

    __slots__ = ("_state", "_left", "_line", "_trailer", "done", "extra")

    def __init__(self) -> None:
        self._state = _SIZE
        self._left = 0
        self._line = b""
        self._trailer = 0
        self.done = False
        self.extra = False

    def feed(self, raw: bytes) -> bytes:
        if self._state == _SIZE and not self._line:
            # What one read nearly always brings while events come one at a time: exactly one
            # whole chunk, CRLF after its size and its data. The same checks as below, at once.
            eol = raw.find(b"\n", 0, _MAX_LINE)
            if eol > 0 and raw[eol - 1] == 13 and raw.endswith(b"\r\n"):
                size = raw[:eol - 1]
                if _HEX.fullmatch(size) and int(size, 16) == len(raw) - eol - 3 > 0:
                    return raw[eol + 1:-2]
        out: list[bytes] = []
        pos, end = 0, len(raw)
        while pos < end:
            if self._state == _DATA:
                take = min(self._left, end - pos)
                out.append(raw if take == end else raw[pos:pos + take])  # no copy if all
                pos += take
                self._left -= take
                if not self._left:
                    self._state = _DATA_END
                continue
            if self._state == _DONE:
                self.extra = True
                break
            eol = raw.find(b"\n", pos)
            if eol < 0:
                self._line += raw[pos:]
                if len(self._line) > _MAX_LINE:
                    raise UpstreamError("The upstream sent a malformed chunked body")
                break
            line = raw[pos:eol]
            if self._line:
                line = self._line + line
                self._line = b""
            pos = eol + 1
            if len(line) > _MAX_LINE:
                raise UpstreamError("The upstream sent a malformed chunked body")
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._state == _DATA_END:
                if line:
                    raise UpstreamError("The upstream sent a malformed chunked body")
                self._state = _SIZE
            else:
                self._end_line(line)
        return out[0] if len(out) == 1 else b"".join(out)

    @property
    def ended(self) -> bool:
        """The last chunk has come: the body is whole, only the trailer section may follow."""
        return self._state >= _TRAILER

    def _end_line(self, line: bytes) -> None:
        if self._state == _SIZE:
            size = line.split(b";", 1)[0].strip(b" \t")
            if not _HEX.fullmatch(size):
                raise UpstreamError("The upstream sent a malformed chunked body")
            self._left = int(size, 16)
            self._state = _DATA if self._left else _TRAILER
        elif line:  # _TRAILER: a trailer field, not used
            self._trailer += len(line)
            if self._trailer > _MAX_TRAILER:
                raise UpstreamError("The upstream sent a malformed chunked body")
        else:
            self._state = _DONE
            self.done = True


_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
