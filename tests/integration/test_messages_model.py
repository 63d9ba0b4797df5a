"""Anthropic's Messages API on the real embedded model, through the official ``anthropic`` SDK
against the dev server: exact token counts, the client's stop sequence named, top_k honoured
(the SDK's 2.x ``create`` has no sampling arguments: they travel in ``extra_body``)."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

pytestmark = pytest.mark.model

MODEL = "gemma-3-270m"
SYSTEM = "You are a sailor."
ASK: list[Any] = [{"role": "user", "content": "Describe the sea in one long sentence."}]


def _client(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="unused-locally", max_retries=0,
                               timeout=120)


def test_count_tokens_is_what_the_model_then_reads(model_server: str) -> None:
    # WHEN a client counts a request's tokens, then sends it
    with _client(model_server) as client:
        counted = client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=ASK)
        message = client.messages.create(model=MODEL, system=SYSTEM, messages=ASK,
                                         max_tokens=5)
    # THEN the count is exactly the input the model was charged for
    assert counted.input_tokens == message.usage.input_tokens > 10


def test_the_clients_stop_sequence_ends_the_answer_and_is_named(model_server: str) -> None:
    # WHEN a client stops at the first space (a sentence has one well within 60 tokens)
    with _client(model_server) as client:
        message = client.messages.create(
            model=MODEL, system=SYSTEM, messages=ASK, max_tokens=60, stop_sequences=[" "],
            extra_body={"temperature": 0})
    # THEN the answer is the first word, and Anthropic's fields say which sequence ended it
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", " ")
    (block,) = message.content
    assert block.type == "text" and block.text and " " not in block.text


def test_top_k_of_one_samples_the_likeliest_token_even_at_full_temperature(
        model_server: str) -> None:
    # WHEN the same request is sent twice at temperature 1 with top_k 1
    with _client(model_server) as client:
        texts = [client.messages.create(
            model=MODEL, messages=ASK, max_tokens=24,
            extra_body={"temperature": 1, "top_k": 1}).content[0].text for _ in range(2)]
    # THEN both answers are the one greedy answer (at the default top_k of 64 two 24-token
    # samples at temperature 1 would differ)
    assert texts[0] and texts[0] == texts[1]
