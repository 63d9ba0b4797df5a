"""The bounds on response_format grammars, against the real embedded model in a dev server of
its own (a subprocess): before them, a 40-byte schema made llama.cpp's grammar parser overflow
its thread's stack and the whole process died with SIGSEGV, taking every client's stream with
it; a subprocess lets this suite watch that happen (and fail) instead of dying too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from streamgate.providers.grammar import MAX_REPEAT

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[2]
MODEL = "gemma-3-270m"
_BANNER = "Streamgate dev server on "


class OwnServer:
    """``python -m streamgate.devserver`` on an ephemeral loopback port, as `make dev` runs it."""

    def __init__(self, logs: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMGATE_")}
        env.update({"PYTHONPATH": str(ROOT / "functions" / "streamgate"),
                    "STREAMGATE_LOCAL_THREADS": "1"})
        self._out, self._err = logs / "stdout", logs / "stderr"
        with self._out.open("wb") as out, self._err.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "streamgate.devserver", "--host", "127.0.0.1",
                 "--port", "0"], env=env, stdout=out, stderr=err, cwd=ROOT)
        self.url = self._wait_for_banner(180)

    def _wait_for_banner(self, timeout_s: float) -> str:
        give_up = time.monotonic() + timeout_s
        while time.monotonic() < give_up and self.process.poll() is None:
            for line in self._out.read_text(errors="replace").splitlines():
                if line.startswith(_BANNER):
                    return line[len(_BANNER):].split("/v1/", 1)[0]
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the dev server did not start: {self.died()}")

    def died(self) -> str:
        """Why the process is gone (exit status and the end of its stderr), for messages."""
        status = self.process.poll()
        tail = self._err.read_text(errors="replace")[-1500:]
        return f"exit status {status}; stderr: {tail}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnServer]:
    server = OwnServer(tmp_path_factory.mktemp("devserver"))
    try:
        yield server
    finally:
        server.stop()


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


@pytest.mark.parametrize(("schema", "keyword"), [
    ({"type": "string", "maxLength": 30000}, "'maxLength'"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 30000}, "'maxItems'"),
    ({"type": "string", "pattern": "^a{0,30000}$"}, "'pattern'"),
    ({"type": "string", "minLength": 20_000_000}, "'minLength'"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 10**9}, "'minItems'"),
], ids=["maxLength", "maxItems", "pattern", "minLength", "minItems"])
def test_a_schema_beyond_the_bounds_is_a_400_and_the_process_lives_on(
    own_server: OwnServer, schema: dict[str, Any], keyword: str
) -> None:
    # GIVEN the dev server on the embedded model
    # WHEN a client sends a tiny schema whose grammar would spell out a huge count
    with openai.OpenAI(base_url=f"{own_server.url}/v1", api_key="unused", max_retries=0,
                       timeout=60) as client:
        try:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Answer."}],
                response_format=_schema_format(schema), max_tokens=20)  # type: ignore[arg-type]
        except openai.BadRequestError as e:
            refused: Any = e.body
        except openai.APIConnectionError as e:
            raise AssertionError(f"the dev server died: {own_server.died()}") from e
        else:
            raise AssertionError("the schema was accepted")
    # THEN it gets a 400 naming response_format and the bound, before any model work
    assert refused["param"] == "response_format.json_schema.schema"
    assert refused["message"].startswith("response_format: ")
    assert keyword in refused["message"] and f"0 to {MAX_REPEAT}" in refused["message"]
    # AND the process serves on
    assert own_server.process.poll() is None, own_server.died()


def test_after_them_the_server_still_answers_under_a_schema(own_server: OwnServer) -> None:
    with openai.OpenAI(base_url=f"{own_server.url}/v1", api_key="unused", max_retries=0,
                       timeout=120) as client:
        completion = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], seed=3,
            response_format=_schema_format({"type": "string", "maxLength": 12}),  # type: ignore[arg-type]
            max_tokens=30)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    answer = json.loads(choice.message.content or "")
    assert isinstance(answer, str) and len(answer) <= 12
