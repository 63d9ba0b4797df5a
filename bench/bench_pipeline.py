"""Figures for the pipeline and the embedded model (issue: streaming chat completions).

    make bench    # PYTHONPATH=functions/streamgate .venv/bin/python bench/bench_pipeline.py

1. The embedded model through the dev server, read like a user does (requests, `data:` lines),
   prompt "Explain streaming APIs", default settings, 20 requests: time to first token p50/p95,
   tokens per second, characters and chunks per answer (median and shortest: the seed's
   contract is more than 1,375 characters in at least 5 chunks, every time), and the time a
   whole answer takes. ``--min-tokens N`` sets the embedded model's default minimum
   (``STREAMGATE_LOCAL_DEFAULT_MIN_TOKENS``) to compare; 0 is the model left alone.
2. The pipeline's own cost with an instant provider, per API dialect (Chat Completions,
   Responses): added time to first byte over calling the provider directly, and microseconds
   per chunk for parsing + event building + SSE encoding; then the relay path (the openai
   provider reading a scripted upstream on loopback): CPU per stream and per chunk, per
   dialect, and the Responses/chat ratio (issue 21: at most 1.10).
3. The upstream SSE decoder: one event of 2, 4, 8 and 16 MB fed in 64 KB reads (the cost must
   grow linearly: the ratio to the 2 MB figure should stay near 1, 2, 4, 8), and small events.

Prints medians measured in this one run; machines here are shared, so compare ratios, not runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Iterator
from typing import Any

import requests

from streamgate.config import load_settings
from streamgate.deadline import NO_DEADLINE, Deadline
from streamgate.devserver import serve
from streamgate.handler import App
from streamgate.providers import Delta, Finish, TextDelta, Usage
from streamgate.validation import ChatRequest

PROMPT = "Explain streaming APIs"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def bench_model(requests_n: int, min_tokens: int | None) -> None:
    from streamgate.providers import local

    floor = {} if min_tokens is None else {"local_default_min_tokens": min_tokens}
    settings = load_settings({}, provider="local", metrics=False, **floor)
    app = App(settings, local.create(settings))
    server = serve("127.0.0.1", 0, app)
    url = f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
    ttft, rates, chars, chunks, tokens, totals = [], [], [], [], [], []
    try:
        for _ in range(requests_n):
            start = time.perf_counter()
            first = None
            text, n = [], 0
            usage: dict[str, Any] = {}
            body = {"prompt": PROMPT, "stream": True, "stream_options": {"include_usage": True}}
            with requests.post(url, json=body, stream=True, timeout=300) as r:
                for line in r.iter_lines():
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk["choices"]:
                        piece = choice["delta"].get("content")
                        if piece:
                            first = first or time.perf_counter()
                            text.append(piece)
                            n += 1
            end = time.perf_counter()
            assert first is not None, "no content"
            ttft.append((first - start) * 1000)
            rates.append((usage["completion_tokens"] - 1) / (end - first))
            chars.append(len("".join(text)))
            chunks.append(n)
            tokens.append(usage["completion_tokens"])
            totals.append(end - start)
    finally:
        server.shutdown()
        server.server_close()
    print(f"embedded model, {requests_n} requests, prompt {PROMPT!r}, default min_tokens "
          f"{settings.local_default_min_tokens}")
    print(f"  time to first token   p50 {pct(ttft, .5):7.1f} ms   p95 {pct(ttft, .95):7.1f} ms")
    print(f"  tokens per second     median {statistics.median(rates):6.1f}"
          f"   min {min(rates):6.1f}")
    print(f"  characters per answer median {statistics.median(chars):6.0f}   shortest "
          f"{min(chars)}   (contract: > 1375 every time: {min(chars) > 1375})")
    print(f"  chunks per answer     median {statistics.median(chunks):6.0f}   fewest "
          f"{min(chunks)}   (contract: >= 5)")
    print(f"  tokens per answer     median {statistics.median(tokens):6.0f}   fewest {min(tokens)}")
    print(f"  whole answer          median {statistics.median(totals):6.1f} s   longest "
          f"{max(totals):.1f} s")


class InstantProvider:
    name = "instant"
    capabilities: frozenset[str] = frozenset()

    def __init__(self, n: int) -> None:
        self.deltas: list[Delta] = [TextDelta("token ") for _ in range(n)]
        self.deltas += [Finish("stop"), Usage(10, n)]

    def default_model(self) -> str:
        return "instant"

    def models(self) -> list[str]:
        return ["instant"]

    def stream(self, request: ChatRequest, model: str,
                   deadline: Deadline) -> Iterator[Delta]:
        yield from self.deltas


# The same conversation in each dialect's words (streamed, usage included).
_MESSAGES = [{"role": "system", "content": "You are concise."},
             {"role": "user", "content": PROMPT}]
DIALECT_BODIES: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", {
        "model": "instant", "messages": _MESSAGES, "stream": True,
        "stream_options": {"include_usage": True}, "max_tokens": 256, "temperature": 0.5}),
    "responses": ("/v1/responses", {
        "model": "instant", "instructions": "You are concise.", "input": PROMPT,
        "stream": True, "store": False, "max_output_tokens": 256, "temperature": 0.5}),
}


def _event(path: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"version": "2.0", "rawPath": path, "headers": {},
            "requestContext": {"http": {"method": "POST"}}, "body": json.dumps(body)}


def bench_pipeline(rounds: int, chunks_n: int) -> None:
    """Per dialect: the time the pipeline adds before the first byte, and its cost per chunk
    (parse once, then build + encode each event), over an instant provider."""
    settings = load_settings({}, provider="local", metrics=False)
    request = ChatRequest(model="instant", messages=())
    print(f"pipeline, instant provider ({rounds} rounds; {chunks_n} chunks, median of 7)")
    per_dialect: dict[str, float] = {}
    for dialect, (path, body) in DIALECT_BODIES.items():
        event = _event(path, body)
        provider = InstantProvider(1)
        app = App(settings, provider)
        direct, piped = [], []
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            next(provider.stream(request, "instant", NO_DEADLINE))
            t1 = time.perf_counter_ns()
            response = app.handle(event)
            next(response.body)
            response.close()
            t2 = time.perf_counter_ns()
            direct.append(t1 - t0)
            piped.append(t2 - t1)
        added_ms = (statistics.median(piped) - statistics.median(direct)) / 1e6

        many = InstantProvider(chunks_n)
        app = App(settings, many)
        per_chunk = []
        for _ in range(7):
            t0 = time.perf_counter_ns()
            for _ in many.stream(request, "instant", NO_DEADLINE):
                pass
            t1 = time.perf_counter_ns()
            response = app.handle(event)
            for _ in response.body:
                pass
            response.close()
            t2 = time.perf_counter_ns()
            per_chunk.append(((t2 - t1) - (t1 - t0)) / chunks_n / 1000)
        per_dialect[dialect] = statistics.median(per_chunk)
        print(f"  {dialect:10s} added time to first byte median {added_ms:.3f} ms   per chunk "
              f"(build + encode) median {per_dialect[dialect]:.2f} us")
    for dialect, cost in per_dialect.items():
        if dialect != "chat":
            print(f"  {dialect} / chat per chunk: {cost / per_dialect['chat']:.2f}x")


def bench_relay(streams: int, chunks_n: int) -> None:
    """Per dialect, through the openai provider against a scripted upstream on loopback (the
    relay path): CPU time of this process per stream and per relayed chunk, and the time to
    the first byte, median of ``streams`` streams read to the end."""
    from streamgate.credentials import ApiKey
    from streamgate.providers.openai import OpenAIProvider, Upstream
    from tests.fake_openai import FakeUpstream, Reply, text_stream

    stream = text_stream(*["token "] * chunks_n, usage=(10, chunks_n))
    replies = [Reply(200, [stream]) for _ in range(streams * len(DIALECT_BODIES))]
    logging.getLogger("streamgate").setLevel(logging.WARNING)  # no request record per stream
    with FakeUpstream(replies, models=("scripted",)) as fake:
        settings = load_settings({}, provider="openai", upstream_base_url=fake.url,
                                 metrics=False)
        provider = OpenAIProvider(settings, ApiKey(None, 60, value="sk-bench"),
                                  Upstream(fake.url, settings.upstream_connect_timeout_s))
        app = App(settings, provider)
        print(f"relay, openai provider, scripted upstream on loopback ({streams} streams of "
              f"{chunks_n} chunks per dialect, medians)")
        cpu: dict[str, list[float]] = {d: [] for d in DIALECT_BODIES}
        first: dict[str, list[float]] = {d: [] for d in DIALECT_BODIES}
        try:
            # Interleaved (one stream of each dialect per round), so drift and noise fall on
            # both alike; CPU of this thread only (the scripted upstream runs in another).
            for _ in range(streams):
                for dialect, (path, body) in DIALECT_BODIES.items():
                    event = _event(path, {**body, "model": "scripted"})
                    c0, t0 = time.thread_time(), time.perf_counter()
                    response = app.handle(event)
                    assert response.status == 200, response.status
                    body_iter = iter(response.body)
                    next(body_iter)
                    first[dialect].append((time.perf_counter() - t0) * 1000)
                    for _ in body_iter:
                        pass
                    response.close()
                    cpu[dialect].append(time.thread_time() - c0)
            per_dialect: dict[str, float] = {}
            for dialect in DIALECT_BODIES:
                stream_cpu = statistics.median(cpu[dialect])
                per_dialect[dialect] = stream_cpu / chunks_n * 1e6
                print(f"  {dialect:10s} first byte {statistics.median(first[dialect]):6.2f} ms"
                      f"   CPU per stream {stream_cpu * 1000:6.2f} ms   per chunk "
                      f"{per_dialect[dialect]:6.2f} us")
        finally:
            provider.close()
        for dialect, cost in per_dialect.items():
            if dialect != "chat":
                print(f"  {dialect} / chat CPU per chunk: {cost / per_dialect['chat']:.2f}x")


def bench_decoder() -> None:
    from streamgate.sse import Decoder

    piece = b"x" * 65536
    print("SSE decoder, one event in 64 KB reads (median of 3)")
    base = None
    for mb in (2, 4, 8, 16):
        times = []
        for _ in range(3):
            decoder = Decoder(max_event_chars=64 << 20)
            t0 = time.perf_counter()
            decoder.feed(b"data: ")
            for _ in range(mb * 16):
                decoder.feed(piece)
            assert len(decoder.feed(b"\n\n")) == 1
            times.append(time.perf_counter() - t0)
        median = statistics.median(times)
        base = base or median
        print(f"  {mb:2d} MB event                 {median * 1000:8.1f} ms  ({median / base:.1f}x)")
    small = b"".join(b'data: {"choices":[{"delta":{"content":"word"}}]}\n\n' for _ in range(1000))
    decoder = Decoder()
    t0 = time.perf_counter()
    for _ in range(100):
        decoder.feed(small)
    per_event = (time.perf_counter() - t0) / 100_000 * 1e6
    print(f"  small events               {per_event:8.2f} us per event")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--min-tokens", type=int, default=None,
                        help="the embedded model's default min_tokens (default: the setting's)")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--only-model", action="store_true")
    args = parser.parse_args()
    if not args.only_model:
        bench_pipeline(rounds=2000, chunks_n=20_000)
        bench_relay(streams=30, chunks_n=500)
        bench_decoder()
    if not args.skip_model:
        bench_model(args.requests, args.min_tokens)


if __name__ == "__main__":
    main()
