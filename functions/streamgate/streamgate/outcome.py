"""What happened to one request: the record the pipeline fills in while it answers, and that
auth (usage), telemetry (the log record, metrics, traces) and the drivers read when the
response is closed. It sits below all of them, so none imports another to reach it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamgate.errors import StreamgateError
    from streamgate.providers import FinishReason, Usage


@dataclass(slots=True)
class Outcome:
    """What happened to one request, filled in while the body streams; telemetry reads it when
    the response is closed."""

    request_id: str = ""
    method: str = ""
    path: str = ""
    # The API dialect that answered ("chat", "responses", ...), once the path has chosen one.
    dialect: str = ""
    # gen_ai.operation.name: "chat" (Chat Completions, Responses) or "embeddings".
    operation: str = "chat"
    stream: bool = False
    caller: str = ""  # key id or IAM ARN, never a key
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    trace: Any = None  # the request's spans (telemetry.begin_request), when tracing
    # The route's target that answered, and the targets skipped or failed before it.
    backend: str | None = None
    fallbacks: list[dict[str, str]] = field(default_factory=list)
    # Only with STREAMGATE_LOG_CONTENT (debugging): the text in and out.
    prompt_text: str | None = None
    completion_text: list[str] = field(default_factory=list)
    model: str | None = None
    error: StreamgateError | None = None
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    chunks: int = 0
    # What the provider produced (content deltas and their characters), to charge a stream
    # that ended without usage.
    deltas: int = 0
    produced_chars: int = 0
