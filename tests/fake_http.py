"""What the fake peers (Runtime API, Bedrock, OpenAI-compatible upstream) share: a loopback
server on an ephemeral port that stops quickly, and scripted chunked bodies."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def start_server(handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """Serving on 127.0.0.1:<ephemeral> in a daemon thread; ``shutdown()`` returns fast."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
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
