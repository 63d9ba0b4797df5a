"""``response_format`` on the embedded model: a llama.cpp grammar (GBNF) that only JSON of the
requested shape satisfies, and a cheap way to sample under it. Local development only, like
:mod:`streamgate.providers.local` (it imports ``llama_cpp`` and ``numpy``).

- ``json_object``: llama.cpp's JSON grammar (an object at the root, strings without raw
  control characters), with at most one space between two tokens instead of its newline and
  up to 20 blanks: given room for indentation the 270M model wandered into nested layouts
  until ``max_tokens`` in 2 of 12 answers, compact it finished 16 of 16.
- ``json_schema``: llama-cpp-python's JSON-Schema-to-grammar converter (one space at most
  between tokens too), with its string character rule made strict JSON (the converter's
  admits raw control characters, which no JSON parser accepts). The converter does not enforce
  every keyword; :func:`unenforced` names the first one it would ignore. With ``strict: true``
  that is a 400, as OpenAI refuses a strict schema it cannot guarantee; otherwise (OpenAI's
  best-effort mode) the rest of the schema is enforced and the answer may break that keyword.

Sampling: llama.cpp's grammar sampler checks every token of the vocabulary, and Gemma 3 has
262,144 of them (120 ms for one check here). :class:`GrammarFilter` checks the model's 64
likeliest tokens first and the whole vocabulary only when none of them fits, as llama.cpp's
common sampler does with its single sampled token: 13-23 tokens/s against 7-11 for the same
answers with llama.cpp's sampler, one thread on this 2-core machine.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from streamgate.errors import RequestError, UpstreamError

if TYPE_CHECKING:
    import numpy.typing as npt

    from streamgate.validation import ResponseFormat

SCHEMA_PARAM = "response_format.json_schema.schema"

# llama.cpp's grammars/json.gbnf (llama-cpp-python's JSON_GBNF), its whitespace cut to one space.
JSON_OBJECT_GRAMMAR = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::= "\"" char* "\"" ws
char   ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4})

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

ws ::= " "?
"""
# One character of a JSON string: no quote, backslash or control character unescaped.
_JSON_CHAR = (r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] '
              r"[0-9a-fA-F] [0-9a-fA-F])")

# Keywords that say nothing about what is valid: always allowed, never enforced.
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id",
                          "$comment", "deprecated", "readOnly", "writeOnly", "$defs",
                          "definitions"})
_TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4",
                      "uuid5"})


def grammar_for(fmt: ResponseFormat) -> str:
    """The GBNF grammar for a ``json_object`` or ``json_schema`` response format; a schema it
    cannot express is a 400 naming the schema."""
    if fmt.type == "json_object":
        return JSON_OBJECT_GRAMMAR
    assert fmt.type == "json_schema" and fmt.schema is not None
    if fmt.strict:
        reason = unenforced(fmt.schema)
        if reason is not None:
            raise RequestError(f"The embedded model cannot enforce this strict schema: {reason}"
                               "; drop the keyword or send 'strict': false", param=SCHEMA_PARAM)
    from llama_cpp import llama_grammar

    # No fetching of remote $refs; the converter's own defaults otherwise (its json_schema_to_gbnf
    # with the string rule replaced).
    converter: Any = llama_grammar.SchemaConverter(  # type: ignore[no-untyped-call]
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        # The converter resolves $ref in place: give it a copy of the client's schema.
        schema = converter.resolve_refs(json.loads(json.dumps(fmt.schema)), "request")
        converter.visit(schema, "")
    except (AssertionError, ValueError, KeyError, TypeError, IndexError, AttributeError,
            RecursionError) as e:
        reason = str(e)[:200] or type(e).__name__
        raise RequestError(f"The embedded model cannot turn this schema into a grammar "
                           f"({reason})", param=SCHEMA_PARAM) from e
    if "char" in converter._rules:
        converter._rules["char"] = _JSON_CHAR
    text: str = converter.format_grammar()
    return text


def unenforced(schema: Mapping[str, Any]) -> str | None:
    """Why the converter would not enforce all of ``schema`` (the first keyword it would
    ignore), or None. It follows the converter's choice of one rule per (sub)schema: ``$ref``,
    then ``anyOf``, a list of types, ``const``, ``enum``, an object with properties, an array
    with items, a string pattern, format or length, a bare type; every other keyword of that
    subschema would be dropped."""
    for where, node in _subschemas(schema, "schema"):
        if not isinstance(node, Mapping):
            if node is True or node == {}:
                continue
            return f"{where} is not a schema object"
        keys = set(node) - _ANNOTATIONS
        used = _used_keywords(node)
        extra = sorted(keys - used)
        if extra:
            return f"'{extra[0]}' at {where}"
        if isinstance(node.get("type"), str) and node["type"] not in _TYPES:
            return f"type {node['type']!r} at {where}"
        missing = set(node.get("required", ())) - set(node.get("properties", {}))
        if "required" in used and missing:
            return f"'required' names {sorted(missing)[0]!r}, not in 'properties', at {where}"
    return None


def _used_keywords(node: Mapping[str, Any]) -> set[str]:
    """The keywords the converter's rule for this subschema honours (see its ``visit``)."""
    kind = node.get("type")
    if "$ref" in node:
        return {"$ref"}
    if "anyOf" in node and "oneOf" not in node:
        return {"anyOf"}
    if isinstance(kind, list):
        return {"type"} if all(t in _TYPES for t in kind) else set()
    if "const" in node:
        return {"const", "type"}
    if "enum" in node:
        return {"enum", "type"}
    if kind in (None, "object") and ("properties" in node or "additionalProperties" in node):
        return {"type", "properties", "required", "additionalProperties"}
    if kind in (None, "array") and ("items" in node or "prefixItems" in node):
        items = node.get("items")
        if not items:  # the converter then takes prefixItems, a fixed tuple
            return {"type", "items", "prefixItems"}
        return {"type", "items"} if isinstance(items, list) else {
            "type", "items", "minItems", "maxItems"}
    if kind in (None, "string") and "pattern" in node:
        return {"type", "pattern"}
    if kind in (None, "string") and node.get("format") in _FORMATS:
        return {"type", "format"}
    if kind == "string" and ("minLength" in node or "maxLength" in node):
        return {"type", "minLength", "maxLength"}
    return {"type"}


def _subschemas(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    """Every subschema with its path, the schema itself first."""
    yield where, node
    if not isinstance(node, Mapping):
        return
    for key in ("properties", "$defs", "definitions"):
        children = node.get(key)
        if isinstance(children, Mapping):
            for name, child in children.items():
                yield from _subschemas(child, f"{where}.{key}.{name}")
    for key in ("items", "additionalProperties"):
        child = node.get(key)
        if isinstance(child, Mapping):
            yield from _subschemas(child, f"{where}.{key}")
    for key in ("anyOf", "prefixItems", "items"):
        children = node.get(key)
        if isinstance(children, list):
            for i, child in enumerate(children):
                yield from _subschemas(child, f"{where}.{key}[{i}]")


# llama.cpp's llama_token_data: {int32 id; float logit; float p;}
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)],
                       align=True)


def text_tokens(vocab: Any) -> npt.NDArray[np.bool_]:
    """Which tokens may appear in constrained JSON: every token but control and unused ones
    (``<unused0>``, ``<start_of_turn>``), whose text the grammar would see but the answer never
    shows; end-of-generation tokens stay, for the grammar to allow once the JSON is complete.
    A scan of the whole vocabulary (~0.3 s for Gemma 3): compute it once per model."""
    import llama_cpp

    hidden = (llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
              | llama_cpp.LLAMA_TOKEN_ATTR_UNUSED)
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    return np.fromiter(
        (not llama_cpp.llama_vocab_get_attr(vocab, t) & hidden
         or llama_cpp.llama_vocab_is_eog(vocab, t) for t in range(n)),
        dtype=np.bool_, count=n)


class GrammarFilter:
    """A llama-cpp-python logits processor that leaves only the tokens a grammar allows now
    (among ``usable``, see :func:`text_tokens`).

    Call :meth:`allows` on the token the sampler chose, then :meth:`accept` to advance the
    grammar (llama.cpp aborts the process if a grammar is handed a token it does not allow, so
    the check comes first). :meth:`close` frees the grammar.
    """

    def __init__(self, vocab: Any, grammar: str, *, usable: npt.NDArray[np.bool_],
                 likeliest: int) -> None:
        import llama_cpp

        self._llama = llama_cpp
        self._sampler = llama_cpp.llama_sampler_init_grammar(
            vocab, grammar.encode("utf-8"), b"root")
        if not self._sampler:
            raise RequestError("The embedded model could not compile a grammar for this "
                               "'response_format'", param="response_format")
        self._usable = usable
        self._likeliest = likeliest
        self.whole_vocabulary_checks = 0  # how often none of the likeliest tokens fitted

    def __call__(self, input_ids: npt.NDArray[np.intc],
                 scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        scores = np.where(self._usable, scores, -np.inf).astype(scores.dtype)
        k = min(self._likeliest, scores.size)
        likeliest = np.argpartition(scores, -k)[-k:]
        allowed = self._allowed(likeliest[self._usable[likeliest]])
        if allowed.size == 0:
            self.whole_vocabulary_checks += 1
            allowed = self._allowed(np.flatnonzero(self._usable))
        out = np.full_like(scores, -np.inf)
        out[allowed] = scores[allowed]
        return out

    def allows(self, token: int) -> bool:
        return bool(self._usable[token]) and bool(self._allowed(np.array([token])).size)

    def accept(self, token: int) -> None:
        if not self.allows(token):
            raise UpstreamError("The embedded model produced a token its grammar does not allow")
        self._llama.llama_sampler_accept(self._sampler, token)

    def close(self) -> None:
        sampler, self._sampler = self._sampler, None
        if sampler:
            self._llama.llama_sampler_free(sampler)

    def _allowed(self, ids: npt.NDArray[Any]) -> npt.NDArray[np.int32]:
        """The tokens among ``ids`` the grammar allows next (it only looks at ids)."""
        llama = self._llama
        data = np.zeros(ids.size, dtype=_TOKEN_DATA)
        data["id"] = ids
        candidates = llama.llama_token_data_array(
            data=data.ctypes.data_as(llama.llama_token_data_p), size=ids.size, selected=-1,
            sorted=False)
        llama.llama_sampler_apply(self._sampler, ctypes.byref(candidates))
        allowed: npt.NDArray[np.int32] = data["id"][np.isfinite(data["logit"])]
        return allowed
