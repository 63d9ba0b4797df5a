"""Checks every embeddings test shares: an answer valid against openai-python's own types,
with nothing those types do not know, and vector arithmetic."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Sequence
from typing import Any


def strict_response(doc: dict[str, Any]) -> Any:
    """``doc`` as openai-python's ``CreateEmbeddingResponse``, validated strictly (no coercion),
    every object of it without a key the type does not declare. Base64 vectors are decoded
    first, as the SDK does before it builds the type."""
    from openai.types import CreateEmbeddingResponse

    decoded = {**doc, "data": [
        {**item, "embedding": decode_base64(item["embedding"])}
        if isinstance(item.get("embedding"), str) else item for item in doc["data"]]}
    parsed = CreateEmbeddingResponse.model_validate(decoded, strict=True)
    for model in (parsed, parsed.usage, *parsed.data):
        assert not model.model_extra, model.model_extra
    assert [item.index for item in parsed.data] == list(range(len(parsed.data)))
    return parsed


def decode_base64(text: str) -> list[float]:
    """OpenAI's base64 embedding: little-endian float32."""
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
