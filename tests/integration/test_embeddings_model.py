"""POST /v1/embeddings on the dev server with the real embedded model (all-MiniLM-L6-v2 run by
llama.cpp), as `make dev` serves it, through real clients, unmodified: openai-python,
LangChain's OpenAIEmbeddings and LlamaIndex's OpenAIEmbedding."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator

import openai
import pytest
import requests

from streamgate.config import load_settings
from streamgate.deadline import NO_DEADLINE, Deadline
from streamgate.errors import DeadlineExceededError, UpstreamUnavailableError
from streamgate.handler import App
from streamgate.providers.embedding import LOCAL_MODEL, EmbeddingRequest
from streamgate.providers.local_embed import LocalEmbedder
from streamgate.routes import Router
from tests.conftest import running_dev_server
from tests.docs_text import code_blocks
from tests.embedding_checks import cosine, decode_base64, strict_response

pytestmark = pytest.mark.model

RELATED = ("A man is eating food.", "A man is eating a piece of bread.")
UNRELATED = "The new movie is awesome."


@pytest.fixture(scope="module")
def embedder() -> Iterator[LocalEmbedder]:
    embedder = LocalEmbedder(load_settings({}, provider="local"))
    yield embedder
    embedder.close()


@pytest.fixture(scope="module")
def server(embedder: LocalEmbedder) -> Iterator[str]:
    """The dev server's embeddings as `make dev` has them (the chat model is not needed)."""
    from tests.helpers import ScriptedProvider

    settings = load_settings({}, provider="local", metrics=False)
    app = App(settings, router=Router(settings, ScriptedProvider(), embedder=embedder))
    with running_dev_server(app) as url:
        yield url


@pytest.fixture
def sdk(server: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0,
                       timeout=60) as client:
        yield client


def test_openai_python_gets_the_same_vectors_as_floats_and_as_base64(
        server: str, sdk: openai.OpenAI) -> None:
    # WHEN openai-python asks for floats, and with its default (base64, which it decodes)
    floats = sdk.embeddings.create(model=LOCAL_MODEL, input=list(RELATED),
                                   encoding_format="float")
    default = sdk.embeddings.create(model=LOCAL_MODEL, input=list(RELATED))
    # THEN both give 384 unit vectors, the same up to float32 rounding (base64 is float32)
    assert [len(d.embedding) for d in floats.data] == [384, 384]
    for a, b in zip(floats.data, default.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-4)
        assert sum(x * x for x in a.embedding) == pytest.approx(1.0, abs=1e-4)
    # usage counts the model's own tokens ([CLS] and [SEP] included)
    assert floats.usage.prompt_tokens == 8 + 11
    # and the raw answers are exactly openai-python's types, nothing more
    for encoding in ("float", "base64"):
        raw = requests.post(server + "/v1/embeddings", timeout=60, json={
            "model": LOCAL_MODEL, "input": RELATED[0], "encoding_format": encoding})
        doc = raw.json()
        strict_response(doc)
        if encoding == "base64":
            assert decode_base64(doc["data"][0]["embedding"]) == pytest.approx(
                floats.data[0].embedding, abs=1e-4)  # alone vs in a batch


def test_the_same_text_gives_the_same_vector_and_related_texts_are_closer(
        sdk: openai.OpenAI) -> None:
    # GIVEN two related sentences and an unrelated one, the first one twice, in one request
    texts = [*RELATED, UNRELATED, RELATED[0]]
    vectors = [d.embedding for d in sdk.embeddings.create(
        model=LOCAL_MODEL, input=texts, encoding_format="float").data]
    # and the first one alone, in a request of its own
    alone = sdk.embeddings.create(model=LOCAL_MODEL, input=RELATED[0],
                                  encoding_format="float").data[0].embedding
    again = sdk.embeddings.create(model=LOCAL_MODEL, input=RELATED[0],
                                  encoding_format="float").data[0].embedding
    # THEN the same text gives the same vector: exactly, asked the same way; in a batch up to
    # llama.cpp's batched float rounding
    assert again == alone
    assert vectors[3] == pytest.approx(vectors[0], abs=1e-4)
    assert alone == pytest.approx(vectors[0], abs=1e-4)
    # and related texts are closer than unrelated ones (all-MiniLM-L6-v2: ~0.76 vs ~0.0)
    assert cosine(vectors[0], vectors[1]) > 0.6
    assert cosine(vectors[0], vectors[2]) < 0.2


def test_dimensions_are_only_the_models_own(sdk: openai.OpenAI) -> None:
    answer = sdk.embeddings.create(model=LOCAL_MODEL, input="x", dimensions=384,
                                   encoding_format="float")
    assert len(answer.data[0].embedding) == 384
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.embeddings.create(model=LOCAL_MODEL, input="x", dimensions=256)
    assert caught.value.body["param"] == "dimensions"  # type: ignore[index]


def test_an_input_longer_than_the_model_takes_is_a_400_never_cut(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.embeddings.create(model=LOCAL_MODEL, input=["short", "word " * 600])
    assert caught.value.body["param"] == "input[1]"  # type: ignore[index]
    assert caught.value.body["code"] == "context_length_exceeded"  # type: ignore[index]


def test_token_arrays_are_a_400_on_the_embedded_model(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.embeddings.create(model=LOCAL_MODEL, input=[[101, 7592, 102]])
    assert caught.value.body["param"] == "input"  # type: ignore[index]


def test_concurrent_requests_share_the_one_model_safely(sdk: openai.OpenAI) -> None:
    # GIVEN 6 clients embedding different texts at once
    texts = [f"request number {i} about topic {i * 7}" for i in range(6)]
    expected = {t: sdk.embeddings.create(model=LOCAL_MODEL, input=t, encoding_format="float")
                .data[0].embedding for t in texts}
    got: dict[str, list[float]] = {}

    def one(text: str) -> None:
        got[text] = sdk.embeddings.create(model=LOCAL_MODEL, input=text,
                                          encoding_format="float").data[0].embedding

    threads = [threading.Thread(target=one, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # THEN each got its own text's vector
    for text in texts:
        assert got[text] == pytest.approx(expected[text], abs=1e-4)


def test_langchain_openai_embeddings_work_unmodified(server: str) -> None:
    from langchain_openai import OpenAIEmbeddings

    # check_embedding_ctx_length=False: by default LangChain tokenizes with tiktoken (which
    # downloads its encoding on first use) and sends token arrays, which are OpenAI's token
    # ids, meaningless to another model's vocabulary (so refused here, 400).
    embeddings = OpenAIEmbeddings(model=LOCAL_MODEL, base_url=server + "/v1", api_key="unused",
                                  check_embedding_ctx_length=False, max_retries=0)
    try:
        documents = embeddings.embed_documents(list(RELATED))
        query = embeddings.embed_query(RELATED[0])
    finally:
        embeddings.client._client.close()  # its OpenAI client: LangChain never closes it
    assert [len(v) for v in documents] == [384, 384]
    assert query == pytest.approx(documents[0], abs=1e-4)


def test_llamaindex_openai_embedding_works_unmodified(server: str) -> None:
    from llama_index.embeddings.openai import OpenAIEmbedding

    embedding = OpenAIEmbedding(model_name=LOCAL_MODEL, api_base=server + "/v1",
                                api_key="unused", max_retries=0)
    try:
        vectors = embedding.get_text_embedding_batch(list(RELATED))
        query = embedding.get_query_embedding(RELATED[0])
    finally:
        embedding._get_client().close()  # the one it reuses (reuse_client=True)
    assert [len(v) for v in vectors] == [384, 384]
    assert query == pytest.approx(vectors[0], abs=1e-4)


def test_the_model_is_loaded_once_and_reused(server: str, embedder: LocalEmbedder) -> None:
    requests.post(server + "/v1/embeddings", timeout=60,
                  json={"model": LOCAL_MODEL, "input": "warm"}).raise_for_status()
    model = embedder._llm
    for _ in range(3):
        response = requests.post(server + "/v1/embeddings", timeout=60, json={
            "model": LOCAL_MODEL, "input": "warm"})
        assert response.status_code == 200
        assert json.loads(response.content)["usage"]["prompt_tokens"] == 3  # [CLS] warm [SEP]
    assert model is not None and embedder._llm is model


def _doc_blocks() -> list[tuple[str, str]]:
    """The embeddings examples of README.md and docs/ (each once): (language, text)."""
    return [(lang, body) for _, lang, body in code_blocks()
            if "127.0.0.1:8080" in body and any(
                k in body for k in ("/v1/embeddings", "embeddings.create(", "OpenAIEmbeddings("))]


def test_the_docs_examples_work(server: str) -> None:
    # GIVEN the docs' embeddings examples (curl, the OpenAI SDK, LangChain and LlamaIndex),
    # pointed at this dev server
    blocks = _doc_blocks()
    assert sorted(lang for lang, _ in blocks) == ["bash", "python", "python"]
    for lang, body in blocks:
        text = body.replace("http://127.0.0.1:8080", server)
        if lang == "bash":
            # WHEN the curl example runs THEN it prints one 384-dimension vector per input
            command = re.sub(r"\\\n\s*", " ", text).strip()
            done = subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                                  timeout=120, check=False)
            assert done.returncode == 0, done.stderr
            doc = json.loads(done.stdout)
            strict_response(doc)
            assert [len(d["embedding"]) for d in doc["data"]] == [384, 384]
        else:
            # WHEN a Python example runs THEN it prints the vector's size first
            printed = io.StringIO()
            names: dict[str, object] = {}
            try:
                with contextlib.redirect_stdout(printed):
                    exec(compile(text, "docs", "exec"), names)
            finally:
                _close_clients(names)
            # (the server's request log lines share this stdout: the example's line is last)
            assert printed.getvalue().splitlines()[-1].split()[0] == "384", printed.getvalue()


def _close_clients(names: dict[str, object]) -> None:
    """The HTTP clients an example left open (a user's process would exit instead)."""
    from langchain_openai import OpenAIEmbeddings
    from llama_index.embeddings.openai import OpenAIEmbedding

    for value in names.values():
        if isinstance(value, openai.OpenAI):
            value.close()
        elif isinstance(value, OpenAIEmbeddings):
            value.client._client.close()
        elif isinstance(value, OpenAIEmbedding):
            value._get_client().close()


def test_a_request_waiting_for_the_busy_model_ends_by_the_queue_timeout_or_its_deadline(
        ) -> None:
    # GIVEN a model busy with a long request, and a queue timeout of 0.2 s
    embedder = LocalEmbedder(load_settings({}, provider="local", local_queue_timeout_s=0.2))
    small = EmbeddingRequest(LOCAL_MODEL, ("hi",))
    long = EmbeddingRequest(LOCAL_MODEL, tuple(f"text {i} " * 30 for i in range(48)))
    try:
        embedder.embed(small, LOCAL_MODEL, NO_DEADLINE)  # loaded
        worker = threading.Thread(target=embedder.embed, args=(long, LOCAL_MODEL, NO_DEADLINE))
        worker.start()
        while not embedder._lock.locked():
            time.sleep(0.001)
        # WHEN another request waits for it THEN it gets 503 with Retry-After after 0.2 s
        started = time.monotonic()
        with pytest.raises(UpstreamUnavailableError) as caught:
            embedder.embed(small, LOCAL_MODEL, NO_DEADLINE)
        assert caught.value.retry_after == 5
        assert 0.15 < time.monotonic() - started < 3  # generous: the CPU is shared
        # and one whose deadline comes first gets 504 by then
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            embedder.embed(small, LOCAL_MODEL, Deadline.after(0.05))
        assert time.monotonic() - started < 2
        worker.join(120)
        # AND a long request stops between batches at its own deadline
        with pytest.raises(DeadlineExceededError):
            embedder.embed(long, LOCAL_MODEL, Deadline.after(0.3))
    finally:
        embedder.close()
