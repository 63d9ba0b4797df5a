"""What the fake peers (Runtime API, Bedrock, OpenAI-compatible upstream) share: a loopback
server on an ephemeral port that stops quickly, and scripted chunked bodies."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def start_server(handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1",
                 ) -> ThreadingHTTPServer:
    """Serving on ``host``:<ephemeral> (loopback unless a container must reach it through its
    bridge address) in a daemon thread; ``shutdown()`` returns fast."""
    server = ThreadingHTTPServer((host, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                     daemon=True).start()
    return server


def write_chunked(handler: BaseHTTPRequestHandler, items: list[bytes | float], *,
                  cut: bool = False) -> bool:
    """Write ``items`` as HTTP/1.1 chunks (floats are pauses), then the last chunk unless
    ``cut``. False when the client hung up before the end."""
    try:
        for item in items:
            if isinstance(item, float):
                time.sleep(item)
                continue
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(item), item))
            handler.wfile.flush()
        if cut:
            handler.close_connection = True
            return True
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()
        return True
    except (ConnectionError, TimeoutError):
        handler.close_connection = True
        return False


class RawPeer:
    """A loopback TCP server that hands each accepted connection to ``serve(sock)``, for peers
    no HTTP library would play: trickled status lines, endless lines, replies cut short. It
    records how many connections it accepted and closes everything on ``close()``."""

    def __init__(self, serve: Callable[[socket.socket], None]) -> None:
        self._serve = serve
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self._serve(conn)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_request(sock: socket.socket) -> bytes:
    """The head and Content-Length body of one HTTP request read off ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        got = sock.recv(65536)
        if not got:
            return data
        data += got
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        got = sock.recv(65536)
        if not got:
            break
        body += got
    return head + b"\r\n\r\n" + body
