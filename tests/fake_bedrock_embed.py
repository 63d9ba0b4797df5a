"""A fake Amazon Bedrock Runtime endpoint for InvokeModel on the embedding models, so botocore's
own serializer and parser run: ``POST /model/{modelId}/invoke`` with the JSON bodies Titan Text
Embeddings V2 and Cohere Embed v3 take, answered with the bodies they return (and Bedrock's
``X-Amzn-Bedrock-Input-Token-Count`` header), or with AWS JSON errors (``x-amzn-ErrorType``).

It checks requests as those models do (unknown fields, Titan's sizes, Cohere's 96 texts and
input types) and answers a ValidationException as they would. Vectors are a deterministic
function of the text (the same text, the same vector), unit length when Titan is asked to
normalise. It records each request, how many were in flight at once, and replays scripted
errors first.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote

from tests.fake_http import start_server

TITAN = "amazon.titan-embed-text-v2:0"
COHERE = "cohere.embed-english-v3"
_TITAN_FIELDS = {"inputText", "dimensions", "normalize", "embeddingTypes"}
_COHERE_FIELDS = {"texts", "input_type", "truncate", "embedding_types", "images"}
_COHERE_TYPES = {"search_document", "search_query", "classification", "clustering"}


def vector(text: str, size: int, *, unit: bool = True) -> list[float]:
    """A deterministic vector for ``text`` (float32 values, as Bedrock's are)."""
    raw = b""
    counter = 0
    while len(raw) < size * 4:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    values = [(b - 127.5) / 127.5 for b in raw[:size]]
    if unit:
        norm = math.sqrt(sum(v * v for v in values))
        values = [v / norm for v in values]
    return list(struct.unpack(f"<{size}f", struct.pack(f"<{size}f", *values)))


def tokens(text: str) -> int:
    return len(text.split())


@dataclass
class Failure:
    """A scripted error answer."""

    status: int
    error_type: str
    message: str = "scripted"


class FakeBedrockEmbed:
    def __init__(self, failures: list[Failure] | None = None, *, delay_s: float = 0.0) -> None:
        self.failures = list(failures or [])
        self.delay_s = delay_s
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self._lock = threading.Lock()
        self._clients: list[Any] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - stdlib naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                model = unquote(self.path.split("/")[2])  # /model/{modelId}/invoke
                doc = json.loads(body or b"{}")
                with fake._lock:
                    fake.requests.append((model, doc))
                    fake.in_flight += 1
                    fake.most_in_flight = max(fake.most_in_flight, fake.in_flight)
                    failure = fake.failures.pop(0) if fake.failures else None
                try:
                    time.sleep(fake.delay_s)
                    if failure is not None:
                        self._send(failure.status, {"message": failure.message},
                                   {"x-amzn-ErrorType": failure.error_type})
                    elif not self.path.endswith("/invoke"):
                        self._send(404, {"message": "unknown operation"},
                                   {"x-amzn-ErrorType": "UnknownOperationException"})
                    elif model.endswith(TITAN):
                        self._titan(doc)
                    elif "cohere.embed" in model:
                        self._cohere(doc)
                    else:
                        self._send(400, {"message": "The provided model identifier is invalid."},
                                   {"x-amzn-ErrorType": "ValidationException"})
                finally:
                    with fake._lock:
                        fake.in_flight -= 1

            def _titan(self, doc: dict[str, Any]) -> None:
                size = doc.get("dimensions", 1024)
                text = doc.get("inputText")
                if set(doc) - _TITAN_FIELDS or not isinstance(text, str) or not text:
                    return self._invalid("Malformed input request, please reformat your input "
                                         "and try again.")
                if size not in (256, 512, 1024):
                    return self._invalid(f"dimensions {size} is not one of [256, 512, 1024]")
                if tokens(text) > 8192:
                    return self._invalid("Too many input tokens. Max input tokens: 8192")
                self._send(200, {"embedding": vector(text, size,
                                                     unit=doc.get("normalize", True)),
                                 "embeddingsByType": {}, "inputTextTokenCount": tokens(text)},
                           {"X-Amzn-Bedrock-Input-Token-Count": str(tokens(text))})

            def _cohere(self, doc: dict[str, Any]) -> None:
                texts = doc.get("texts")
                if (set(doc) - _COHERE_FIELDS or not isinstance(texts, list) or not texts
                        or doc.get("input_type") not in _COHERE_TYPES):
                    return self._invalid("Malformed input request: #: required key "
                                         "[input_type] not found")
                if len(texts) > 96:
                    return self._invalid("Malformed input request: #/texts: expected maximum "
                                         "item count: 96")
                self._send(200, {"embeddings": [vector(t, 1024, unit=False) for t in texts],
                                 "id": "emb-1", "response_type": "embeddings_floats",
                                 "texts": texts},
                           {"X-Amzn-Bedrock-Input-Token-Count":
                            str(sum(tokens(t) for t in texts))})

            def _invalid(self, message: str) -> None:
                self._send(400, {"message": message}, {"x-amzn-ErrorType": "ValidationException"})

            def _send(self, status: int, doc: dict[str, Any], headers: dict[str, str]) -> None:
                payload = json.dumps(doc).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = start_server(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "bedrock-runtime", endpoint_url=self.url, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
            config=Config(retries={"mode": "standard", "total_max_attempts": 1},
                          max_pool_connections=16))
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> FakeBedrockEmbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
