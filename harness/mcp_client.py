"""The MCP server (`agentkeys mcp`) driven by a real MCP client, the Python
SDK (PyPI `mcp`), against a running broker and the loopback STS/S3 of
harness/single-mint-path.sh, which calls this with its settings.

Prints a transcript of each exchange; exits non-zero at the first
assertion that fails.
"""

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
import ssl
from pathlib import Path

import httpx2
from mcp import Client, StdioServerParameters
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

(daemon_bin, broker_url, admin_url, admin_token_file, ca_file, state_dir, role_arn,
 sts, scope, aws_cli, work, wallet_key, wallet_state_dir, wallet_scope, wallet_address) = sys.argv[1:]
work = Path(work)
config_file = work / "mcp-aws-config"
raw_log = work / "mcp-raw.jsonl"
broker_args = ["--broker-url", broker_url, "--ca-file", ca_file, "--sts-endpoint", sts]
agent_args = [*broker_args, "--state-dir", state_dir]
wallet_args = [*broker_args, "--state-dir", wallet_state_dir, "--wallet-key-file", wallet_key]


def show(direction, what):
    text = what if isinstance(what, str) else json.dumps(what, sort_keys=True)
    print(f"  {direction} {text[:300]}{'…' if len(text) > 300 else ''}")


def server(*extra, agent=agent_args):
    """The server over stdio; its stdout (the protocol) also copied to raw_log."""
    return StdioServerParameters(
        command="sh",
        args=["-c", '"$0" "$@" | tee -a "$RAW"', daemon_bin, "mcp", *agent, *extra],
        env={"RAW": str(raw_log), "AWS_CONFIG_FILE": str(config_file)},
    )


async def call(client, name, arguments):
    show("→ tools/call", {"name": name, "arguments": arguments})
    result = await client.call_tool(name, arguments)
    show("←", {"isError": result.is_error, "structuredContent": result.structured_content,
               "text": result.content[0].text if result.content else None})
    return result


def expect_error(result, code, *phrases):
    assert result.is_error, f"expected a tool error {code}, got {result}"
    text = result.content[0].text
    assert text.startswith(f"{code}:"), text
    for phrase in phrases:
        assert phrase in text, (phrase, text)


async def secrets_stay_out():
    """Default server: three tools, none returning a secret; aws_profile
    writes a profile; the model's bad input gets tool errors."""
    foreign = "[profile someone-elses] # keep me\nregion = eu-west-1\n\n[profile mine]\nregion = us-west-2\n"
    config_file.write_text(foreign)
    async with Client(server(), mode="legacy") as client:
        show("← initialize", {"server": client.server_info.name, "protocol": client.protocol_version,
                              "instructions": client.instructions})
        assert client.server_info.name == "agentkeys", client.server_info
        assert "No tool returns a secret" in client.instructions
        tools = (await client.list_tools()).tools
        show("← tools/list", [t.name for t in tools])
        assert sorted(t.name for t in tools) == ["aws_profile", "list_grants", "whoami"], tools
        for tool in tools:
            assert tool.description and tool.input_schema["type"] == "object", tool
        profile_tool = next(t for t in tools if t.name == "aws_profile")
        assert {"service", "scope_path", "role_arn"} <= set(profile_tool.input_schema["required"]), profile_tool

        me = (await call(client, "whoami", {})).structured_content
        assert me["broker"] == broker_url and me["omni_account"] and me["session_expires_at"] > time.time(), me
        grants = (await call(client, "list_grants", {})).structured_content["grants"]
        assert any(g["service"] == "s3" and scope.startswith(g["scope_path"]) for g in grants), grants

        args = {"service": "s3", "scope_path": scope, "role_arn": role_arn, "profile": "mcp-s3"}
        first = await call(client, "aws_profile", args)
        assert not first.is_error and first.structured_content["profile"] == "mcp-s3", first
        assert first.structured_content["config_file"] == str(config_file), first
        again = await call(client, "aws_profile", {**args, "region": "us-east-1"})
        assert not again.is_error, again
        text = config_file.read_text()
        assert text.count("[profile mcp-s3]") == 1 and text.count("credential_process") == 1, text
        assert text.startswith(foreign), text

        # The model's mistakes: tool errors it can act on, nothing written, the server keeps serving.
        expect_error(await call(client, "aws_profile", {**args, "service": "nosuch"}),
                     "grant_denied", "holds these grants: s3 ")
        expect_error(await call(client, "aws_profile", {**args, "scope_path": "bots/someone-else/"}),
                     "grant_denied", "holds these grants")
        expect_error(await call(client, "aws_profile", {**args, "scope_path": "bots/x/\n[profile evil]"}),
                     "invalid_argument", "scope_path")
        expect_error(await call(client, "aws_profile", {**args, "profile": "x]\ncredential_process = sh"}),
                     "invalid_argument", "profile")
        expect_error(await call(client, "aws_profile", {**args, "role_arn": role_arn + "\n[profile evil]"}),
                     "invalid_argument", "role_arn")
        expect_error(await call(client, "aws_profile", {**args, "region": "us-east-1]"}),
                     "invalid_argument", "region")
        expect_error(await call(client, "aws_profile", {**args, "profile": "someone-elses"}),
                     "invalid_argument", "was not written by agentkeys mcp")
        expect_error(await call(client, "aws_profile", {**args, "duration_seconds": 10**9}),
                     "invalid_argument", "duration_seconds")
        absurd = await call(client, "aws_profile", {**args, "duration_seconds": 10**30})
        assert absurd.is_error, absurd
        assert config_file.read_text() == text, "a refused call changed the config file"
        try:
            hidden = await call(client, "aws_credentials", {"service": "s3", "scope_path": scope,
                                                            "role_arn": role_arn})
        except MCPError as refused:
            show("← error", str(refused))
        else:
            assert hidden.is_error, "aws_credentials answered without --allow-inline-secrets"
        assert (await call(client, "whoami", {})).structured_content["agent"] == me["agent"]
    return me


def secrets_absent_from(raw):
    """No JWT, session token or AWS secret anywhere on the protocol stream."""
    secrets = []
    for cached in Path(state_dir).glob("*.json"):
        data = json.loads(cached.read_text())
        secrets.append(data.get("session", {}).get("session_token"))
        secrets.append(data.get("minted", {}).get("jwt"))
    secrets = [s for s in secrets if s]
    assert secrets, "no cached session or JWT to look for"
    for secret in secrets:
        assert secret not in raw, "a session token or JWT reached the model's context"
    for marker in ["eyJ", "SecretAccessKey", "SessionToken", "session_token"]:
        assert marker not in raw, f"{marker} on the protocol stream"
    print(f"  {len(raw.splitlines())} protocol lines, {len(secrets)} known secrets: none on the stream")


def aws_through_the_profile(profile, scope, session_name):
    """A real AWS CLI with only AWS_PROFILE: no AWS key, and AGENTKEYS_*
    variables that would send the JWT elsewhere, which the profile ignores."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTKEYS_", "AWS_"))}
    env.update(AWS_CONFIG_FILE=str(config_file), AWS_SHARED_CREDENTIALS_FILE=str(work / "none"),
               AWS_PROFILE=profile, AGENTKEYS_STS_ENDPOINT="http://127.0.0.1:9",
               AGENTKEYS_BROKER_URL="http://127.0.0.1:9", AGENTKEYS_KEY_FILE=str(work / "no-such-key"),
               AGENTKEYS_ISSUER="https://evil.example", AGENTKEYS_WALLET_KEY_FILE=str(work / "owner.key"))
    aws = lambda *args: subprocess.run([aws_cli, "--endpoint-url", sts, *args], env=env,
                                       check=True, capture_output=True, text=True).stdout
    identity = json.loads(aws("sts", "get-caller-identity"))
    show(f"$ AWS_PROFILE={profile} aws sts get-caller-identity →", identity["Arn"])
    assert f"assumed-role/agentkeys-demo/{session_name}" in identity["Arn"], identity
    body = work / "mcp-hello.txt"
    body.write_text("written by an AI agent through agentkeys mcp\n")
    aws("s3", "cp", str(body), f"s3://agentkeys-demo/{scope}hello.txt")
    back = aws("s3", "cp", f"s3://agentkeys-demo/{scope}hello.txt", "-")
    show(f"$ AWS_PROFILE={profile} aws s3 cp s3://agentkeys-demo/{scope}hello.txt - →", back.strip())
    assert back == body.read_text(), back


async def wallet_agent():
    """The same for a wallet agent (SIWE), its profile beside the first; a
    keystore passphrase from a variable is refused (the profile would run
    where it is not set)."""
    refused = subprocess.run([daemon_bin, "mcp", *wallet_args, "--keystore-passphrase-env", "PASS"],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert refused.returncode != 0 and "--keystore-passphrase-file" in refused.stderr, refused
    async with Client(server(agent=wallet_args), mode="legacy") as client:
        me = (await call(client, "whoami", {})).structured_content
        assert me["identity"] == wallet_address and me["role"] == "agent", me
        grants = (await call(client, "list_grants", {})).structured_content["grants"]
        assert [g["scope_path"] for g in grants] == [wallet_scope.removesuffix("mcp/")], grants
        made = await call(client, "aws_profile", {"service": "s3", "scope_path": wallet_scope,
                                                  "role_arn": role_arn, "profile": "mcp-wallet"})
        assert not made.is_error, made
    text = config_file.read_text()
    assert "[profile mcp-s3]" in text and "--wallet-key-file" in text, text


def audit_names_the_calls():
    """The mints the MCP server made carry its call ids in the audit ledger."""
    tls = ssl.create_default_context(cafile=ca_file)
    request = urllib.request.Request(f"{admin_url}/v1/admin/audit?limit=1000", headers={
        "Authorization": f"Bearer {Path(admin_token_file).read_text().strip()}"})
    records = json.load(urllib.request.urlopen(request, context=tls))["records"]
    ids = [r["client_request_id"] for r in records if "client_request_id" in r]
    show("audit client_request_id", ids)
    calls = [i for i in ids if re.fullmatch(r"mcp-[0-9a-f]{8}-\d+", i)]
    # The first aws_profile and the two refused intents (the second
    # aws_profile was answered from the JWT cache).
    assert len(calls) == 3 and len({i.rsplit("-", 1)[0] for i in calls}) == 1, ids


async def inline_secrets():
    """With --allow-inline-secrets: five tools; credentials and a JWT inline."""
    async with Client(server("--allow-inline-secrets"), mode="legacy") as client:
        names = sorted(t.name for t in (await client.list_tools()).tools)
        show("← tools/list", names)
        assert names == ["aws_credentials", "aws_profile", "list_grants", "mint_oidc_jwt", "whoami"], names
        description = next(t for t in (await client.list_tools()).tools if t.name == "aws_credentials").description
        assert description.startswith("SENSITIVE"), description
        creds = await client.call_tool("aws_credentials", {"service": "s3", "scope_path": scope, "role_arn": role_arn})
        assert not creds.is_error and creds.structured_content["AccessKeyId"], creds
        show("← aws_credentials", {k: (v[:4] + "…") for k, v in creds.structured_content.items() if isinstance(v, str)})
        minted = await client.call_tool("mint_oidc_jwt", {"service": "s3", "scope_path": scope, "ttl_seconds": 120})
        assert not minted.is_error and minted.structured_content["jwt"].startswith("eyJ"), minted
        show("← mint_oidc_jwt", {"jti": minted.structured_content["jti"]})
        expect_error(await client.call_tool("mint_oidc_jwt", {"service": "s3", "scope_path": scope,
                                                               "ttl_seconds": 10**6}),
                     "invalid_argument", "ttl_seconds")


async def loopback_http():
    """--http: loopback only; a bearer token, a loopback Host and an allowed
    Origin, else refused."""
    wide = subprocess.run([daemon_bin, "mcp", *agent_args, "--http", "0.0.0.0:0"],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    assert wide.returncode != 0 and "127.0.0.1 or [::1] only" in wide.stderr, wide
    port = int(subprocess.check_output([sys.executable, "-c",
        "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"]))
    token_file = work / "mcp.token"
    process = subprocess.Popen([daemon_bin, "mcp", *agent_args, "--http", f"127.0.0.1:{port}",
                                "--http-token-file", str(token_file)],
                               stderr=open(work / "mcp-http.log", "w"))
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        for _ in range(100):
            if token_file.exists():
                try:
                    httpx2.get(url)
                    break
                except httpx2.TransportError:
                    pass
            time.sleep(0.1)
        assert token_file.stat().st_mode & 0o077 == 0, "the token file is readable by others"
        token = token_file.read_text().strip()
        hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "probe", "version": "0"}}}
        accept = {"Accept": "application/json, text/event-stream"}
        status = lambda **headers: httpx2.post(url, json=hello, headers={**accept, **headers}).status_code
        assert status() == 401, "no token"
        assert httpx2.get(url).status_code == 401 and httpx2.delete(url).status_code == 401, "GET, DELETE"
        assert status(Authorization=f"Bearer {token}", Host="evil.example") == 403, "a foreign Host"
        assert status(Authorization=f"bearer {token}") == 200, "the scheme in any case"
        assert status(Authorization="Bearer " + "0" * 64) == 401, "a wrong token"
        assert status(Authorization=f"Bearer {token}", Origin="https://evil.example") == 403, "a foreign Origin"
        assert status(Authorization=f"Bearer {token}", Origin=f"http://127.0.0.1:{port}") == 200, "its own Origin"
        print("  no token (POST, GET, DELETE) → 401, wrong token → 401, foreign Host → 403, foreign Origin → 403, own Origin → 200")
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
        from mcp.client.streamable_http import streamable_http_client
        async with Client(streamable_http_client(url, http_client=http), mode="legacy") as client:
            me = (await client.call_tool("whoami", {})).structured_content
            show("← whoami over http", me["agent"])
            assert me["broker"] == broker_url, me
    finally:
        process.terminate()
        process.wait(timeout=10)


async def main():
    if raw_log.exists():
        raw_log.unlink()
    print("stdio, inline secrets off:")
    me = await secrets_stay_out()
    secrets_absent_from(raw_log.read_text())
    print("the profile aws_profile wrote, used by the AWS CLI:")
    aws_through_the_profile("mcp-s3", scope, f"agentkeys-{me['omni_account'][:16]}")
    audit_names_the_calls()
    print("a wallet agent:")
    await wallet_agent()
    aws_through_the_profile("mcp-wallet", wallet_scope, f"agentkeys-{wallet_address}-")
    print("stdio, --allow-inline-secrets:")
    await inline_secrets()
    print("streamable HTTP on loopback:")
    await loopback_http()


asyncio.run(main())
