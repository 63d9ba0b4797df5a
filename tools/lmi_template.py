"""The Lambda Managed Instances (LMI) variant of a template: template.yaml plus a capacity
provider, the function attached to it, and the memory an execution environment with many
concurrent streams gets.

    python -m tools.lmi_template                     # template.yaml -> template-lmi.yaml
    python -m tools.lmi_template --template .aws-sam/build/template.yaml --out X.yaml

Why a derived template and not a parameter of template.yaml: SAM 1.170 validates a function's
``CapacityProviderConfig`` before CloudFormation resolves conditions, so it rejects
``CapacityProviderConfig: !If [...]`` ("Arn field required; Fn::If extra fields not permitted",
also through Globals), and an ``Arn: !If [..., !Ref AWS::NoValue]`` leaves the classic function
with an empty ``LambdaManagedInstancesCapacityProviderConfig`` that CloudFormation refuses. The
attachment cannot be switched off by a parameter, so the LMI mode is this derivation of the one
template (never a second copy to keep in step): everything else, samconfig.toml's parameters
included, stays as it is. The derived file is written beside its source (SAM finds
samconfig.toml beside the template, and CodeUri stays relative to it) and is not committed.

What it adds (parameters in brackets):
- ``CapacityProvider`` (AWS::Serverless::CapacityProvider): instances in your VPC's subnets
  [CapacityProviderSubnetIds, CapacityProviderSecurityGroupIds], the function's architecture.
- The function's ``CapacityProviderConfig``: up to [MaxConcurrency] concurrent requests per
  execution environment (Lambda sets AWS_LAMBDA_MAX_CONCURRENCY to it; the runtime loop runs
  that many workers in one process, streamgate/runtime.py) and 2 GiB per vCPU.
- ``MemorySize`` from [ManagedInstancesMemorySize] (LMI's minimum is 2048 MB; bench/bench_lmi.py
  measures well under 3 MiB per concurrent stream, so 2 GiB holds hundreds of streams).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "functions" / "streamgate"))

from streamgate.keystore import load_template  # noqa: E402  (the loader keys init uses)

FUNCTION = "StreamgateFunction"

PARAMETERS: dict[str, Any] = {
    "MaxConcurrency": {
        # Lambda allows 1,600; each stream holds two sockets (the Runtime API's and the
        # model's) and Lambda environments have 1,024 file descriptors.
        "Type": "Number", "Default": 32, "MinValue": 1, "MaxValue": 400,
        "Description": "Lambda Managed Instances: concurrent requests (streams) per execution "
                       "environment, served by that many threads of one process (at most "
                       "400: two sockets a stream within 1,024 file descriptors).",
    },
    "ManagedInstancesMemorySize": {
        "Type": "Number", "Default": 2048, "MinValue": 2048, "MaxValue": 32768,
        "Description": "Memory in MB of one execution environment, shared by its "
                       "MaxConcurrency streams (LMI's minimum is 2048).",
    },
    "CapacityProviderSubnetIds": {
        "Type": "CommaDelimitedList", "Default": "",
        "Description": "Subnets the capacity provider's instances run in (required to deploy; "
                       "they need a route to Bedrock or the upstream, e.g. a NAT or endpoints).",
    },
    "CapacityProviderSecurityGroupIds": {
        "Type": "CommaDelimitedList", "Default": "",
        "Description": "Security groups of the instances (empty: the VPC's default).",
    },
}


def derive(template: dict[str, Any]) -> dict[str, Any]:
    """``template`` with the LMI resources and properties added (a new dict)."""
    out = yaml.safe_load(yaml.safe_dump(template))  # a deep copy made of plain data
    function = out["Resources"][FUNCTION]["Properties"]
    if "CapacityProviderConfig" in function:
        raise ValueError(f"{FUNCTION} already has a CapacityProviderConfig")
    out["Description"] = (str(out.get("Description", "")).rstrip()
                          + " Lambda Managed Instances variant (tools/lmi_template.py).")
    out["Parameters"].update(PARAMETERS)
    out.setdefault("Rules", {})["ManagedInstancesNeedSubnets"] = {
        "Assertions": [{
            "Assert": {"Fn::Not": [{"Fn::Equals": [
                {"Fn::Join": ["", {"Ref": "CapacityProviderSubnetIds"}]}, ""]}]},
            "AssertDescription": "Lambda Managed Instances run in your VPC: set "
                                 "CapacityProviderSubnetIds.",
        }],
    }
    out.setdefault("Conditions", {})["HasCapacityProviderSecurityGroups"] = {"Fn::Not": [
        {"Fn::Equals": [{"Fn::Join": ["", {"Ref": "CapacityProviderSecurityGroupIds"}]}, ""]}]}
    out["Resources"]["CapacityProvider"] = {
        "Type": "AWS::Serverless::CapacityProvider",
        "Properties": {
            "VpcConfig": {
                "SubnetIds": {"Ref": "CapacityProviderSubnetIds"},
                "SecurityGroupIds": {"Fn::If": ["HasCapacityProviderSecurityGroups",
                                                {"Ref": "CapacityProviderSecurityGroupIds"},
                                                {"Ref": "AWS::NoValue"}]},
            },
            "InstanceRequirements": {"Architectures": [{"Ref": "Architecture"}]},
        },
    }
    function["CapacityProviderConfig"] = {
        "Arn": {"Fn::GetAtt": ["CapacityProvider", "Arn"]},
        "PerExecutionEnvironmentMaxConcurrency": {"Ref": "MaxConcurrency"},
        "ExecutionEnvironmentMemoryGiBPerVCpu": 2,
    }
    function["MemorySize"] = {"Ref": "ManagedInstancesMemorySize"}
    out.setdefault("Outputs", {})["CapacityProviderArn"] = {
        "Value": {"Fn::GetAtt": ["CapacityProvider", "Arn"]}}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--template", type=Path, default=ROOT / "template.yaml")
    parser.add_argument("--out", type=Path, help="default: template-lmi.yaml beside --template")
    args = parser.parse_args(argv)
    out = args.out or args.template.with_name("template-lmi.yaml")
    derived = derive(load_template(args.template))
    out.write_text("# Generated by tools/lmi_template.py from "
                   f"{args.template.name}: edit that, not this.\n"
                   + yaml.safe_dump(derived, sort_keys=False, width=100))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
