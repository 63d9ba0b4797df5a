"""A faster JSON library where the relay still parses (issue 25): is orjson or msgspec worth it?

    make bench-json

Where JSON remains on the relay's hot path: each upstream event is parsed once
(``providers.openai._json``: the stdlib's C scanner, ``json.loads`` deciding what it does not
scan whole), and a Chat Completions text event encodes only its text (``sse.text_bytes``).
This measures, in this process, per event:

- parsing three upstream events of the shapes a relay sees (a content chunk, a tool-call
  fragment, the usage chunk) with the relay's parser, ``json.loads``, ``orjson.loads`` and a
  ``msgspec.json.Decoder``;
- encoding a piece of text: ``sse.text_bytes`` against ``orjson.dumps``;
- what importing each library adds to a cold start: a fresh interpreter that has already
  imported the function's handler and the OpenAI provider, then times the import (median of
  5 interpreters);
- whether each library gives the relay's answer on inputs where JSON parsers are known to
  differ (big integers, NaN, lone surrogates, deep nesting): run here, not asserted.

Medians of 7 repetitions; machines here are shared, so compare within one run.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import orjson

from streamgate import sse
from streamgate.providers.openai import _json

ROOT = Path(__file__).resolve().parent.parent

EVENTS = {
    "content chunk": {"id": "chatcmpl-9xYz", "object": "chat.completion.chunk",
                      "created": 1764777777, "model": "gpt-4o-mini-2024-07-18",
                      "system_fingerprint": "fp_0ba0d124f1",
                      "choices": [{"index": 0, "delta": {"content": " streaming"},
                                   "logprobs": None, "finish_reason": None}]},
    "tool-call piece": {"id": "chatcmpl-9xYz", "object": "chat.completion.chunk",
                        "created": 1764777777, "model": "gpt-4o-mini-2024-07-18",
                        "choices": [{"index": 0, "delta": {"tool_calls": [
                            {"index": 0, "function": {"arguments": "{\"city\": \"Pa"}}]},
                            "logprobs": None, "finish_reason": None}]},
    "usage chunk": {"id": "chatcmpl-9xYz", "object": "chat.completion.chunk",
                    "created": 1764777777, "model": "gpt-4o-mini-2024-07-18", "choices": [],
                    "usage": {"prompt_tokens": 1234, "completion_tokens": 567,
                              "total_tokens": 1801,
                              "prompt_tokens_details": {"cached_tokens": 1024}}},
}

# Inputs on which JSON parsers are known to disagree (what an upstream might send).
EDGES = ['{"n": 123456789012345678901234567890}', '{"n": 18446744073709551616}',
         '{"x": NaN}', '{"x": 1e400}', '{"s": "\\ud800"}', "[" * 5000 + "]" * 5000]


def per_call_us(fn: Callable[[], object], number: int = 20000) -> float:
    return statistics.median(timeit.repeat(fn, number=number, repeat=7)) / number * 1e6


def import_ms(module: str) -> float:
    code = ("import time, streamgate.handler, streamgate.providers.openai\n"
            f"t = time.perf_counter(); import {module}\n"
            "print((time.perf_counter() - t) * 1000)")
    env = {"PYTHONPATH": str(ROOT / "functions" / "streamgate"), "PYTHONDONTWRITEBYTECODE": "1"}
    runs = [float(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                 capture_output=True, text=True).stdout) for _ in range(5)]
    return statistics.median(runs)


def outcome(parse: Callable[[str], Any], text: str) -> str:
    try:
        return repr(parse(text))[:40]
    except Exception as e:  # noqa: BLE001 - any refusal is an answer here
        return type(e).__name__


def main() -> None:
    decoder = msgspec.json.Decoder()
    parsers: dict[str, Callable[[str], Any]] = {
        "relay (_json)": _json, "json.loads": json.loads, "orjson.loads": orjson.loads,
        "msgspec": decoder.decode}
    print("Parsing one upstream event, us (median of 7 x 20,000)")
    print(f"  {'event':16s}" + "".join(f"{name:>15s}" for name in parsers))
    for label, doc in EVENTS.items():
        text = json.dumps(doc, separators=(",", ":"))
        assert all(parse(text) == doc for parse in parsers.values())
        figures = [per_call_us(lambda p=parse, t=text: p(t)) for parse in parsers.values()]
        print(f"  {label:16s}" + "".join(f"{f:15.2f}" for f in figures))
    piece = " streaming"
    assert orjson.dumps(piece) == sse.text_bytes(piece)
    print("Encoding a text piece, us: sse.text_bytes "
          f"{per_call_us(lambda: sse.text_bytes(piece)):.2f}, orjson.dumps "
          f"{per_call_us(lambda: orjson.dumps(piece)):.2f}")
    print("Import after the handler and the OpenAI provider (cold start), ms, median of 5: "
          f"orjson {import_ms('orjson'):.2f}, msgspec.json {import_ms('msgspec.json'):.2f}")
    print("Where parsers disagree (the relay's parser, then each other):")
    for text in EDGES:
        ours = outcome(_json, text)
        others = {name: outcome(parse, text) for name, parse in parsers.items()
                  if name != "relay (_json)"}
        print(f"  {text[:36]!s:38s} relay: {ours:28s} " + ", ".join(
            f"{name}: {'same' if got == ours else got}" for name, got in others.items()))


if __name__ == "__main__":
    main()
