"""Baseline for the cold-start benchmark: the common alternative, a FastAPI app under uvicorn
(as the Lambda Web Adapter runs it) streaming SSE from a boto3 Bedrock client built at import."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

app = FastAPI()
bedrock = boto3.client("bedrock-runtime", region_name="us-east-1")


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/v1/chat/completions")
def chat() -> StreamingResponse:
    def events() -> Iterator[bytes]:
        yield b"data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
