"""Embeddings: the optional second capability of a backend, beside streaming chat.

A chat provider streams deltas; an :class:`Embedder` turns a batch of inputs into vectors in
one call (``POST /v1/embeddings``, https://platform.openai.com/docs/api-reference/embeddings).
Each provider kind that can embed has a module of its own, imported only when chosen:
``local_embed`` (the embedded all-MiniLM-L6-v2, development only), ``bedrock_embed`` (Titan
Text Embeddings V2, Cohere Embed v3), ``openai_embed`` (any OpenAI-compatible upstream).

What a model can do is known before any call, from :func:`model_info`: its vector length
(the documented size, or the one configured for it), whether a request may choose another
(``dimensions``), and whether it takes token arrays or Cohere's ``input_type``. A request
asking for what the model cannot do is a 400 naming the field (:func:`check_embedding`), never
a silent drop. The same table tells the routes which models are embedding models and refuses
a route whose targets would give vectors of different lengths.

Every wait of :meth:`Embedder.embed` ends by the request's deadline at the latest.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from streamgate.errors import ConfigError, RequestError, UpstreamError

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.deadline import Deadline

LOCAL_MODEL = "all-minilm-l6-v2"
TITAN_V2 = "amazon.titan-embed-text-v2:0"
COHERE_MODELS = ("cohere.embed-english-v3", "cohere.embed-multilingual-v3")
# Titan Text Embeddings V2's output sizes (default 1024), per its model card.
TITAN_DIMENSIONS = frozenset({256, 512, 1024})
# Cohere's input types (https://docs.aws.amazon.com/bedrock/latest/userguide/
# model-parameters-embed.html); ``search_document`` unless the request says otherwise.
COHERE_INPUT_TYPES = ("search_document", "search_query", "classification", "clustering")
MAX_DIMENSIONS = 16_384


@dataclass(frozen=True, slots=True)
class EmbeddingModel:
    """What the pipeline knows of one embedding model before calling it."""

    model: str  # the backend's own id
    dimensions: int  # the vector length when the request does not ask for another
    # Other lengths it can produce (Titan V2); None: only ``dimensions``.
    choices: frozenset[int] | None = None
    any_dimensions: bool = False  # the backend decides (an upstream: 'dimensions' forwarded)
    tokens: bool = False  # takes token arrays as input
    input_type: bool = False  # takes Cohere's input_type


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str | None
    # Strings, or token arrays (``tokens``): never both.
    inputs: tuple[str, ...] | tuple[tuple[int, ...], ...]
    tokens: bool = False
    dimensions: int | None = None
    user: str | None = None
    input_type: str | None = None  # Cohere's (our extension field)
    # How the client wants the vectors ("float" or "base64"): the dialect encodes them; an
    # upstream is asked for the same form (it is decoded to check it).
    encoding_format: str = "float"

    def estimate_tokens(self) -> int:
        """Input tokens to reserve before the call (~4 characters a token, as chat's)."""
        if self.tokens:
            return sum(len(i) for i in self.inputs)
        return sum(max(1, math.ceil(len(i) / 4)) for i in self.inputs)


@dataclass(frozen=True, slots=True)
class Embeddings:
    vectors: list[list[float]]  # one per input, in input order
    prompt_tokens: int  # as the backend counted them


class Embedder(Protocol):
    name: str

    def embedding_models(self) -> dict[str, EmbeddingModel]:
        """Public model name → model, when this backend is the one configured (no routes)."""
        ...

    def embed(self, request: EmbeddingRequest, model: str, deadline: Deadline) -> Embeddings:
        """Vectors for every input of ``request`` on ``model`` (the backend's id), of
        ``request.dimensions`` when set. Raises the mapped error of the backend; every wait
        ends by ``deadline`` with ``DeadlineExceededError``."""
        ...


# kind -> module that defines ``create_embedder(settings) -> Embedder | None``.
EMBEDDERS: dict[str, str] = {
    "local": "streamgate.providers.local_embed",
    "bedrock": "streamgate.providers.bedrock_embed",
    "openai": "streamgate.providers.openai_embed",
}


def create_embedder(settings: Settings) -> Embedder | None:
    """The configured provider's embedder, or None when it serves no embedding model."""
    module_name = EMBEDDERS.get(settings.provider)
    if module_name is None:
        return None
    module = importlib.import_module(module_name)
    embedder: Embedder | None = module.create_embedder(settings)
    return embedder


def model_info(kind: str, model: str, dimensions: int | None) -> EmbeddingModel | None:
    """The embedding model ``model`` of a ``kind`` backend, with ``dimensions`` configured for
    it; None when it is not one. Sizes are the documented ones (MiniLM 384, Titan V2 1024 or
    256/512, Cohere v3 1024); an upstream's model is an embedding model when its size is
    configured, since nothing else says so. A configured size the model cannot give is a
    :class:`ConfigError`."""
    if dimensions is not None and not (isinstance(dimensions, int) and not isinstance(
            dimensions, bool) and 1 <= dimensions <= MAX_DIMENSIONS):
        raise ConfigError(f"embedding model {model!r}: dimensions must be an integer from 1 "
                          f"to {MAX_DIMENSIONS}")
    info: EmbeddingModel | None = None
    if kind == "local" and model == LOCAL_MODEL:
        info = EmbeddingModel(model, 384)
    elif kind == "bedrock" and _bare(model) == TITAN_V2:
        size = 1024 if dimensions is None else dimensions
        if size not in TITAN_DIMENSIONS:
            raise ConfigError(f"{model} gives vectors of 256, 512 or 1024 dimensions, not "
                              f"{size}")
        return EmbeddingModel(model, size, choices=TITAN_DIMENSIONS)
    elif kind == "bedrock" and _bare(model) in COHERE_MODELS:
        info = EmbeddingModel(model, 1024, input_type=True)
    elif kind == "openai" and dimensions is not None:
        return EmbeddingModel(model, dimensions, any_dimensions=True, tokens=True)
    if info is not None and dimensions not in (None, info.dimensions):
        raise ConfigError(f"{model} gives vectors of {info.dimensions} dimensions, not "
                          f"{dimensions}")
    return info


def _bare(model: str) -> str:
    """A Bedrock model id without a cross-region profile prefix (``us.``, ``eu.``...)."""
    for known in (TITAN_V2, *COHERE_MODELS):
        if model.endswith("." + known):
            return known
    return model


def configured_models(settings: Settings, kind: str,
                      default: tuple[str, ...] = ()) -> dict[str, EmbeddingModel]:
    """``STREAMGATE_EMBEDDING_MODELS`` for a ``kind`` backend: ``public[=backend][@size]``
    entries (``docs=amazon.titan-embed-text-v2:0@512``, ``nomic-embed-text@768``) → public
    name → model; ``default`` when the setting is empty."""
    models: dict[str, EmbeddingModel] = {}
    for entry in settings.embedding_models or default:
        names, at, size = entry.rpartition("@") if "@" in entry else (entry, "", "")
        public, _, backend = names.partition("=")
        public, backend = public.strip(), (backend.strip() or public.strip())
        if not public or (at and not size.strip().isdigit()):
            raise ConfigError(f"STREAMGATE_EMBEDDING_MODELS: {entry!r} is not "
                              "name[=backend-model][@dimensions]")
        info = model_info(kind, backend, int(size) if at else None)
        if info is None:
            hint = (" (an upstream's model needs its size: name@dimensions)"
                    if kind == "openai" else "")
            raise ConfigError(f"STREAMGATE_EMBEDDING_MODELS: {backend!r} is not an embedding "
                              f"model of the {kind} provider{hint}")
        models[public] = info
    return models


def check_embedding(request: EmbeddingRequest, info: EmbeddingModel) -> None:
    """400 for what ``info``'s model cannot honour, naming the field."""
    if request.dimensions is not None and request.dimensions != info.dimensions and not (
            info.any_dimensions or (info.choices and request.dimensions in info.choices)):
        sizes = (f"one of {', '.join(str(d) for d in sorted(info.choices))}" if info.choices
                 else f"only {info.dimensions}")
        raise RequestError(f"This model does not support 'dimensions' {request.dimensions}: "
                           f"it gives {sizes}", param="dimensions")
    if request.tokens and not info.tokens:
        raise RequestError("This model takes 'input' as text only, not token arrays",
                           param="input")
    if request.input_type is not None and not info.input_type:
        raise RequestError("'input_type' is Cohere Embed's; this model does not take it",
                           param="input_type")


def check_vectors(result: Embeddings, request: EmbeddingRequest, dimensions: int,
                  who: str) -> Embeddings:
    """The backend's answer as promised: one finite vector of ``dimensions`` per input; what
    is not is the backend's fault (an ``upstream_error``), never a 500 or a wrong answer."""
    if len(result.vectors) != len(request.inputs):
        raise UpstreamError(f"{who} returned {len(result.vectors)} embeddings for "
                            f"{len(request.inputs)} inputs")
    for vector in result.vectors:
        if len(vector) != dimensions:
            raise UpstreamError(f"{who} returned a vector of {len(vector)} dimensions where "
                                f"{dimensions} were due")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v) for v in vector):
            raise UpstreamError(f"{who} returned a vector that is not all finite numbers")
    return result
