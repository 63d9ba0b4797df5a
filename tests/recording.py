"""An App that records each request a client sent (headers, JSON body) and the bytes it was
answered with: what the client tests assert about real clients, and check against the types."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from streamgate.deadline import Deadline
from streamgate.handler import App, LambdaContext, Response


@dataclass
class Exchange:
    headers: dict[str, str]
    body: dict[str, Any]
    status: int
    sent: list[bytes] = field(default_factory=list)

    @property
    def answer(self) -> bytes:
        return b"".join(self.sent)


class Recording(App):
    exchanges: list[Exchange]

    def handle(self, event: Mapping[str, Any], context: LambdaContext | None = None, *,
               deadline: Deadline | None = None, own_origin: str | None = None) -> Response:
        response = super().handle(event, context, deadline=deadline, own_origin=own_origin)
        body = event.get("body") or ""
        if event.get("isBase64Encoded"):
            body = base64.b64decode(body).decode()
        exchange = Exchange(dict(event["headers"]), json.loads(body) if body else {},
                            response.status)
        self.exchanges.append(exchange)
        response.body = _tee(response.body, exchange.sent)
        return response


def recording(app: App) -> Recording:
    """``app``'s settings and router, recording."""
    recorder = Recording(app.settings, router=app.router)
    recorder.exchanges = []
    return recorder


def _tee(body: Iterator[bytes], sent: list[bytes]) -> Iterator[bytes]:
    try:
        for piece in body:
            sent.append(piece)
            yield piece
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
