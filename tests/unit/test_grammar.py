"""response_format → grammar for the embedded model, without the model: which schemas the
converter enforces in full, which strict schemas are refused, and the grammar text itself."""

from __future__ import annotations

import time
from typing import Any, Literal

import pytest
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel, Field

from streamgate.deadline import Deadline
from streamgate.errors import StreamgateError
from streamgate.providers.grammar import (
    JSON_OBJECT_GRAMMAR,
    MAX_GRAMMAR_CHARS,
    MAX_NESTING,
    MAX_REPEAT,
    beyond_bounds,
    grammar_for,
    nesting,
    unenforced,
)
from streamgate.validation import ResponseFormat

PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
STRICT_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] | "\\"'


class Address(BaseModel):
    city: str
    postcode: str | None


class Customer(BaseModel):
    name: str = Field(description="Full name", min_length=1, max_length=80)
    tier: Literal["free", "pro"]
    tags: list[str] = Field(min_length=1, max_length=3)
    address: Address
    since: str = Field(json_schema_extra={"format": "date"})


def _schema(schema: dict[str, Any], *, strict: bool | None = True) -> ResponseFormat:
    return ResponseFormat("json_schema", "s", None, schema, strict)


def test_json_object_grammar_is_an_object_of_strict_json_strings() -> None:
    grammar = grammar_for(ResponseFormat("json_object"))
    assert grammar == JSON_OBJECT_GRAMMAR
    assert "root   ::= object" in grammar
    assert r'char   ::= [^"\\\x7F\x00-\x1F] | "\\"' in grammar
    assert 'ws ::= " "?' in grammar  # no room to wander off in indentation


def test_schema_grammar_uses_a_strict_json_string_rule() -> None:
    # The converter's own rule is [^"\\], which lets a raw newline into a string.
    grammar = grammar_for(_schema(PERSON))
    assert STRICT_CHAR in grammar
    assert 'root ::= "{" space name-kv "," space age-kv "}" space' in grammar
    assert 'space ::= " "?' in grammar  # at most one blank between tokens


def test_what_the_openai_sdk_sends_for_a_pydantic_model_is_enforced_in_full() -> None:
    schema = to_strict_json_schema(Customer)
    assert unenforced(schema) is None
    assert STRICT_CHAR in grammar_for(_schema(schema))


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        (PERSON, None),
        ({}, None),
        ({"type": "object"}, None),
        ({"type": ["string", "null"]}, None),
        ({"enum": ["a", 1, None]}, None),
        ({"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3}, None),
        ({"type": "string", "pattern": "^[a-z]+$", "title": "t", "examples": ["ab"]}, None),
        ({"type": "integer", "minimum": 0}, "'minimum' at schema"),
        ({"type": "object", "properties": {"age": {"type": "integer", "maximum": 150}}},
         "'maximum' at schema.properties.age"),
        ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "'oneOf' at schema"),
        ({"allOf": [PERSON]}, "'allOf' at schema"),
        ({"not": {"type": "null"}}, "'not' at schema"),
        ({"type": "string", "format": "email"}, "'format' at schema"),
        ({"type": "string", "pattern": "^a", "maxLength": 3}, "'maxLength' at schema"),
        ({"type": ["string", "null"], "maxLength": 3}, "'maxLength' at schema"),
        ({"type": "array", "items": [{"type": "string"}], "minItems": 1},
         "'minItems' at schema"),
        ({"type": "array", "items": {"type": "string"}, "uniqueItems": True},
         "'uniqueItems' at schema"),
        ({"type": "object", "properties": {"a": {}}, "required": ["a", "b"]},
         "'required' names 'b', not in 'properties', at schema"),
        ({"type": "object", "properties": {}, "patternProperties": {"^x": {}}},
         "'patternProperties' at schema"),
        ({"type": "date"}, "type 'date' at schema"),
        ({"$defs": {"Even": {"type": "integer", "multipleOf": 2}}, "$ref": "#/$defs/Even"},
         "'multipleOf' at schema.$defs.Even"),
        ({"type": "array", "items": {"anyOf": [{"type": "number", "exclusiveMinimum": 0}]}},
         "'exclusiveMinimum' at schema.items.anyOf[0]"),
        ({"type": "object", "properties": {"a": False}}, "schema.properties.a is not a schema "
         "object"),
    ],
)
def test_unenforced_names_the_first_keyword_the_grammar_would_ignore(
    schema: dict[str, Any], reason: str | None
) -> None:
    assert unenforced(schema) == reason


def test_a_strict_schema_the_grammar_cannot_enforce_is_a_400() -> None:
    with pytest.raises(StreamgateError) as info:
        grammar_for(_schema({"type": "object", "properties": {
            "age": {"type": "integer", "minimum": 0}}, "required": ["age"]}))
    err = info.value
    assert (err.status, err.param) == (400, "response_format.json_schema.schema")
    assert err.message == ("The embedded model cannot enforce this strict schema: 'minimum' at "
                           "schema.properties.age; drop the keyword or send 'strict': false")


@pytest.mark.parametrize("strict", [False, None])
def test_a_schema_that_is_not_strict_gets_what_the_grammar_can_enforce(
    strict: bool | None
) -> None:
    # OpenAI's non-strict mode is best effort: the minimum is not enforced, the rest is.
    grammar = grammar_for(_schema({"type": "object", "properties": {
        "age": {"type": "integer", "minimum": 0}}, "required": ["age"]}, strict=strict))
    assert 'root ::= "{" space age-kv "}" space' in grammar


@pytest.mark.parametrize(
    ("schema", "reason"),
    [({"$ref": "https://example.com/person.json"},
      "Fetching remote schemas is not allowed (use --allow-fetch for force)"),
     ({"$ref": "person.json"}, "Unsupported ref person.json"),
     ({"type": "array", "items": {}}, "'prefixItems'")],
)
def test_a_schema_the_converter_cannot_express_is_a_400_whatever_strict_says(
    schema: dict[str, Any], reason: str
) -> None:
    with pytest.raises(StreamgateError) as info:
        grammar_for(_schema(schema, strict=False))
    assert (info.value.status, info.value.param) == (400, "response_format.json_schema.schema")
    assert info.value.message == ("The embedded model cannot turn this schema into a grammar "
                                  f"({reason})")


def test_the_clients_schema_is_not_changed_by_the_conversion() -> None:
    schema = {"$defs": {"P": PERSON}, "$ref": "#/$defs/P"}
    before = repr(schema)
    grammar_for(_schema(schema))
    assert repr(schema) == before


# -- bounds: what a grammar may contain before llama.cpp sees it --------------------------------

BOUND = f"from 0 to {MAX_REPEAT} on the embedded model"


def _refused(schema: dict[str, Any], *, strict: bool | None = False) -> StreamgateError:
    with pytest.raises(StreamgateError) as info:
        grammar_for(_schema(schema, strict=strict))
    assert (info.value.status, info.value.param) == (400, "response_format.json_schema.schema")
    return info.value


@pytest.mark.parametrize(("schema", "message"), [
    # the schemas of issue 27: each crashed or swelled the dev server
    ({"type": "string", "maxLength": 30000},
     f"'maxLength' at schema must be a whole number {BOUND}"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 30000},
     f"'maxItems' at schema must be a whole number {BOUND}"),
    ({"type": "string", "pattern": "^a{0,30000}$"},
     f"a repetition count in 'pattern' at schema must be a whole number {BOUND}"),
    ({"type": "string", "minLength": 20_000_000},
     f"'minLength' at schema must be a whole number {BOUND}"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 10**9},
     f"'minItems' at schema must be a whole number {BOUND}"),
    # wherever the count sits
    ({"type": "object", "properties": {"a": {"type": "string", "maxLength": 501}}},
     "'maxLength' at schema.properties.a must be"),
    ({"type": "array", "items": {"type": "string", "minLength": 501}},
     "'minLength' at schema.items must be"),
    ({"anyOf": [{"type": "string"}, {"type": "array", "items": {}, "maxItems": 501}]},
     "'maxItems' at schema.anyOf[1] must be"),
    ({"$defs": {"Code": {"type": "string", "pattern": "^[a-z]{501}$"}}, "$ref": "#/$defs/Code"},
     "a repetition count in 'pattern' at schema.$defs.Code must be"),
    # a $ref can point anywhere in the document, and the converter follows it there
    ({"x-stash": {"s": {"type": "string", "maxLength": 30000}}, "$ref": "#/x-stash/s"},
     "'maxLength' at schema.x-stash.s must be"),
    # every form of pattern count, as the converter reads them
    ({"type": "string", "pattern": "^a{501}$"}, "a repetition count in 'pattern'"),
    ({"type": "string", "pattern": "^a{501,}$"}, "a repetition count in 'pattern'"),
    ({"type": "string", "pattern": "^a{,501}$"}, "a repetition count in 'pattern'"),
    ({"type": "string", "pattern": "^(ab|c){ 2 , 9999 }$"}, "a repetition count in 'pattern'"),
    ({"type": "string", "pattern": "^[}]\\{x\\}a{1_000}$"}, "a repetition count in 'pattern'"),
    ({"type": "string", "pattern": "^a{-1}$"}, "a repetition count in 'pattern'"),
    # what is no count at all
    ({"type": "string", "maxLength": 2.5}, "'maxLength' at schema must be a whole number"),
    ({"type": "string", "maxLength": True}, "'maxLength' at schema must be a whole number"),
    ({"type": "string", "minLength": -1}, "'minLength' at schema must be a whole number"),
    ({"type": "string", "minLength": "3"}, "'minLength' at schema must be a whole number"),
    # what nothing can satisfy
    ({"type": "string", "minLength": 5, "maxLength": 3},
     "'minLength' at schema is above its 'maxLength': no answer can satisfy it"),
    ({"type": "array", "items": {}, "minItems": 2, "maxItems": 1},
     "'minItems' at schema is above its 'maxItems'"),
    ({"type": "string", "pattern": "^a{5,3}$"},
     "a repetition in 'pattern' at schema has its minimum above its maximum"),
])
def test_a_count_beyond_the_bound_is_a_400_naming_response_format_and_the_bound(
    schema: dict[str, Any], message: str
) -> None:
    # GIVEN a schema whose grammar would spell out a count the bound does not allow
    # WHEN it is turned into a grammar, strict or not, THEN it is a 400 before anything is built
    for strict in (False, True):
        err = _refused(schema, strict=strict)
        assert err.message.startswith("response_format: ")
        assert message in err.message


def test_counts_up_to_the_bound_make_a_grammar_llama_cpp_can_parse() -> None:
    # nesting = the largest count (the converter nests one optional group per character)
    grammar = grammar_for(_schema({"type": "object", "properties": {
        "code": {"type": "string", "minLength": MAX_REPEAT, "maxLength": MAX_REPEAT},
        "text": {"type": "string", "maxLength": MAX_REPEAT},
        "tags": {"type": "array", "items": {"type": "string", "pattern": f"^x{{0,{MAX_REPEAT}}}$"},
                 "minItems": 0, "maxItems": MAX_REPEAT}},
        "required": ["code", "text", "tags"], "additionalProperties": False}))
    assert MAX_REPEAT <= nesting(grammar) <= MAX_NESTING
    assert len(grammar) < MAX_GRAMMAR_CHARS


@pytest.mark.parametrize("schema", [
    {"type": "string", "enum": [{"maxLength": 10**9}]},  # data, never a schema
    {"type": "object", "properties": {"maxLength": {"type": "string"},
                                      "minItems": {"type": "integer"}}},
    {"type": "string", "pattern": "^\\{99999\\}[{]a{3}$"},  # escaped and in a class: literal
    {"type": "string", "default": "a" * 40, "examples": [{"minLength": -5}]},
])
def test_what_looks_like_a_count_but_is_not_one_is_not_refused(schema: dict[str, Any]) -> None:
    grammar = grammar_for(_schema(schema, strict=False))
    assert len(grammar) < 5000


def test_escaped_braces_stay_literal_in_the_grammar() -> None:
    grammar = grammar_for(_schema({"type": "string", "pattern": "^\\{99999\\}$"}))
    assert '"{99999}"' in grammar


def test_a_schema_needing_too_much_grammar_is_a_400_before_it_is_all_written() -> None:
    # 200 properties of up to 500 characters: ~820,000 characters of rules
    schema = {"type": "object", "properties": {
        f"p{i}": {"type": "string", "maxLength": MAX_REPEAT} for i in range(200)},
        "required": [f"p{i}" for i in range(200)], "additionalProperties": False}
    err = _refused(schema)
    assert err.message == (
        f"response_format: this schema needs over {MAX_GRAMMAR_CHARS:,} characters of grammar "
        "rules, the most the embedded model builds; use fewer properties (optional ones cost "
        "the most), enum values or smaller counts")


def test_optional_properties_cost_their_square_and_are_bounded_too() -> None:
    # The converter writes a rule per (optional property, property after it): 150 fit, 300 not.
    def optional(n: int) -> dict[str, Any]:
        return {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(n)}}

    assert "p149-kv" in grammar_for(_schema(optional(150), strict=False))
    assert "characters of grammar rules" in _refused(optional(300)).message


def test_a_grammar_nesting_deeper_than_the_bound_is_a_400() -> None:
    groups = MAX_NESTING - MAX_REPEAT + 1
    err = _refused({"type": "string",
                    "pattern": "^" + "(" * groups + f"a{{0,{MAX_REPEAT}}}" + ")" * groups + "$"})
    assert err.message == (
        f"response_format: the grammar for this schema nests {MAX_NESTING + 1} levels deep, "
        f"over the {MAX_NESTING} the embedded model allows; use smaller counts or fewer nested "
        "groups in 'pattern'")


def test_rule_names_stay_short_however_long_the_property_names() -> None:
    # A count repeats its item's rule name: a long path of long names would multiply by it.
    name = "n" * 3000
    schema = {"type": "object", "properties": {name: {"type": "object", "properties": {
        name: {"type": "array", "items": {"type": "object", "properties": {
            "x": {"type": "integer"}}}, "minItems": MAX_REPEAT}}}}}
    grammar = grammar_for(_schema(schema, strict=False))
    assert max(len(line.split(" ::= ")[0]) for line in grammar.splitlines()) <= 48
    assert len(grammar) < 40_000


def test_building_a_grammar_stops_at_the_deadline() -> None:
    with pytest.raises(StreamgateError) as info:
        grammar_for(_schema(PERSON), Deadline(time.monotonic() - 1))
    assert (info.value.status, info.value.code) == (504, "deadline_exceeded")


@pytest.mark.parametrize("schema", [
    {"type": "string", "maxLength": 30000},
    {"type": "array", "items": {"type": "integer"}, "minItems": 10**9},
    {"type": "string", "pattern": "^a{0,30000}$"},
])
def test_the_bounds_are_checked_in_time_linear_in_the_schema_not_in_its_counts(
    schema: dict[str, Any]
) -> None:
    started = time.perf_counter()
    assert beyond_bounds(schema) is not None
    assert time.perf_counter() - started < 0.05


@pytest.mark.parametrize(("pattern", "rule"), [
    ("^.{2}$", 'dot ::= [^\\x0A\\x0D"\\\\\\x7F\\x00-\\x1F]'),
    ("^[^,]+$", '[^,"\\\\\\x7F\\x00-\\x1F]+'),
])
def test_a_patterns_negated_classes_never_match_what_would_break_the_json_string(
    pattern: str, rule: str
) -> None:
    # A regex "." or [^,] matches a quote; inside the JSON string it would end the string.
    assert rule in grammar_for(_schema({"type": "string", "pattern": pattern}))
