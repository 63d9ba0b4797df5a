"""``python -m streamgate.devserver --workers N``: N processes serve one port, share the stored
responses of the Responses API, and stop with the first process however it stops."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fake_openai import FakeUpstream, Reply, completion_reply

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def dev_server(upstream: FakeUpstream, *args: str) -> Iterator[tuple[subprocess.Popen[str],
                                                                      int, list[str]]]:
    """The dev server as ``make dev`` starts it, provider openai at ``upstream``; the process,
    its port and its banner lines. Killed, with its workers, at the end whatever happened."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "functions" / "streamgate"),
           "STREAMGATE_PROVIDER": "openai", "STREAMGATE_UPSTREAM_BASE_URL": upstream.url,
           "STREAMGATE_UPSTREAM_MODELS": "upstream-model", "STREAMGATE_AUTH": "none"}
    env = {k: v for k, v in env.items() if k != "STREAMGATE_RESPONSES_STORE"}
    process = subprocess.Popen(
        [sys.executable, "-m", "streamgate.devserver", "--port", "0", *args], env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    workers: list[int] = []
    try:
        assert process.stdout is not None
        banner = [process.stdout.readline() for _ in range(5)]
        match = re.search(r"http://127\.0\.0\.1:(\d+)/", banner[0])
        assert match, banner
        workers = children(process.pid)
        yield process, int(match.group(1)), banner
    finally:
        for pid in [process.pid, *workers]:  # none left stopped by a test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if process.poll() is None:  # stopped as a user would: it removes its shared store
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                if not wait_gone(pid, 15):
                    os.kill(pid, signal.SIGKILL)
        process.wait(10)
        assert process.stdout is not None
        process.stdout.close()
        for pid in workers:
            wait_gone(pid, 10)


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pid: int, timeout_s: float) -> bool:
    until = time.monotonic() + timeout_s
    while alive(pid):
        if time.monotonic() > until:
            return False
        time.sleep(0.05)
    return True


def call(port: int, method: str, path: str, body: dict[str, Any] | None = None
         ) -> tuple[int, dict[str, Any]]:
    """One request on a connection of its own (so whichever process accepts it answers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"content-type": "application/json"})
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        conn.close()


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """``pid`` stopped (SIGSTOP): it accepts nothing, so another worker takes each connection."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_a_response_stored_through_one_worker_is_read_and_deleted_through_another() -> None:
    # GIVEN the dev server with two workers in front of an upstream that answers twice
    with FakeUpstream([completion_reply("Hello from one worker"),
                       completion_reply("Second")]) as upstream, \
            dev_server(upstream, "--workers", "2") as (process, port, banner):
        [worker] = children(process.pid)
        assert "Workers: 2 processes" in banner[4]
        # WHEN the first process is stopped and a response is created (the worker serves it)
        with stopped(process.pid):
            status, created = call(port, "POST", "/v1/responses",
                                   {"model": "upstream-model", "input": "hi"})
        assert status == 200, created
        # THEN with the worker stopped instead, the first process finds it, and continues it
        with stopped(worker):
            status, found = call(port, "GET", f"/v1/responses/{created['id']}")
            assert status == 200, found
            assert found["output"][0]["content"][0]["text"] == "Hello from one worker"
            status, followed = call(port, "POST", "/v1/responses", {
                "model": "upstream-model", "input": "more",
                "previous_response_id": created["id"]})
            assert status == 200, followed
            # AND deleting it there deletes it for the worker too
            status, _ = call(port, "DELETE", f"/v1/responses/{created['id']}")
            assert status == 200
        with stopped(process.pid):
            status, gone = call(port, "GET", f"/v1/responses/{created['id']}")
        assert status == 404, gone
    # AND the upstream saw the first answer in the second request's conversation
    sent = [m["content"] for m in upstream.requests[-1][2]["messages"]]
    assert sent[-3:] == ["hi", "Hello from one worker", "more"]


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_first_process_stops_every_worker_and_removes_the_shared_store(
        how: signal.Signals) -> None:
    # GIVEN the dev server with three workers
    with FakeUpstream() as upstream, dev_server(upstream, "--workers", "3") as (
            process, port, banner):
        workers = children(process.pid)
        assert len(workers) == 2
        match = re.search(r"shared in (\S+),", banner[4])
        assert match, banner
        store = Path(match.group(1))
        assert store.parent.is_dir()  # the file itself is made when first used
        # WHEN the first process is told to stop
        process.send_signal(how)
        # THEN it exits well, its workers are gone, and so is the store's directory
        assert process.wait(30) == 0
        assert all(wait_gone(pid, 15) for pid in workers)
        assert not store.parent.exists()


def test_workers_stop_when_the_first_process_is_killed_and_remove_the_shared_store() -> None:
    # GIVEN the dev server with two workers, and a response stored in their shared store
    with FakeUpstream([completion_reply("Kept a while")]) as upstream, dev_server(
            upstream, "--workers", "2") as (process, port, banner):
        [worker] = children(process.pid)
        match = re.search(r"shared in (\S+),", banner[4])
        assert match, banner
        store = Path(match.group(1))
        status, created = call(port, "POST", "/v1/responses",
                               {"model": "upstream-model", "input": "a secret prompt"})
        assert status == 200, created
        assert store.exists()
        # WHEN the first process is killed, with no chance to stop them or remove the store
        process.kill()
        process.wait(10)
        # THEN the worker stops by itself, and nothing serves the port any more
        assert wait_gone(worker, 15)
        with pytest.raises(ConnectionRefusedError):
            call(port, "GET", "/v1/models")
        # AND the stored prompts are not left behind in the temporary directory
        assert not store.parent.exists()


def test_both_processes_serve_streams_at_once() -> None:
    # GIVEN two workers, each limited to one stream at a time, and an upstream whose answers
    # take a while
    slow = [Reply(200, [b'data: {"id":"c","object":"chat.completion.chunk","created":1,'
                        b'"model":"m","choices":[{"index":0,"delta":{"content":"x"},'
                        b'"finish_reason":null}]}\n\n', 1.5,
                        b'data: {"id":"c","object":"chat.completion.chunk","created":1,'
                        b'"model":"m","choices":[{"index":0,"delta":{},'
                        b'"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'])
            for _ in range(2)]
    with FakeUpstream(slow) as upstream, dev_server(
            upstream, "--workers", "2", "--max-streams", "1") as (process, port, _):
        [worker] = children(process.pid)
        results: list[int] = []
        # WHEN one stream is opened while only the worker accepts, then one while only the
        # first process does
        conns = []
        for pid in (process.pid, worker):
            with stopped(pid):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
                conn.request("POST", "/v1/chat/completions", json.dumps(
                    {"model": "upstream-model", "stream": True,
                     "messages": [{"role": "user", "content": "hi"}]}),
                    {"content-type": "application/json"})
                answer = conn.getresponse()
                answer.read1(1)  # its first byte: it is being served
                conns.append((conn, answer))
        for conn, answer in conns:
            results.append(answer.status)
            assert answer.read().endswith(b"data: [DONE]\n\n")
            conn.close()
        # THEN both were served at once (one process alone would have answered one 429)
        assert results == [200, 200]


@pytest.mark.parametrize("args", [["--workers", "0"], ["--workers", "65"],
                                  ["--listen-fd", "3"],
                                  # by hand: stdin (/dev/null) is neither a socket nor a pipe
                                  ["--listen-fd", "0", "--parent-fd", "0"],
                                  ["--listen-fd", "99", "--parent-fd", "98"]])
def test_a_bad_workers_command_line_is_refused(args: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamgate.devserver", "--port", "0", *args],
        env={**os.environ, "PYTHONPATH": str(ROOT / "functions" / "streamgate")},
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "streamgate" in result.stderr and ("workers" in result.stderr
                                              or "parent-fd" in result.stderr)
    assert "Traceback" not in result.stderr
