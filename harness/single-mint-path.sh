#!/usr/bin/env bash
# The whole single mint path on this machine, with real processes only:
#   daemon (agentkeys) → broker JWT (agentkeys-broker, https) → STS → S3,
# for a device-key agent and for a wallet agent (Sign-In with Ethereum,
# linked and granted by an owner wallet, minting bearer-only),
# the broker serving https with a certificate of a CA made here (openssl),
# its admin API and metrics on a separate admin listener,
# the STS and S3 APIs served on loopback by moto_server (PyPI moto[server]),
# the AWS CLI (PyPI awscli) using the credential_process profile, and an AI
# agent's path: `agentkeys mcp` driven by the Python MCP SDK (PyPI mcp),
# whose aws_profile tool writes the profile the AWS CLI then uses. The JWT is
# first verified against the broker's JWKS with an independent JOSE library
# (PyPI PyJWT), since moto accepts any well-formed web identity token.
# Installs its Python tools into .ci/tools/venv (or $AGENTKEYS_TOOLS/venv),
# prints each step's result, stops everything it started, and exits 0 only
# if every step passed.
set -euo pipefail
cd "$(dirname "$0")/.."

source harness/lib.sh

with_scratch

tools=${AGENTKEYS_TOOLS:-$PWD/.ci/tools}
venv="$tools/venv"
step "python tools: moto[server], the AWS CLI, PyJWT, siwe and the MCP SDK"
if [ ! -x "$venv/bin/moto_server" ] || [ ! -x "$venv/bin/aws" ] || ! "$venv/bin/python" -c 'import jwt, siwe, mcp' 2>/dev/null; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # siwe 4.4 breaks on abnf 2.3's grammar rule, hence the pin.
  "$venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]" awscli "pyjwt[crypto]" "siwe==4.4.0" "abnf==2.2.0" "mcp==2.3.0"
fi
ok "$("$venv/bin/aws" --version 2>&1 | cut -d' ' -f1), moto $("$venv/bin/python" -c 'import moto; print(moto.__version__)'), PyJWT $("$venv/bin/python" -c 'import jwt; print(jwt.__version__)'), siwe 4.4.0, mcp $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("mcp"))')"

step "build the workspace"
build_binaries
ok "agentkeys-broker and agentkeys built"

step "a CA and the broker's certificate (openssl)"
tls="$work/tls"
make_tls "$tls"
ok "CA $(openssl x509 -in "$tls/ca.pem" -noout -subject), certificate for localhost and 127.0.0.1"
ca="$tls/ca.pem"

step "start the broker on a fresh data directory: https, admin listener apart"
broker_port=$(free_port)
admin_port=$(free_port)
broker_url="https://localhost:$broker_port"
admin_url="https://localhost:$admin_port"
AGENTKEYS__SERVER__BIND="127.0.0.1:$broker_port" \
AGENTKEYS__SERVER__TLS__CERT_FILE="$tls/fullchain.pem" \
AGENTKEYS__SERVER__TLS__KEY_FILE="$tls/privkey.pem" \
AGENTKEYS__SERVER__ADMIN_BIND="127.0.0.1:$admin_port" \
AGENTKEYS__SERVER__ADMIN_TLS__CERT_FILE="$tls/fullchain.pem" \
AGENTKEYS__SERVER__ADMIN_TLS__KEY_FILE="$tls/privkey.pem" \
AGENTKEYS__STORAGE__DATA_DIR="$work/data" \
AGENTKEYS__SECRETS__SEALING_KEY_FILE="$work/sealing.key" \
AGENTKEYS__OIDC__ISSUER="$broker_url" \
  "$broker_bin" serve --config config/default.toml >"$work/broker.log" 2>&1 &
pids+=($!)
wait_for "$broker_url/readyz"
wait_for "$admin_url/readyz"
ok "broker ready at $broker_url, admin listener at $admin_url"
curl_tls() { curl -s --cacert "$tls/ca.pem" "$@"; }
status=$(curl_tls -o /dev/null -w '%{http_code}' "$broker_url/metrics")
[ "$status" = 404 ] || fail "/metrics on the public listener answered $status"
status=$(curl_tls -o /dev/null -w '%{http_code}' "$admin_url/metrics")
[ "$status" = 200 ] || fail "/metrics on the admin listener answered $status"
ok "/metrics: 404 on the public listener, 200 on the admin listener"

step "the legacy server-side route does not exist"
status=$(curl_tls -o /dev/null -w '%{http_code}' -X POST "$broker_url/v1/mint-aws-creds" -H 'Content-Type: application/json' -d '{}')
[ "$status" = 404 ] || fail "POST /v1/mint-aws-creds answered $status"
ok "POST /v1/mint-aws-creds → 404"

step "device key, registration, grant"
export AGENTKEYS_BROKER_URL="$broker_url" AGENTKEYS_ADMIN_URL="$admin_url" AGENTKEYS_CA_FILE="$tls/ca.pem"
export AGENTKEYS_STATE_DIR="$work/daemon" AGENTKEYS_ADMIN_TOKEN_FILE="$work/data/admin.token"
public_key=$("$daemon_bin" keygen | json '["public_key"]')
"$broker_bin" agent add demo-daemon --public-key "$public_key" >/dev/null
omni=$("$daemon_bin" login | json '["omni_account"]')
scope="bots/$omni/credentials/"
grant_id=$("$broker_bin" grant add --agent demo-daemon --service s3 --scope "bots/$omni/" --max-uses 100 | json '["id"]')
ok "agent demo-daemon ($omni), grant $grant_id for s3 bots/$omni/"

step "agentkeys mint"
"$daemon_bin" mint --service s3 --scope "$scope" >"$work/mint.json"
[ "$(json '["grant_id"]' <"$work/mint.json")" = "$grant_id" ] || fail "the JWT is not under the grant"
ok "JWT $(json '["jti"]' <"$work/mint.json") expires at $(json '["expiration"]' <"$work/mint.json")"
status=$(curl_tls -o /dev/null -w '%{http_code}' "$broker_url/v1/mint-oidc-jwt" -X POST \
  -H "Authorization: Bearer $(python3 -c 'import json; print(json.load(open("'"$work/daemon/session.json"'"))["session"]["session_token"])')" \
  -H 'Content-Type: application/json' -d "{\"service\": \"s3\", \"scope_path\": \"bots/someone-else/\"}")
[ "$status" = 403 ] || fail "a scope outside the grant answered $status"
ok "a scope outside the grant → 403"

step "the JWT against the broker's JWKS, checked with PyJWT (not the broker's code)"
"$venv/bin/python" - "$broker_url" "$work/mint.json" "$omni" "$scope" "$grant_id" "$tls/ca.pem" <<'PY' || fail "the JWT does not verify against the JWKS as STS would check it"
import json, ssl, sys, urllib.request
import jwt

issuer, minted, omni, scope, grant, ca_file = sys.argv[1:]
tls = ssl.create_default_context(cafile=ca_file)
fetch = lambda url: json.load(urllib.request.urlopen(url, context=tls))
token = json.load(open(minted))["jwt"]
config = fetch(issuer + "/.well-known/openid-configuration")
assert config["issuer"] == issuer, config
assert "ES256" in config["id_token_signing_alg_values_supported"], config
header = jwt.get_unverified_header(token)
assert header["alg"] == "ES256" and header["typ"] == "JWT" and header["kid"], header
key = jwt.PyJWKSet.from_dict(fetch(config["jwks_uri"]))[header["kid"]]
claims = jwt.decode(
    token, key.key, algorithms=["ES256"], audience="sts.amazonaws.com", issuer=issuer,
    options={"require": ["exp", "iat", "nbf", "sub", "jti", "iss", "aud"]},
)
assert claims["sub"] == f"agentkeys:agent:{omni}", claims["sub"]
assert claims["agentkeys_grant_id"] == grant, claims
tags = claims["https://aws.amazon.com/tags"]
assert tags["principal_tags"]["agentkeys_actor_omni"] == [omni], tags
assert tags["principal_tags"]["agentkeys_service"] == ["s3"], tags
assert tags["principal_tags"]["agentkeys_scope_path"] == [scope], tags
assert sorted(tags["transitive_tag_keys"]) == sorted(tags["principal_tags"]), tags
assert claims["exp"] - claims["iat"] <= 600, claims
head, payload, signature = token.split(".")
forged = f"{head}.{payload}.{signature[:-4]}{'AAAA' if signature[-4:] != 'AAAA' else 'BBBB'}"
try:
    jwt.decode(forged, key.key, algorithms=["ES256"], audience="sts.amazonaws.com", issuer=issuer)
except jwt.InvalidSignatureError:
    pass
else:
    raise AssertionError("a token with an altered signature verified")
print(f"kid {header['kid']}, sub {claims['sub']}, scope tag {scope}")
PY
ok "signature, iss, aud, sub, grant and session tags verify against $broker_url/.well-known/jwks.json; an altered signature does not"

step "start moto_server: STS and S3 on loopback"
moto_port=$(free_port)
moto="http://127.0.0.1:$moto_port"
"$venv/bin/moto_server" -H 127.0.0.1 -p "$moto_port" >"$work/moto.log" 2>&1 &
pids+=($!)
wait_for "$moto/moto-api/"
ok "moto at $moto"

step "operator: the OIDC provider's thumbprint, as the runbook takes it"
# The SHA-1 of the last certificate the issuer's host serves (the top CA
# of its chain): docs/runbook.md, "An OIDC provider in IAM".
openssl s_client -connect "127.0.0.1:$broker_port" -servername localhost -showcerts </dev/null 2>/dev/null \
  | awk '/BEGIN CERTIFICATE/{pem=""} {pem=pem $0 "\n"} /END CERTIFICATE/{last=pem} END{printf "%s", last}' >"$work/top.pem"
thumbprint=$(openssl x509 -in "$work/top.pem" -noout -fingerprint -sha1 | cut -d= -f2 | tr -d : | tr 'A-F' 'a-f')
expected=$(openssl x509 -in "$tls/ca.pem" -noout -fingerprint -sha1 | cut -d= -f2 | tr -d : | tr 'A-F' 'a-f')
[ "$thumbprint" = "$expected" ] || fail "thumbprint $thumbprint is not the CA's $expected"
ok "thumbprint $thumbprint (the CA that signed the broker's certificate)"

step "operator: IAM OIDC provider for the broker's issuer, and the role"
cat >"$work/trust.json" <<JSON
{"Version": "2012-10-17", "Statement": [{"Effect": "Allow",
  "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/localhost:$broker_port"},
  "Action": ["sts:AssumeRoleWithWebIdentity", "sts:TagSession"],
  "Condition": {"StringEquals": {"localhost:$broker_port:aud": "sts.amazonaws.com"},
                "StringLike": {"localhost:$broker_port:sub": "agentkeys:agent:*"}}}]}
JSON
operator() { AWS_ACCESS_KEY_ID=operator AWS_SECRET_ACCESS_KEY=operator AWS_DEFAULT_REGION=us-east-1 "$venv/bin/aws" --endpoint-url "$moto" "$@"; }
operator iam create-open-id-connect-provider --url "$broker_url" --client-id-list sts.amazonaws.com \
  --thumbprint-list "$thumbprint" >/dev/null
role_arn=$(operator iam create-role --role-name agentkeys-demo --assume-role-policy-document "file://$work/trust.json" | json '["Role"]["Arn"]')
ok "role $role_arn, its trust policy naming the broker's issuer (moto does not enforce trust policies: the JWT was checked against the JWKS above)"

step "agentkeys aws-credentials: AssumeRoleWithWebIdentity client-side, no AWS credentials"
no_aws=(env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN -u AWS_PROFILE)
"${no_aws[@]}" "$daemon_bin" aws-credentials --role-arn "$role_arn" --service s3 --scope "$scope" \
  --sts-endpoint "$moto" >"$work/creds.json"
[ "$(json '["Version"]' <"$work/creds.json")" = 1 ] || fail "credential_process Version"
for field in AccessKeyId SecretAccessKey SessionToken Expiration; do
  [ -n "$(json "[\"$field\"]" <"$work/creds.json")" ] || fail "credential_process $field"
done
ok "credential_process JSON: Version 1, AccessKeyId $(json '["AccessKeyId"]' <"$work/creds.json"), Expiration $(json '["Expiration"]' <"$work/creds.json")"

step "the STS exchange over https, through the AWS SDK's own HTTPS client"
# nginx (Debian package) serves moto's STS with the harness CA's certificate:
# refused while the CA is unknown, accepted once SSL_CERT_FILE names it (the
# SDK's rustls client reads the system's roots and that variable).
sts_tls_port=$(free_port)
mkdir -p "$work/sts-nginx"
cat >"$work/sts-nginx.conf" <<CONF
worker_processes 1;
pid $work/sts-nginx/nginx.pid;
error_log $work/sts-nginx/error.log warn;
events {}
http {
  access_log off;
  client_body_temp_path $work/sts-nginx/body;
  proxy_temp_path $work/sts-nginx/proxy;
  server {
    listen 127.0.0.1:$sts_tls_port ssl;
    ssl_certificate $tls/fullchain.pem;
    ssl_certificate_key $tls/privkey.pem;
    location / { proxy_pass $moto; }
  }
}
CONF
nginx -c "$work/sts-nginx.conf" -e "$work/sts-nginx/error.log" -g 'daemon off;' &
pids+=($!)
wait_for "https://localhost:$sts_tls_port/moto-api/"
sts_https=(aws-credentials --role-arn "$role_arn" --service s3 --scope "$scope" --sts-endpoint "https://localhost:$sts_tls_port")
if "${no_aws[@]}" "$daemon_bin" "${sts_https[@]}" >/dev/null 2>"$work/sts-untrusted.txt"; then
  fail "an STS certificate from an unknown CA was accepted"
fi
"${no_aws[@]}" SSL_CERT_FILE="$tls/ca.pem" "$daemon_bin" "${sts_https[@]}" >"$work/creds-https.json" \
  || fail "the SDK's HTTPS client did not reach STS over https"
[ -n "$(json '["AccessKeyId"]' <"$work/creds-https.json")" ] || fail "no credentials over https"
ok "unknown CA refused ($(grep -o 'invalid peer certificate: [A-Za-z]*' "$work/sts-untrusted.txt" | head -1)); with SSL_CERT_FILE: AccessKeyId $(json '["AccessKeyId"]' <"$work/creds-https.json")"

step "the AWS CLI through credential_process: STS identity and S3"
cat >"$work/aws-config" <<CONFIG
[profile agentkeys]
region = us-east-1
credential_process = $daemon_bin aws-credentials --role-arn $role_arn --service s3 --scope $scope --sts-endpoint $moto --broker-url $broker_url --ca-file $tls/ca.pem --state-dir $work/daemon
CONFIG
daemon_aws() { "${no_aws[@]}" AWS_CONFIG_FILE="$work/aws-config" AWS_SHARED_CREDENTIALS_FILE="$work/no-credentials" "$venv/bin/aws" --profile agentkeys --endpoint-url "$moto" "$@"; }
arn=$(daemon_aws sts get-caller-identity | json '["Arn"]')
case "$arn" in *assumed-role/agentkeys-demo/*) ok "caller is $arn" ;; *) fail "caller is $arn" ;; esac
echo "written through agentkeys" >"$work/hello.txt"
daemon_aws s3 mb s3://agentkeys-demo >/dev/null
daemon_aws s3 cp "$work/hello.txt" "s3://agentkeys-demo/${scope}hello.txt" >/dev/null
daemon_aws s3 cp "s3://agentkeys-demo/${scope}hello.txt" "$work/back.txt" >/dev/null
cmp -s "$work/hello.txt" "$work/back.txt" || fail "the object read back differs"
ok "s3 mb, put and get under $scope with the daemon's credentials"

step "a wallet agent: an owner wallet links it and grants it; it signs in with SIWE and mints bearer-only"
owner_key="$work/owner.key"; wallet_key="$work/wallet.key"
owner_address=$("$daemon_bin" keygen --wallet --wallet-key-file "$owner_key" | json '["wallet_address"]')
wallet_address=$("$daemon_bin" keygen --wallet --wallet-key-file "$wallet_key" | json '["wallet_address"]')
"$broker_bin" agent add --wallet-address "$owner_address" >/dev/null
as_owner=(--wallet-key-file "$owner_key" --state-dir "$work/owner")
as_wallet=(--wallet-key-file "$wallet_key" --state-dir "$work/wallet")
curl_tls -f -X POST "$broker_url/v1/auth/wallet/start" -H 'Content-Type: application/json' \
  -d "{\"address\": \"$owner_address\", \"chain_id\": 1}" >"$work/siwe-start.json" || fail "wallet/start"
"$venv/bin/python" - "$work/siwe-start.json" "$broker_url" "$owner_address" <<'PY' || fail "an established SIWE parser does not read the broker's message as it should"
import json, sys
from siwe import SiweMessage

start, issuer, address = sys.argv[1:]
answer = json.load(open(start))
assert {"request_id", "expires_in_seconds", "siwe_message", "nonce", "expires_at_iso"} <= answer.keys(), answer
message = SiweMessage.from_message(message=answer["siwe_message"])
assert message.domain == issuer.removeprefix("https://"), message.domain
assert message.uri == issuer, message.uri
assert message.address.lower() == address and message.address != address, message.address
assert (message.version, message.chain_id, message.nonce) == ("1", 1, answer["nonce"]), message
assert message.expiration_time == answer["expires_at_iso"], message.expiration_time
assert message.prepare_message() == answer["siwe_message"], "the parsed message does not render back"
print(f"domain {message.domain}, chain {message.chain_id}, expires {message.expiration_time}")
PY
ok "PyPI siwe parses the broker's EIP-4361 message: domain, URI, EIP-55 address, version, chain, nonce, expiry"
owner_omni=$("$daemon_bin" login "${as_owner[@]}" | json '["omni_account"]')
"$daemon_bin" owner link --wallet-address "$wallet_address" "${as_owner[@]}" >/dev/null
wallet_scope="bots/$owner_omni/wallet/"
receipt=$("$daemon_bin" owner grant --daemon "$wallet_address" --service s3 --scope "$wallet_scope" "${as_owner[@]}" | json '["audit_proof"]')
[ -n "$receipt" ] && [ "$receipt" != None ] || fail "the grant has no receipt"
"$daemon_bin" login "${as_wallet[@]}" >/dev/null
wallet_session=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["session"]["session_token"])' "$work/wallet/session.json")
curl_tls -f -X POST "$broker_url/v1/mint-oidc-jwt" -H "Authorization: Bearer $wallet_session" >"$work/wallet-mint.json" \
  || fail "a bearer-only mint by the wallet agent was refused"
[ "$(json '["wallet"]' <"$work/wallet-mint.json")" = "$wallet_address" ] || fail "the answer does not name the wallet"
"$venv/bin/python" - "$broker_url" "$work/wallet-mint.json" "$wallet_address" "$owner_omni" "$wallet_scope" "$tls/ca.pem" <<'PY' || fail "the wallet agent's JWT does not carry the old broker's claims"
import hashlib, json, ssl, sys, urllib.request
import jwt

issuer, minted, wallet, owner, scope, ca_file = sys.argv[1:]
tls = ssl.create_default_context(cafile=ca_file)
fetch = lambda url: json.load(urllib.request.urlopen(url, context=tls))
answer = json.load(open(minted))
assert {"jwt", "wallet", "expiration"} <= answer.keys(), answer
token = answer["jwt"]
header = jwt.get_unverified_header(token)
key = jwt.PyJWKSet.from_dict(fetch(issuer + "/.well-known/jwks.json"))[header["kid"]]
claims = jwt.decode(token, key.key, algorithms=["ES256"], audience="sts.amazonaws.com", issuer=issuer)
actor = hashlib.sha256(("agentkeys" + "evm" + wallet).encode()).hexdigest()
assert claims["sub"] == f"agentkeys:agent:{wallet}", claims["sub"]
assert claims["agentkeys_user_wallet"] == wallet, claims
assert claims["agentkeys_actor_omni"] == actor, claims
assert claims["agentkeys_owner_omni"] == owner, claims
assert claims["agentkeys_scope_path"] == scope, claims
tags = claims["https://aws.amazon.com/tags"]
assert tags["principal_tags"]["agentkeys_user_wallet"] == [wallet], tags
assert tags["principal_tags"]["agentkeys_actor_omni"] == [actor], tags
assert "agentkeys_user_wallet" in tags["transitive_tag_keys"], tags
print(f"sub {claims['sub']}, actor {actor[:16]}…, owner {owner[:16]}…")
PY
ok "bearer-only mint: jwt, wallet, expiration; sub, agentkeys_user_wallet and actor claims and tags as the old broker's, checked with PyJWT"
cat >>"$work/aws-config" <<CONFIG
[profile wallet]
region = us-east-1
credential_process = $daemon_bin aws-credentials --role-arn $role_arn --service s3 --scope $wallet_scope --sts-endpoint $moto --broker-url $broker_url --ca-file $tls/ca.pem --wallet-key-file $wallet_key --state-dir $work/wallet
CONFIG
wallet_aws() { "${no_aws[@]}" AWS_CONFIG_FILE="$work/aws-config" AWS_SHARED_CREDENTIALS_FILE="$work/no-credentials" "$venv/bin/aws" --profile wallet --endpoint-url "$moto" "$@"; }
arn=$(wallet_aws sts get-caller-identity | json '["Arn"]')
case "$arn" in *assumed-role/agentkeys-demo/agentkeys-"$wallet_address"-*) ok "caller is $arn" ;; *) fail "caller is $arn" ;; esac
wallet_aws s3 cp "$work/hello.txt" "s3://agentkeys-demo/${wallet_scope}hello.txt" >/dev/null
wallet_aws s3 cp "s3://agentkeys-demo/${wallet_scope}hello.txt" "$work/wallet-back.txt" >/dev/null
cmp -s "$work/hello.txt" "$work/wallet-back.txt" || fail "the object the wallet agent read back differs"
ok "STS session agentkeys-<wallet>-…, s3 put and get under $wallet_scope with the wallet agent's credentials"

step "an AI agent through MCP: agentkeys mcp driven by the Python MCP SDK"
"$venv/bin/python" harness/mcp_client.py "$daemon_bin" "$broker_url" "$admin_url" "$work/data/admin.token" \
  "$tls/ca.pem" "$work/daemon" "$role_arn" "$moto" "bots/$omni/mcp/" "$venv/bin/aws" "$work" \
  "$wallet_key" "$work/wallet" "${wallet_scope}mcp/" "$wallet_address" \
  || fail "the MCP server did not do what the client asked"
ok "initialize, tools/list, whoami, list_grants, aws_profile → the AWS CLI on S3 with AWS_PROFILE only, as a device agent and as a wallet agent; bad input → tool errors; no secret on the stream; inline secrets only when allowed; http needs the token and an allowed Origin"

step "audit: the chain and every sink verify"
report=$(curl_tls -f "$admin_url/v1/admin/audit/verify" -H "Authorization: Bearer $(cat "$work/data/admin.token")")
[ "$(json '["ok"]' <<<"$report")" = True ] || fail "audit verify: $report"
ok "audit verify ok, $(json '["records"]' <<<"$report") records"

printf '\nsingle mint path: every step passed\n'
