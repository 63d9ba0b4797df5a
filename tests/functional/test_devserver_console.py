"""What `make dev` prints: at start, where it serves, from which provider and model, and where
the playground is; then one readable line per request (time, method, path, status, model, time
to first token, tokens, duration, request id); and, asked for with ``--log-format json`` or
``STREAMGATE_LOG_FORMAT=json``, the JSON records the function writes on Lambda instead.

The dev server runs as `make dev` runs it, as a process (``python -m streamgate.devserver``),
with a scripted OpenAI-compatible upstream in place of the embedded model."""

from __future__ import annotations

import http.client
import json
import logging
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from streamgate.devserver import ConsoleFormatter
from tests.fake_openai import FakeUpstream, text_stream
from tests.fake_openai import Reply as UpstreamReply
from tests.helpers import sse_data

ROOT = Path(__file__).resolve().parents[2]
CHAT = "/v1/chat/completions"
MODEL = "upstream-model"
# One request's line: time, method, path, status, model, ttft, tokens, duration, request id.
LINE = re.compile(r"^(?P<time>\d\d:\d\d:\d\d) (?P<method>[A-Z]+) (?P<path>\S+) (?P<status>\d{3})"
                  r"(?: model=(?P<model>\S+))?(?: ttft=(?P<ttft>[\d.]+m?s))?"
                  r"(?: tokens=(?P<prompt>\d+)\+(?P<completion>\d+))?"
                  r" duration=(?P<duration>[\d.]+m?s) id=(?P<id>\S+)(?P<rest>.*)$")


class DevServerProcess:
    def __init__(self, process: subprocess.Popen[str], stderr: IO[str]) -> None:
        self.process = process
        self.stderr = stderr
        assert process.stdout is not None
        self.stdout = process.stdout
        self.banner = self._read_until(lambda line: line.startswith("Log: "))
        self.port = int(re.search(r"127\.0\.0\.1:(\d+)/", self.banner[0]).group(1))  # type: ignore[union-attr]

    def _read_until(self, done: Callable[[str], bool]) -> list[str]:
        lines: list[str] = []
        give_up = time.monotonic() + 30
        while time.monotonic() < give_up:
            line = self.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
            if done(lines[-1]):
                return lines
        raise AssertionError(f"the dev server said: {lines}")

    def request(self, method: str, path: str, body: dict[str, object] | None = None
                ) -> tuple[int, str, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body))
            response = conn.getresponse()
            return response.status, response.getheader("x-request-id") or "", response.read()
        finally:
            conn.close()

    def line_for(self, request_id: str) -> str:
        """The next stdout line naming this request id (the record is written before the
        answer's end goes out, so it is there by now)."""
        return self._read_until(lambda line: request_id in line)[-1]


@contextmanager
def dev_server(tmp_path: Path, *args: str, **env: str) -> Iterator[DevServerProcess]:
    with FakeUpstream([UpstreamReply(body=[text_stream("Hello", " there", usage=(7, 3))])]
                      ) as upstream, (tmp_path / "stderr").open("w+") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamgate.devserver", "--port", "0", *args],
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "functions/streamgate"),
                 "STREAMGATE_PROVIDER": "openai", "STREAMGATE_UPSTREAM_BASE_URL": upstream.url,
                 "STREAMGATE_UPSTREAM_MODELS": MODEL, **env},
            stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            yield DevServerProcess(process, stderr)
        finally:
            process.terminate()
            process.wait(10)
            assert process.stdout is not None
            process.stdout.close()


def test_the_console_says_where_it_serves_what_and_where_the_playground_is(
        tmp_path: Path) -> None:
    # WHEN the dev server starts as `make dev` starts it
    with dev_server(tmp_path) as server:
        banner = server.banner
    # THEN it names its URL, the provider and model serving, the playground, and its log
    url = f"http://127.0.0.1:{server.port}"
    assert banner[0] == (f"Streamgate dev server on {url}/v1/chat/completions "
                         f"(provider openai, model {MODEL})")
    assert f"Models: {MODEL} (GET {url}/v1/models)" in banner
    assert f"Playground: {url}/" in banner
    assert banner[-1].startswith("Log: one line per request: time, method, path, status, model")


def test_each_request_is_one_readable_line_with_its_timings_tokens_and_id(
        tmp_path: Path) -> None:
    with dev_server(tmp_path) as server:
        # WHEN a streamed answer, a health check and an unknown path are served
        status, chat_id, body = server.request(
            "POST", CHAT, {"model": MODEL, "prompt": "Hi", "stream": True,
                           "stream_options": {"include_usage": True}})
        assert status == 200 and sse_data(body)[-1] == "[DONE]"
        chat = server.line_for(chat_id)
        _, health_id, _ = server.request("GET", "/health")
        health = server.line_for(health_id)
        _, missing_id, _ = server.request("GET", "/nowhere\x1b[2J".replace("\x1b", "%1b"))
        missing = server.line_for(missing_id)
        server.process.terminate()
        server.process.wait(10)
        rest = server.stdout.read()
        server.stderr.seek(0)
        errors = server.stderr.read()

    # THEN the answer is one line: time, method, path, status, model, time to first token,
    # tokens (prompt + completion), duration and the request id the client got
    fields = LINE.match(chat)
    assert fields is not None, chat
    assert fields["method"] == "POST" and fields["path"] == CHAT and fields["status"] == "200"
    assert fields["model"] == MODEL and fields["ttft"] and fields["duration"]
    assert (fields["prompt"], fields["completion"]) == ("7", "3")
    assert fields["id"] == chat_id and fields["rest"] == ""
    # AND requests without a model have what they have, and an error says which
    fields = LINE.match(health)
    assert fields is not None and fields["path"] == "/health" and fields["model"] is None, health
    fields = LINE.match(missing)
    assert fields is not None and fields["status"] == "404", missing
    assert fields["rest"] == " error=not_found" and fields["id"] == missing_id
    # AND nothing is JSON, and no access line repeats the requests
    assert not any(line.startswith("{") for line in [chat, health, missing, *rest.splitlines()])
    assert "HTTP/1.1\" 200" not in errors and '"GET /health' not in errors, errors
    assert chat_id not in errors and health_id not in errors, errors  # each line once


def test_json_on_request_writes_the_records_lambda_writes(tmp_path: Path) -> None:
    for how in (("--log-format", "json"), ()):
        env = {} if how else {"STREAMGATE_LOG_FORMAT": "json"}
        # WHEN the dev server is asked for JSON, by flag or by environment
        with dev_server(tmp_path, *how, **env) as server:
            assert server.banner[-1] == "Log: JSON records, as the function writes them on Lambda"
            status, request_id, _ = server.request(
                "POST", CHAT, {"model": MODEL, "prompt": "Hi", "stream": True})
            assert status == 200
            line = server.line_for(request_id)
        # THEN the request's record is the JSON record of the Lambda function
        record = json.loads(line)
        assert record["message"] == "request" and record["request_id"] == request_id
        assert {"method", "path", "status", "model", "ttft_ms", "duration_ms", "prompt_tokens",
                "completion_tokens", "provider", "service"} <= record.keys()


def test_an_unknown_log_format_is_refused_at_start(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streamgate.devserver", "--port", "0"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT / "functions/streamgate"),
             "STREAMGATE_LOG_FORMAT": "yaml"},
        capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "STREAMGATE_LOG_FORMAT must be text or json, got 'yaml'" in done.stderr


def test_the_console_escapes_control_characters_a_client_sent() -> None:
    line = ConsoleFormatter.request_line({
        "method": "GET", "path": "/\x1b[2J\x07", "status": 404, "duration_ms": 0.4,
        "request_id": "r1", "error_code": "not_found"})
    assert line == "GET /\\x1b[2J\\x07 404 duration=0ms id=r1 error=not_found"


def test_other_records_keep_their_fields_on_the_console() -> None:
    # GIVEN a record with fields of its own, as "usage not recorded" carries what reconciles it
    record = logging.LogRecord("streamgate.auth", logging.ERROR, __file__, 1,
                               "usage not recorded", None, None)
    record.__dict__.update({"key_id": "1ca84a0171da9d67", "reserved_tokens": 1030})
    # WHEN the console writes it THEN they follow the message, as key=value
    line = ConsoleFormatter().format(record)
    assert re.fullmatch(r"\d\d:\d\d:\d\d ERROR streamgate.auth: usage not recorded "
                        r'key_id="1ca84a0171da9d67" reserved_tokens=1030', line), line
