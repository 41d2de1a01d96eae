#!/usr/bin/env bash
# The broker behind nginx (Debian package), with docs/deploy/nginx.conf as it
# is shipped, only its ports, certificate paths and name replaced: nginx
# terminates TLS with a certificate of a CA made here (openssl); the public
# paths pass, the admin API and /metrics do not; the broker trusts nginx's
# X-Forwarded-For for its per-address login limit (clients on 127.0.0.2 and
# 127.0.0.3 get a budget each) and keeps nginx's request id. The daemon
# client logs in and mints through nginx. Real processes on loopback only;
# stops everything it started and exits 0 only if every step passed.
set -euo pipefail
cd "$(dirname "$0")/.."

source harness/lib.sh

command -v nginx >/dev/null || fail "nginx is not installed (Debian: apt-get install nginx-light)"
with_scratch
chmod 755 "$work"

step "build"
build_binaries
ok "agentkeys-broker and agentkeys built; $(nginx -v 2>&1)"

step "a CA and nginx's certificate (openssl)"
tls="$work/tls"
make_tls "$tls"
ok "certificate for localhost"

step "the broker on loopback: plain http upstream, admin listener apart, nginx trusted"
broker_port=$(free_port)
admin_port=$(free_port)
nginx_port=$(free_port)
public_url="https://localhost:$nginx_port"
admin_url="http://127.0.0.1:$admin_port"
AGENTKEYS__SERVER__BIND="127.0.0.1:$broker_port" \
AGENTKEYS__SERVER__ADMIN_BIND="127.0.0.1:$admin_port" \
AGENTKEYS__SERVER__TRUSTED_PROXIES="127.0.0.1" \
AGENTKEYS__STORAGE__DATA_DIR="$work/data" \
AGENTKEYS__SECRETS__SEALING_KEY_FILE="$work/sealing.key" \
AGENTKEYS__OIDC__ISSUER="$public_url" \
AGENTKEYS__RATE_LIMIT__LOGIN_PER_SECOND_PER_IP=1 \
AGENTKEYS__RATE_LIMIT__LOGIN_BURST_PER_IP=4 \
AGENTKEYS__LOG__FILTER=info \
  "$broker_bin" serve --config config/default.toml >"$work/broker.log" 2>&1 &
pids+=($!)
for _ in $(seq 150); do curl -fs -o /dev/null "$admin_url/readyz" && break; sleep 0.1; done
ok "broker at 127.0.0.1:$broker_port, admin at $admin_url"

step "nginx with docs/deploy/nginx.conf"
start_nginx "$nginx_port" "$tls" "127.0.0.1:$broker_port"
through() { curl -s --cacert "$tls/ca.pem" "$@"; }
ok "nginx at $public_url"

step "public paths pass, admin paths and metrics do not"
issuer=$(through "$public_url/.well-known/openid-configuration" | json '["issuer"]')
[ "$issuer" = "$public_url" ] || fail "discovery names $issuer"
through -f -o /dev/null "$public_url/.well-known/jwks.json" || fail "JWKS"
for path in /v1/admin/agents /v1/admin/audit /metrics /v1/mint-aws-creds; do
  status=$(through -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $(cat "$work/data/admin.token")" "$public_url$path")
  [ "$status" = 404 ] || fail "$path through nginx answered $status"
done
# nginx matches a decoded, resolved path; the broker must get that one.
reply=$(through --path-as-is -X POST "$public_url/v1/admin/agents/..%2F..%2Fauth%2Fchallenge" \
  -H 'Content-Type: application/json' -d "{\"public_key\": \"$(printf '11%.0s' $(seq 32))\"}")
[ -n "$(json '.get("nonce", "")' <<<"$reply")" ] || fail "an encoded traversal reached the broker as another path: $reply"
ok "discovery and JWKS through nginx; /v1/admin/*, /metrics and /v1/mint-aws-creds → 404; an encoded traversal reaches the broker as the path nginx matched"

step "the daemon logs in and mints through nginx"
export AGENTKEYS_BROKER_URL="$public_url" AGENTKEYS_ADMIN_URL="$admin_url" AGENTKEYS_CA_FILE="$tls/ca.pem"
export AGENTKEYS_STATE_DIR="$work/daemon" AGENTKEYS_ADMIN_TOKEN_FILE="$work/data/admin.token"
public_key=$("$daemon_bin" keygen | json '["public_key"]')
"$broker_bin" agent add behind-nginx --public-key "$public_key" >/dev/null
omni=$("$daemon_bin" login | json '["omni_account"]')
"$broker_bin" grant add --agent behind-nginx --service s3 --scope "bots/$omni/" >/dev/null
jti=$("$daemon_bin" mint --service s3 --scope "bots/$omni/x/" | json '["jti"]')
record=$(curl -fs "$admin_url/v1/admin/audit?limit=100" -H "Authorization: Bearer $(cat "$work/data/admin.token")" \
  | python3 -c "import json, sys; print(json.dumps([r for r in json.load(sys.stdin)['records'] if r['jti'] == '$jti'][0]))")
request_id=$(json '["request_id"]' <<<"$record")
[[ "$request_id" =~ ^[0-9a-f]{32}$ ]] || fail "the audit record's request id $request_id is not nginx's"
ok "minted $jti through nginx; its audit record carries nginx's request id $request_id"

step "the login limit counts each client behind nginx, not nginx"
challenge() { through -o /dev/null -w '%{http_code}' --interface "$1" -X POST "$public_url/v1/auth/challenge" \
  -H 'Content-Type: application/json' -H 'X-Forwarded-For: 203.0.113.77' -H "Forwarded: for=198.51.100.$((RANDOM % 250))" \
  -d "{\"public_key\": \"$public_key\"}"; }
statuses=""
for _ in 1 2 3 4 5 6; do statuses+="$(challenge 127.0.0.2) "; done
[[ "$statuses" == *429* ]] || fail "127.0.0.2 was never limited: $statuses"
first=$(challenge 127.0.0.3)
[ "$first" = 200 ] || fail "127.0.0.3 shares 127.0.0.2's budget: $first"
grep -q "127.0.0.2" "$work/broker.log" || fail "the broker's log does not name the client 127.0.0.2"
ok "127.0.0.2: $statuses; 127.0.0.3 then: $first (forged X-Forwarded-For and Forwarded headers change nothing)"

printf '\nbehind nginx: every step passed\n'
