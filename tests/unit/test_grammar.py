"""response_format → grammar for the embedded model, without the model: which schemas the
converter enforces in full, which strict schemas are refused, and the grammar text itself."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel, Field

from streamgate.errors import StreamgateError
from streamgate.providers.grammar import JSON_OBJECT_GRAMMAR, grammar_for, unenforced
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
