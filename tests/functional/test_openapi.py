"""openapi.yaml, the API document we ship, against the real dev server: schemathesis generates
valid and invalid requests from it and checks every answer (never a 5xx, only documented
statuses, content types, headers and bodies, invalid data refused). A second test keeps the
document's routes equal to the handler's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from streamgate.handler import _ROUTES
from streamgate.keystore import load_template
from tests.conftest import running_dev_server
from tests.helpers import ScriptedProvider, make_app

DOCUMENT = Path(__file__).resolve().parents[2] / "openapi.yaml"
SCHEMA = schemathesis.openapi.from_path(DOCUMENT)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = make_app(ScriptedProvider(models=["scripted-1", "gemma-3-270m"]), metrics=False)
    with running_dev_server(app, max_streams=64) as url:
        yield url


@SCHEMA.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_service_conforms_to_its_openapi_document(case: schemathesis.Case,
                                                      base_url: str) -> None:
    case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=30)


def test_the_document_lists_exactly_the_handlers_routes() -> None:
    paths = load_template(DOCUMENT)["paths"]
    assert {path: method.upper() for path, ops in paths.items() for method in ops} == _ROUTES


def test_the_documented_request_bounds_are_the_enforced_ones() -> None:
    """Every bound, enum and type the document states for a request field is exactly where the
    service draws the line: the edge is accepted, one step past it is a 400 naming the field."""
    import json

    from streamgate.validation import (
        CAP_IMAGES,
        CAP_PENALTIES,
        CAP_SEED,
        CAP_SEQUENTIAL_TOOLS,
        CAP_TOOLS,
    )
    from tests.helpers import body_bytes, chat_event

    everything = frozenset({CAP_PENALTIES, CAP_SEED, CAP_TOOLS, CAP_IMAGES,
                            CAP_SEQUENTIAL_TOOLS})
    app = make_app(ScriptedProvider(capabilities=everything), metrics=False)
    base: dict[str, object] = {"messages": [{"role": "user", "content": "hi"}]}

    def status(body: dict[str, object]) -> tuple[int, object]:
        response = app.handle(chat_event(body, headers={"accept": "application/json"}))
        doc = json.loads(body_bytes(response))
        response.close()
        return response.status, doc.get("error", {}).get("param")

    properties = load_template(DOCUMENT)["components"]["schemas"]["ChatRequest"]["properties"]
    checked = set()
    for name, prop in properties.items():
        if name == "messages":  # the base of every probe; prompt is probed below
            continue
        types = prop.get("type", [])
        types = [types] if isinstance(types, str) else types
        if "null" in types or None in prop.get("enum", [None]):
            assert status({**base, name: None})[0] == 200, name
        step = 1 if "integer" in types else 0.001
        if "minimum" in prop:
            assert status({**base, name: prop["minimum"]})[0] == 200, name
            assert status({**base, name: prop["minimum"] - step}) == (400, name)
            checked.add(name)
        if "maximum" in prop:
            assert status({**base, name: prop["maximum"]})[0] == 200, name
            assert status({**base, name: prop["maximum"] + step}) == (400, name)
        for value in prop.get("enum", []):
            assert status({**base, name: value})[0] == 200, (name, value)
        if "enum" in prop:
            assert status({**base, name: "not-an-option"}) == (400, name)
            checked.add(name)
        if types and "string" not in types and "object" not in types:
            assert status({**base, name: "text"}) == (400, name), name  # wrong type
            checked.add(name)
    prompt = properties["prompt"]
    assert status({"prompt": "x" * prompt["maxLength"]})[0] == 200
    assert status({"prompt": "x" * (prompt["maxLength"] + 1)}) == (400, "prompt")
    assert {"temperature", "top_p", "max_tokens", "max_completion_tokens", "n", "seed",
            "frequency_penalty", "presence_penalty", "stream", "logprobs"} <= checked
