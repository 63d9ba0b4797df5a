"""The Lambda Managed Instances variant of the template (tools/lmi_template.py), through the
SAM translator CloudFormation runs on deploy (aws-sam-cli's virtualenv). The variant serving
overlapping streams from one container is tests/integration/test_sam_local.py's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tools import lmi_template

pytestmark = pytest.mark.sam

ROOT = Path(__file__).resolve().parents[2]
SAM_PYTHON = ROOT / ".venv-sam" / "bin" / "python"

# What CloudFormation's AWS::Serverless transform does with a template (local code: a stand-in
# S3 location, as `sam deploy` uploads it).
TRANSFORM = """
import json, sys
from samtranslator.translator.transform import transform
from samtranslator.yaml_helper import yaml_parse

class Policies:
    def load(self):
        return {}

template = yaml_parse(open(sys.argv[1]).read())
template["Resources"]["StreamgateFunction"]["Properties"]["CodeUri"] = "s3://bucket/code.zip"
try:
    print(json.dumps(transform(template, {}, Policies())))
except Exception as e:
    print(json.dumps({"error": str(e)}))
"""


def _transform(template: Path) -> dict[str, Any]:
    if not SAM_PYTHON.exists():
        pytest.skip("aws-sam-cli's virtualenv (.venv-sam) is missing: run `make test`")
    out = subprocess.run([str(SAM_PYTHON), "-c", TRANSFORM, str(template)], capture_output=True,
                         text=True, timeout=120, env={"AWS_DEFAULT_REGION": "us-east-1"})
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    assert "error" not in doc, doc["error"]
    return doc


def test_the_lmi_variant_attaches_the_function_to_its_capacity_provider(tmp_path: Path) -> None:
    # GIVEN the variant derived from template.yaml
    out = tmp_path / "template-lmi.yaml"
    assert lmi_template.main(["--out", str(out)]) == 0
    # WHEN CloudFormation's SAM transform runs on it
    resources = _transform(out)["Resources"]
    # THEN the function runs on the capacity provider, MaxConcurrency streams per environment
    # (what Lambda passes to the runtime as AWS_LAMBDA_MAX_CONCURRENCY), with LMI's memory
    function = resources["StreamgateFunction"]["Properties"]
    assert function["CapacityProviderConfig"] == {"LambdaManagedInstancesCapacityProviderConfig": {
        "CapacityProviderArn": {"Fn::GetAtt": ["CapacityProvider", "Arn"]},
        "PerExecutionEnvironmentMaxConcurrency": {"Ref": "MaxConcurrency"},
        "ExecutionEnvironmentMemoryGiBPerVCpu": 2}}
    assert function["MemorySize"] == {"Ref": "ManagedInstancesMemorySize"}
    # AND the capacity provider runs in the given subnets, on the function's architecture
    provider = resources["CapacityProvider"]
    assert provider["Type"] == "AWS::Lambda::CapacityProvider"
    assert provider["Properties"]["VpcConfig"]["SubnetIds"] == {"Ref": "CapacityProviderSubnetIds"}
    assert provider["Properties"]["InstanceRequirements"]["Architectures"] == [
        {"Ref": "Architecture"}]
    # AND everything else is the classic template's: the streaming URL, the REST routes
    assert resources["StreamgateFunctionUrl"]["Properties"]["InvokeMode"] == "RESPONSE_STREAM"
    classic = _transform(ROOT / "template.yaml")["Resources"]
    assert set(resources) - set(classic) == {"CapacityProvider", "CapacityProviderOperatorRole"}
    assert "CapacityProviderConfig" not in classic["StreamgateFunction"]["Properties"]


def test_the_lmi_variant_has_a_rule_refusing_a_deploy_without_subnets(tmp_path: Path) -> None:
    out = tmp_path / "template-lmi.yaml"
    lmi_template.main(["--out", str(out)])
    doc = _transform(out)
    [assertion] = doc["Rules"]["ManagedInstancesNeedSubnets"]["Assertions"]
    assert assertion["Assert"] == {"Fn::Not": [{"Fn::Equals": [
        {"Fn::Join": ["", {"Ref": "CapacityProviderSubnetIds"}]}, ""]}]}
    assert doc["Parameters"]["CapacityProviderSubnetIds"]["Default"] == ""


def test_deriving_twice_is_refused() -> None:
    once = lmi_template.derive(lmi_template.load_template(ROOT / "template.yaml"))
    with pytest.raises(ValueError, match="already has a CapacityProviderConfig"):
        lmi_template.derive(once)
