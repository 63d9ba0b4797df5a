"""The stored responses in template.yaml: a switch that really switches (with ResponsesStore=off
no table, no grant, no table name), and values that agree with the store's code. What the
grant allows is checked against the calls the store makes in test_lambda_peers.py
(``test_iam_grants_exactly_what_the_provider_calls``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from streamgate.config import RESPONSE_STORES, load_settings
from streamgate.keystore import load_template
from streamgate.responsestore_dynamodb import TTL_ATTRIBUTE

ROOT = Path(__file__).resolve().parents[2]


def _template() -> dict[str, Any]:
    return load_template(ROOT / "template.yaml")


def test_storing_responses_is_a_switch_defaulting_to_the_table() -> None:
    template = _template()
    parameter = template["Parameters"]["ResponsesStore"]
    assert (parameter["Default"], parameter["AllowedValues"]) == ("dynamodb", ["dynamodb", "off"])
    assert set(parameter["AllowedValues"]) <= set(RESPONSE_STORES)
    assert template["Conditions"]["StoresResponses"] == {
        "Fn::Equals": [{"Ref": "ResponsesStore"}, "dynamodb"]}
    env = template["Resources"]["StreamgateFunction"]["Properties"]["Environment"]["Variables"]
    assert env["STREAMGATE_RESPONSES_STORE"] == {"Ref": "ResponsesStore"}


def test_with_storage_off_nothing_names_the_table() -> None:
    # GIVEN the template
    template = _template()
    # THEN the table, its output, its grant and the variable naming it exist only while
    # StoresResponses holds, and nothing else refers to the table
    assert template["Resources"]["ResponsesTable"]["Condition"] == "StoresResponses"
    assert template["Outputs"]["ResponsesTableName"]["Condition"] == "StoresResponses"
    function = template["Resources"]["StreamgateFunction"]["Properties"]
    grants = [p for p in function["Policies"] if "ResponsesTable" in json.dumps(p)]
    assert [g["Fn::If"][0] for g in grants] == ["StoresResponses"]
    assert grants[0]["Fn::If"][2] == {"Ref": "AWS::NoValue"}
    assert function["Environment"]["Variables"]["STREAMGATE_RESPONSES_TABLE"] == {
        "Fn::If": ["StoresResponses", {"Ref": "ResponsesTable"}, ""]}
    others = {name: r for name, r in template["Resources"].items()
              if name not in ("ResponsesTable", "StreamgateFunction")}
    assert "ResponsesTable" not in json.dumps(others)
    rest = {k: v for k, v in function.items() if k not in ("Policies", "Environment")}
    assert "ResponsesTable" not in json.dumps(rest)


def test_the_table_expires_items_by_the_stores_attribute_after_the_settings_ttl() -> None:
    template = _template()
    table = template["Resources"]["ResponsesTable"]
    assert table["Properties"]["TimeToLiveSpecification"] == {
        "AttributeName": TTL_ATTRIBUTE, "Enabled": True}
    ttl = template["Parameters"]["ResponsesTtlSeconds"]
    assert float(ttl["Default"]) == load_settings({}).responses_ttl_s == 30 * 86_400
    env = template["Resources"]["StreamgateFunction"]["Properties"]["Environment"]["Variables"]
    assert env["STREAMGATE_RESPONSES_TTL_S"] == {"Ref": "ResponsesTtlSeconds"}
    # Stored text is not kept past the stack, nor past turning storage off (docs/deploying.md).
    assert (table["DeletionPolicy"], table["UpdateReplacePolicy"]) == ("Delete", "Delete")
