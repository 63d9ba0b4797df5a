"""OpenAI ``chat.completion.chunk`` and ``chat.completion`` objects.

https://platform.openai.com/docs/api-reference/chat-streaming/streaming — ``id`` and ``created``
are the same on every chunk; the first delta carries ``"role": "assistant"``; the last choice
chunk carries ``finish_reason``; with ``stream_options.include_usage`` every chunk has
``"usage": null`` and one extra chunk with ``"choices": []`` carries the usage. Tool calls
stream as ``delta.tool_calls[]`` fragments keyed by ``index``; reasoning as
``delta.reasoning_content`` (the field vLLM, DeepSeek and most gateways use).
"""

from __future__ import annotations

import os
import time
from typing import Any

from streamgate.providers import FinishReason, ToolCallDelta, Usage


def new_completion_id() -> str:
    return "chatcmpl-" + os.urandom(12).hex()


def usage_object(usage: Usage) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    # cached_tokens is OpenAI's field; cache_write_tokens has no OpenAI twin, so it is named
    # for what it counts (prompt tokens written to the cache, billed differently). Only what
    # the provider reported appears.
    details = {name: value for name, value in (("cached_tokens", usage.cached_tokens),
                                               ("cache_write_tokens", usage.cache_write_tokens))
               if value is not None}
    if details:
        doc["prompt_tokens_details"] = details
    return doc


def tool_call_object(index: int, call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"index": index, "id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


class ChunkBuilder:
    """Builds the chunks of one completion; keeps ``id``/``created``/``model`` constant."""

    __slots__ = ("completion_id", "created", "model", "include_usage", "_role_sent")

    def __init__(
        self,
        model: str,
        *,
        include_usage: bool = False,
        completion_id: str | None = None,
        created: int | None = None,
    ) -> None:
        self.completion_id = completion_id or new_completion_id()
        self.created = int(time.time()) if created is None else created
        self.model = model
        self.include_usage = include_usage
        self._role_sent = False

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def _delta(self, delta: dict[str, Any], finish_reason: FinishReason | None) -> dict[str, Any]:
        if not self._role_sent:
            delta = {"role": "assistant", **delta}
            self._role_sent = True
        return self._chunk(
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )

    def text(self, text: str) -> dict[str, Any]:
        return self._delta({"content": text}, None)

    def reasoning(self, text: str) -> dict[str, Any]:
        return self._delta({"reasoning_content": text}, None)

    def tool_call(self, delta: ToolCallDelta) -> dict[str, Any]:
        """One fragment: id/type/name on a call's first, argument pieces after."""
        if delta.id is not None:
            call = tool_call_object(delta.index, delta.id, delta.name or "", delta.arguments)
        else:
            call = {"index": delta.index, "function": {"arguments": delta.arguments}}
        return self._delta({"tool_calls": [call]}, None)

    def finish(self, reason: FinishReason) -> dict[str, Any]:
        # A finish with no content before it still needs the role on the first delta.
        return self._delta({} if self._role_sent else {"content": ""}, reason)

    def usage(self, usage: Usage) -> dict[str, Any]:
        chunk = self._chunk([])
        chunk["usage"] = usage_object(usage)
        return chunk

    def completion(
        self,
        text: str,
        finish_reason: FinishReason,
        usage: Usage | None,
        *,
        reasoning: str = "",
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """The non-streaming ``chat.completion`` object for the same id/created/model."""
        message: dict[str, Any] = {
            "role": "assistant",
            # OpenAI sends null content when the answer is only tool calls.
            "content": text if text or not tool_calls else None,
            "refusal": None,
        }
        if tool_calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"}
                                     for c in tool_calls]
        if reasoning:
            message["reasoning_content"] = reasoning
        body: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
        }
        if usage is not None:
            body["usage"] = usage_object(usage)
        return body
