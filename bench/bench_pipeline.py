"""Figures for the pipeline and the embedded model (issue: streaming chat completions).

    make bench    # PYTHONPATH=functions/streamgate .venv/bin/python bench/bench_pipeline.py

1. The embedded model through the dev server, read like a user does (requests, `data:` lines),
   prompt "Explain streaming APIs", default settings, 20 requests: time to first token p50/p95,
   tokens per second, characters and chunks per answer (median and shortest: the seed's
   contract is more than 1,375 characters in at least 5 chunks, every time), and the time a
   whole answer takes. ``--min-tokens N`` sets the embedded model's default minimum
   (``STREAMGATE_LOCAL_DEFAULT_MIN_TOKENS``) to compare; 0 is the model left alone.
2. The pipeline's own cost with an instant provider, per API dialect (Chat Completions,
   Responses, Anthropic Messages): added time to first byte over calling the provider
   directly, and microseconds per chunk for parsing + event building + SSE encoding; then
   the relay path (the openai provider reading a scripted upstream on loopback): CPU per
   stream and per chunk, per dialect, and each dialect's ratio to chat (issue 21: the
   Responses API at most 1.10).
3. Embeddings (issue 23): the embedded all-MiniLM-L6-v2 through the dev server (the GGUF
   conversion and model load a first request pays, then embeddings per second and latency for
   one input and for batches of 32, and what the pipeline adds over calling the embedder
   directly); and the relay (the openai embedder against a scripted upstream on loopback):
   added latency and CPU per request over calling the embedder directly.
4. The Lambda loop relaying the openai provider (issue 25): ``runtime.run`` in this process
   against the fake Runtime API of the tests, the paced upstream (bench/paced_upstream.py) in
   its own process, back to back and paced 1 ms and 25 ms apart; beside it, on the same
   sockets, a bare loop that only reads the upstream and writes each read as one chunk (the
   floor). CPU per relayed chunk of the loop's thread (and of the deadline watchdog's), as
   the marginal cost: (long stream - short stream) / (chunks between them), medians. The same
   for Bedrock (ConverseStream from the fake Bedrock of the tests, botocore's real parser):
   there both peers run in a helper process and the figure is this whole process's CPU (the
   stream's reader thread included); it has no bare loop.
5. The upstream SSE decoder: one event of 2, 4, 8 and 16 MB fed in 64 KB reads (the cost must
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
    "messages": ("/v1/messages", {
        "model": "instant", "system": "You are concise.",
        "messages": [{"role": "user", "content": PROMPT}], "stream": True,
        "max_tokens": 256, "temperature": 0.5}),
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


EMBED_TEXTS = [f"Sentence {i} about streaming APIs, gateways and retrieval." for i in range(32)]


def bench_embeddings_model(requests_n: int) -> None:
    """The embedded embedding model: what the first request pays, then throughput and latency
    through the dev server, and the pipeline's share of it."""
    import tempfile
    from pathlib import Path

    from streamgate.providers.embedding import LOCAL_MODEL, EmbeddingRequest
    from streamgate.providers.local_embed import LocalEmbedder, _package_dir, write_gguf
    from streamgate.routes import Router
    from tests.helpers import ScriptedProvider

    with tempfile.TemporaryDirectory() as scratch:
        t0 = time.perf_counter()
        write_gguf(_package_dir(), Path(scratch) / "model.gguf")
        convert_s = time.perf_counter() - t0
    settings = load_settings({}, provider="local", metrics=False)
    embedder = LocalEmbedder(settings)
    app = App(settings, router=Router(settings, ScriptedProvider(), embedder=embedder))
    server = serve("127.0.0.1", 0, app)
    url = f"http://127.0.0.1:{server.server_port}/v1/embeddings"
    logging.getLogger("streamgate").setLevel(logging.WARNING)
    try:
        t0 = time.perf_counter()
        first = requests.post(url, json={"model": LOCAL_MODEL, "input": "hello"}, timeout=120)
        first_s = time.perf_counter() - t0
        assert first.status_code == 200, first.text
        print(f"embeddings, embedded {LOCAL_MODEL} ({requests_n} requests each, medians)")
        print(f"  one-time GGUF conversion {convert_s:.2f} s (first use after install); first "
              f"request (model load, GGUF cached) {first_s:.2f} s")
        for batch in (1, 32):
            body = {"model": LOCAL_MODEL, "input": EMBED_TEXTS[:batch],
                    "encoding_format": "float"}
            request = EmbeddingRequest(LOCAL_MODEL, tuple(EMBED_TEXTS[:batch]))
            served, direct = [], []
            for _ in range(requests_n):
                t0 = time.perf_counter()
                embedder.embed(request, LOCAL_MODEL, NO_DEADLINE)
                t1 = time.perf_counter()
                response = requests.post(url, json=body, timeout=120)
                t2 = time.perf_counter()
                assert response.status_code == 200, response.text
                direct.append(t1 - t0)
                served.append(t2 - t1)
            median = statistics.median(served)
            print(f"  {batch:2d} input(s) per request: {median * 1000:7.1f} ms p50, "
                  f"{pct(served, 0.95) * 1000:7.1f} ms p95, {batch / median:6.1f} embeddings/s;"
                  f" added over the embedder {(median - statistics.median(direct)) * 1000:5.1f}"
                  " ms (HTTP + pipeline)")
    finally:
        server.shutdown()
        server.server_close()
        embedder.close()


def bench_embeddings_relay(requests_n: int) -> None:
    """The openai embedder relaying a scripted upstream: what the pipeline adds per request
    (16 inputs of 384 dimensions), in time and in CPU of the serving thread."""
    from streamgate.credentials import ApiKey
    from streamgate.dialects.embeddings import encode_base64
    from streamgate.providers.embedding import EmbeddingRequest
    from streamgate.providers.openai_embed import OpenAIEmbedder
    from streamgate.routes import Router
    from tests.fake_openai import FakeUpstream, Reply
    from tests.helpers import ScriptedProvider

    vector = [((i * 37) % 101 - 50) / 97 for i in range(384)]
    answer = json.dumps({"object": "list", "model": "e", "usage": {"prompt_tokens": 160,
                                                                    "total_tokens": 160},
                         "data": [{"object": "embedding", "index": i,
                                   "embedding": encode_base64(vector)} for i in range(16)]})
    replies = [Reply(200, [answer.encode()], {"content-type": "application/json"})
               for _ in range(requests_n * 2)]
    body = {"model": "e", "input": EMBED_TEXTS[:16], "encoding_format": "base64"}
    logging.getLogger("streamgate").setLevel(logging.WARNING)
    with FakeUpstream(replies) as fake:
        settings = load_settings({}, provider="openai", upstream_base_url=fake.url,
                                 embedding_models=("e@384",), metrics=False)
        embedder = OpenAIEmbedder(settings, ApiKey(None, 60, value="sk-bench"))
        app = App(settings, router=Router(settings, ScriptedProvider(), embedder=embedder))
        request = EmbeddingRequest("e", tuple(EMBED_TEXTS[:16]), encoding_format="base64")
        direct, piped, cpu = [], [], []
        try:
            for _ in range(requests_n):  # interleaved, so drift falls on both alike
                t0 = time.perf_counter()
                embedder.embed(request, "e", NO_DEADLINE)
                t1 = time.perf_counter()
                c0 = time.thread_time()
                response = app.handle(_event("/v1/embeddings", body))
                for _ in response.body:
                    pass
                response.close()
                cpu.append(time.thread_time() - c0)
                t2 = time.perf_counter()
                assert response.status == 200, response.status
                direct.append(t1 - t0)
                piped.append(t2 - t1)
        finally:
            app.router.close()
    added = (statistics.median(piped) - statistics.median(direct)) * 1000
    print(f"embeddings relay, openai embedder, scripted upstream on loopback ({requests_n} "
          "requests of 16 inputs x 384 dimensions, base64, medians)")
    print(f"  {statistics.median(piped) * 1000:6.2f} ms per request, "
          f"{16 / statistics.median(piped):7.0f} embeddings/s; added over the embedder "
          f"{added:5.2f} ms; CPU per request {statistics.median(cpu) * 1000:5.2f} ms")


def _thread_cpu_s(name: str) -> float:
    """CPU seconds of the running thread called ``name`` (0 if there is none)."""
    import threading

    for thread in threading.enumerate():
        if thread.name == name and thread.ident is not None:
            return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return 0.0


# (label, interval in µs, chunks of a short and of a long stream, rounds)
LOOP_PACES = [("back to back", 0, 100, 2000, 7), ("paced 1 ms", 1000, 50, 500, 5),
              ("paced 25 ms", 25000, 8, 48, 3)]


def bench_lambda_loop() -> dict[str, tuple[float, float]]:
    """Per pace: the Lambda loop's and a bare loop's CPU per relayed chunk (µs), medians."""
    import http.client
    import subprocess
    import sys
    from pathlib import Path

    from streamgate import deadline, runtime, telemetry
    from tests.fake_runtime_api import FakeRuntimeAPI
    from tests.helpers import chat_event

    telemetry.logger()  # Powertools sets the level as it builds the logger: build it first,
    logging.getLogger("streamgate").setLevel(logging.WARNING)  # then no record per stream
    root = Path(__file__).resolve().parent
    upstream_process = subprocess.Popen(
        [sys.executable, str(root / "paced_upstream.py"), "--first-token-ms", "0"],
        stdout=subprocess.PIPE, text=True)
    assert upstream_process.stdout is not None
    port = int(upstream_process.stdout.readline().split()[-1])
    models = tuple(f"paced-{n}-{us}" for _, us, short, long, _ in LOOP_PACES
                   for n in (short, long))
    settings = load_settings({}, provider="openai", auth="none", metrics=False,
                             upstream_base_url=f"http://127.0.0.1:{port}/v1",
                             upstream_models=models)
    app = App(settings)
    # The watchdog thread exists from the first guard on; start it now to count its CPU.
    deadline.guard(__import__("socket").socket(), time.monotonic() + 3600).cancel()

    def loop_cpu(api: FakeRuntimeAPI) -> float:
        c0 = time.thread_time() + _thread_cpu_s("streamgate-watchdog")
        assert runtime.run(app, environ={"AWS_LAMBDA_RUNTIME_API": api.address},
                           max_invocations=1) == 0
        return time.thread_time() + _thread_cpu_s("streamgate-watchdog") - c0

    def bare_cpu(api: FakeRuntimeAPI, model: str) -> float:
        body = json.dumps({"model": model, "stream": True, "messages": []})
        c0 = time.thread_time()
        upstream = http.client.HTTPConnection("127.0.0.1", port)
        sink = http.client.HTTPConnection(*api.address.split(":"))
        upstream.request("POST", "/v1/chat/completions", body,
                         {"content-type": "application/json"})
        answer = upstream.getresponse()
        sink.putrequest("POST", "/2018-06-01/runtime/invocation/bare/response")
        sink.putheader("Transfer-Encoding", "chunked")
        sink.endheaders()
        assert sink.sock is not None
        while data := answer.read1(65536):
            sink.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))
        sink.sock.sendall(b"0\r\n\r\n")
        sink.getresponse().read()
        cpu = time.thread_time() - c0
        upstream.close()
        sink.close()
        return cpu

    results: dict[str, tuple[float, float]] = {}
    print("Lambda loop, openai provider relaying the paced upstream (its own process); CPU per "
          "relayed chunk, marginal (long - short stream), medians")
    try:
        for label, us, short, long, rounds in LOOP_PACES:
            cpu: dict[tuple[str, int], list[float]] = {}
            events = [chat_event({"model": f"paced-{n}-{us}", "stream": True,
                                  "stream_options": {"include_usage": True},
                                  "messages": [{"role": "user", "content": PROMPT}]})
                      for _ in range(rounds) for n in (short, long)]
            with FakeRuntimeAPI(events, deadline_in_ms=600_000) as api:
                for _ in range(rounds):  # interleaved, so drift falls on all alike
                    for n in (short, long):
                        cpu.setdefault(("loop", n), []).append(loop_cpu(api))
                        cpu.setdefault(("bare", n), []).append(bare_cpu(api, f"paced-{n}-{us}"))
                posted = [p for p in api.posted if "/bare/" not in p.path]
                assert all(p.chunks[-1][1].endswith(b"data: [DONE]\n\n") and not p.trailers
                           for p in posted), "a relayed stream did not end well"
            loop, bare = (
                (statistics.median(cpu[(kind, long)]) - statistics.median(cpu[(kind, short)]))
                / (long - short) * 1e6 for kind in ("loop", "bare"))
            results[label] = (loop, bare)
            print(f"  {label:13s} Lambda loop {loop:6.1f} us per chunk   bare loop {bare:6.1f} us"
                  f"   ratio {loop / bare:4.2f}x")
    finally:
        upstream_process.terminate()
        upstream_process.wait(10)
        app.router.close()
    return results


# A helper process serving the fake Runtime API and the fake Bedrock of the tests for
# bench_lambda_loop_bedrock: Bedrock's answers per the JSON on its argv (each reply's chunk
# count and pause), the events one per reply; prints both addresses.
_BEDROCK_PEERS = """
import json, sys, threading
from tests.fake_bedrock import FakeBedrock, Reply, text_events
from tests.fake_runtime_api import FakeRuntimeAPI
from tests.helpers import chat_event
plan = json.loads(sys.argv[1])
replies = []
for n, pause in plan:
    frames = text_events(*[" tok"] * n, usage=(12, n))
    if pause:
        frames = [x for f in frames for x in (f, pause)]
    else:
        frames = [b"".join(frames)]
    replies.append(Reply(frames=frames))
event = chat_event({"model": "m", "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "Explain streaming APIs"}]})
with FakeBedrock(replies) as bedrock, FakeRuntimeAPI([event] * len(plan),
                                                     deadline_in_ms=600_000) as api:
    print(api.address, bedrock.url, flush=True)
    sys.stdin.read()
"""


def bench_lambda_loop_bedrock() -> dict[str, float]:
    """Per pace: the Lambda loop's CPU per relayed chunk (µs) with the Bedrock provider."""
    import subprocess
    import sys

    import boto3
    from botocore.config import Config

    from streamgate import runtime, telemetry
    from streamgate.providers.bedrock import BedrockProvider

    telemetry.logger()
    logging.getLogger("streamgate").setLevel(logging.WARNING)
    results: dict[str, float] = {}
    print("Lambda loop, Bedrock provider relaying the fake Bedrock (helper process); CPU of "
          "this process per relayed chunk, marginal, medians")
    for label, us, short, long, rounds in LOOP_PACES:
        plan = [(n, us / 1e6) for _ in range(rounds) for n in (short, long)]
        peers = subprocess.Popen([sys.executable, "-c", _BEDROCK_PEERS, json.dumps(plan)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert peers.stdout is not None and peers.stdin is not None
        address, url = peers.stdout.readline().split()
        settings = load_settings({}, provider="bedrock", auth="none", metrics=False,
                                 default_model="m")
        client = boto3.client("bedrock-runtime", endpoint_url=url, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="testing",
                              config=Config(retries={"mode": "standard",
                                                     "total_max_attempts": 1}))
        app = App(settings, BedrockProvider(settings, client))
        cpu: dict[int, list[float]] = {short: [], long: []}
        try:
            for n, _ in plan:
                c0 = time.process_time()
                assert runtime.run(app, environ={"AWS_LAMBDA_RUNTIME_API": address},
                                   max_invocations=1) == 0
                cpu[n].append(time.process_time() - c0)
        finally:
            peers.stdin.close()
            peers.wait(30)
            client.close()
        per_chunk = ((statistics.median(cpu[long]) - statistics.median(cpu[short]))
                     / (long - short) * 1e6)
        results[label] = per_chunk
        print(f"  {label:13s} Lambda loop {per_chunk:6.1f} us per chunk")
    return results


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
    parser.add_argument("--only-loop", action="store_true", help="only the Lambda-loop relay")
    args = parser.parse_args()
    if args.only_loop:
        bench_lambda_loop()
        bench_lambda_loop_bedrock()
        return
    if not args.only_model:
        bench_pipeline(rounds=2000, chunks_n=20_000)
        bench_relay(streams=30, chunks_n=500)
        bench_embeddings_relay(requests_n=200)
        bench_lambda_loop()
        bench_lambda_loop_bedrock()
        bench_decoder()
    if not args.skip_model:
        bench_embeddings_model(args.requests)
        bench_model(args.requests, args.min_tokens)


if __name__ == "__main__":
    main()
