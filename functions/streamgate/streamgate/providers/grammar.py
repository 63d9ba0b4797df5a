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

Bounds (docs/api/index.md, "Bounds"): the converter spells a count out (``maxLength: n``
becomes ``n`` nested optional groups, ``minItems: n`` ``n`` copies of the item), and
llama.cpp's grammar parser recurses once per nesting level (~430 bytes of stack each: 30,000
levels overflow a thread's 8 MiB and kill the process). So before anything reaches llama.cpp,
every count in the schema (``minLength``, ``maxLength``, ``minItems``, ``maxItems``, each
``{n}``, ``{n,}``, ``{n,m}`` of a ``pattern``) must be a whole number from 0 to
:data:`MAX_REPEAT`, with the minimum not above the maximum; the converter may write at most
:data:`MAX_GRAMMAR_CHARS` characters of rules (counted as it writes them, so the work is
bounded too, and stopped at the request's deadline); and no rule of the result may nest
parentheses deeper than :data:`MAX_NESTING`. Anything beyond is a 400 naming
``response_format`` and the bound."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from streamgate.deadline import NO_DEADLINE
from streamgate.errors import RequestError, UpstreamError

if TYPE_CHECKING:
    import numpy.typing as npt

    from streamgate.deadline import Deadline
    from streamgate.validation import ResponseFormat

SCHEMA_PARAM = "response_format.json_schema.schema"

# What a grammar may contain (see the module docstring and docs/api/index.md, "Bounds").
MAX_REPEAT = 500  # every count: minLength, maxLength, minItems, maxItems, {n,m} in a pattern
MAX_GRAMMAR_CHARS = 500_000  # rules the converter may write, all told
MAX_NESTING = 600  # parentheses inside one rule: llama.cpp's parser recurses on each level
COUNT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems")
# A rule name longer than this is shortened (a count repeats an item's name up to MAX_REPEAT
# times, and the converter names rules after their whole path of property names).
_MAX_RULE_NAME = 48

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

# What a JSON string cannot hold unescaped, as the inside of a GBNF character class.
_NOT_IN_JSON_STRINGS = r'"\\\x7F\x00-\x1F'

# Keywords that say nothing about what is valid: always allowed, never enforced.
_ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id",
                          "$comment", "deprecated", "readOnly", "writeOnly", "$defs",
                          "definitions"})
_TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4",
                      "uuid5"})


def grammar_for(fmt: ResponseFormat, deadline: Deadline = NO_DEADLINE) -> str:
    """The GBNF grammar for a ``json_object`` or ``json_schema`` response format; a schema it
    cannot express, or one beyond the bounds, is a 400 naming the schema. Building it stops at
    ``deadline`` (``DeadlineExceededError``)."""
    if fmt.type == "json_object":
        return JSON_OBJECT_GRAMMAR
    assert fmt.type == "json_schema" and fmt.schema is not None
    beyond = beyond_bounds(fmt.schema)
    if beyond is not None:
        raise RequestError(f"response_format: {beyond}", param=SCHEMA_PARAM)
    if fmt.strict:
        reason = unenforced(fmt.schema)
        if reason is not None:
            raise RequestError(f"The embedded model cannot enforce this strict schema: {reason}"
                               "; drop the keyword or send 'strict': false", param=SCHEMA_PARAM)
    # No fetching of remote $refs; the converter's own defaults otherwise (its json_schema_to_gbnf
    # with the string rule replaced).
    converter: Any = _bounded_converter()(deadline)
    try:
        # The converter resolves $ref in place: give it a copy of the client's schema.
        schema = converter.resolve_refs(json.loads(json.dumps(fmt.schema)), "request")
        converter.visit(schema, "")
    except _GrammarTooLargeError:
        raise RequestError(
            f"response_format: this schema needs over {MAX_GRAMMAR_CHARS:,} characters of "
            "grammar rules, the most the embedded model builds; use fewer properties "
            "(optional ones cost the most), enum values or smaller counts",
            param=SCHEMA_PARAM) from None
    except RecursionError:
        raise RequestError("response_format: this schema nests too deeply for the embedded "
                           "model's grammar", param=SCHEMA_PARAM) from None
    except (AssertionError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        reason = str(e)[:200] or type(e).__name__
        raise RequestError(f"The embedded model cannot turn this schema into a grammar "
                           f"({reason})", param=SCHEMA_PARAM) from e
    rules: dict[str, str] = converter._rules
    for name, rule in rules.items():
        rules[name] = _json_safe_classes(rule)
    if "char" in rules:
        rules["char"] = _JSON_CHAR
    text: str = converter.format_grammar()
    deepest = nesting(text)
    if deepest > MAX_NESTING:
        raise RequestError(
            f"response_format: the grammar for this schema nests {deepest} levels deep, over "
            f"the {MAX_NESTING} the embedded model allows; use smaller counts or fewer nested "
            "groups in 'pattern'", param=SCHEMA_PARAM)
    return text


def _json_safe_classes(rule: str) -> str:
    """``rule`` with every negated character class (``[^,]``, a pattern's ``.``) kept from
    matching a quote, a backslash or a control character: inside a JSON string those would
    end it or break it (the converter copies a pattern's classes as the regex wrote them)."""
    out: list[str] = []
    i, end = 0, len(rule)
    while i < end:
        c = rule[i]
        if c not in "\"[":
            out.append(c)
            i += 1
            continue
        close = "\"" if c == "\"" else "]"
        j = i + 1
        while j < end and rule[j] != close:
            j += 2 if rule[j] == "\\" else 1
        if c == "[" and rule.startswith("[^", i) and j < end:
            out.append(rule[i:j] + _NOT_IN_JSON_STRINGS + "]")
        else:
            out.append(rule[i:j + 1])
        i = j + 1
    return "".join(out)


def beyond_bounds(schema: Mapping[str, Any]) -> str | None:
    """What in ``schema`` is beyond the counts a grammar may spell out (see the module
    docstring), or None. Linear in the schema's size, and nothing is built."""
    for where, node in _visitable(schema):
        for key in COUNT_KEYWORDS:
            if key in node:
                value = node[key]
                if (isinstance(value, bool) or not isinstance(value, int)
                        or not 0 <= value <= MAX_REPEAT):
                    return (f"'{key}' at {where} must be a whole number from 0 to "
                            f"{MAX_REPEAT} on the embedded model")
        for low, high in (("minLength", "maxLength"), ("minItems", "maxItems")):
            if low in node and high in node and node[low] > node[high]:
                return f"'{low}' at {where} is above its '{high}': no answer can satisfy it"
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            for low_count, high_count in _quantifiers(pattern):
                if any(c is not None and not 0 <= c <= MAX_REPEAT
                       for c in (low_count, high_count)):
                    return (f"a repetition count in 'pattern' at {where} must be a whole "
                            f"number from 0 to {MAX_REPEAT} on the embedded model")
                if low_count is not None and high_count is not None and low_count > high_count:
                    return (f"a repetition in 'pattern' at {where} has its minimum above its "
                            "maximum")
    return None


# Keywords whose values are data, never visited as schemas; keywords holding a map of schemas.
_DATA_KEYWORDS = frozenset({"enum", "const", "default", "examples"})
_SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions", "patternProperties",
                          "dependentSchemas"})


def _visitable(root: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every object the converter may visit as a schema, with its path, each once: whatever
    sits under a keyword (known or not) but data, and whatever a local ``$ref`` points at.
    Without recursion: the order does not matter, only that nothing is missed."""
    todo: list[tuple[str, Any]] = [("schema", root)]
    seen: set[int] = set()
    while todo:
        where, node = todo.pop()
        if isinstance(node, list):
            todo.extend((f"{where}[{i}]", item) for i, item in enumerate(node))
            continue
        if not isinstance(node, Mapping) or id(node) in seen:
            continue
        seen.add(id(node))
        yield where, node
        for key, value in node.items():
            if key in _DATA_KEYWORDS:
                continue
            if key in _SCHEMA_MAPS and isinstance(value, Mapping):
                todo.extend((f"{where}.{key}.{name}", child) for name, child in value.items())
            elif key == "$ref" and isinstance(value, str):
                todo.append(_pointed_at(root, value))
            else:
                todo.append((f"{where}.{key}", value))


def _pointed_at(root: Mapping[str, Any], ref: str) -> tuple[str, Any]:
    """What a local ``$ref`` names, with its path, followed as the converter follows it (None
    if nothing)."""
    target: Any = root
    where = "schema"
    for part in ref.split("#")[-1].split("/")[1:]:
        if not isinstance(target, Mapping) or part not in target:
            return where, None
        target = target[part]
        where += f".{part}"
    return where, target


def _quantifiers(pattern: str) -> Iterator[tuple[int | None, int | None]]:
    """The counts of every ``{n}``, ``{n,}``, ``{,m}``, ``{n,m}`` in ``pattern``, read as the
    converter reads them (escapes and character classes skipped, numbers through ``int``);
    one it cannot read is left for it to refuse."""
    i, end = 0, len(pattern)
    while i < end:
        c = pattern[i]
        if c == "\\":
            i += 2
        elif c == "[":
            i += 1
            while i < end and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            i += 1
        elif c == "{":
            close = pattern.find("}", i)
            if close < 0:
                return
            parts = [part.strip() for part in pattern[i + 1:close].split(",")]
            counts: list[int | None] = []
            for part in parts:
                try:
                    counts.append(int(part) if part else None)
                except ValueError:
                    counts.append(None)
            if len(counts) == 1:
                counts.append(counts[0])
            if len(counts) == 2:
                yield counts[0], counts[1]
            i = close + 1
        else:
            i += 1


def nesting(grammar: str) -> int:
    """How deeply parentheses nest in the deepest rule of a GBNF grammar (quoted strings and
    character classes skipped)."""
    deepest = depth = 0
    i, end = 0, len(grammar)
    while i < end:
        c = grammar[i]
        if c in "\"[":
            close = "\"" if c == "\"" else "]"
            i += 1
            while i < end and grammar[i] != close:
                i += 2 if grammar[i] == "\\" else 1
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
        elif c == "\n":
            depth = 0
        i += 1
    return deepest


class _GrammarTooLargeError(Exception):
    """The converter wrote more than MAX_GRAMMAR_CHARS characters of rules."""


@functools.cache
def _bounded_converter() -> Any:
    """llama-cpp-python's converter, counting what it writes (a 400 past MAX_GRAMMAR_CHARS),
    stopping at the deadline, and giving rules short names. Built on first use: importing
    ``llama_cpp`` loads the library."""
    from llama_cpp import llama_grammar

    class BoundedConverter(llama_grammar.SchemaConverter):
        def __init__(self, deadline: Deadline) -> None:
            super().__init__(  # type: ignore[no-untyped-call]
                prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
            self._deadline = deadline
            self._written = 0

        def _add_rule(self, name: str, rule: str) -> str:
            self._written += len(name) + len(rule)
            if self._written > MAX_GRAMMAR_CHARS:
                raise _GrammarTooLargeError
            self._deadline.check()
            if len(name) > _MAX_RULE_NAME:
                digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()
                name = f"{name[:_MAX_RULE_NAME - 13]}-{digest[:12]}"
            key: str = super()._add_rule(name, rule)  # type: ignore[no-untyped-call]
            return key

    return BoundedConverter


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
