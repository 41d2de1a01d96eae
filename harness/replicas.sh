#!/usr/bin/env bash
# Three broker replicas on one PostgreSQL behind nginx (the load balancer,
# docs/deploy/nginx.conf with three upstream servers), one issuer URL:
# nginx's. Real processes on loopback (and one network namespace); every
# step checks what the runbook and docs/architecture.md ("Replicas on one
# PostgreSQL") promise:
#
#  1. a storm through nginx against a grant of max_uses = N releases N;
#  2. one Idempotency-Key sent to every replica releases one JWT;
#  3. a login challenged by one replica is verified by another (nginx's
#     log says which served each);
#  4. a key rotated on one replica is served by all;
#  5. kill -9 of a replica mid-burst loses nothing (every released JWT
#     audited, one chain that verifies, uses >= released) and the others
#     keep serving without a refusal;
#  6. PostgreSQL restarted under load: 503 while it is away, then served
#     again without restarting a broker;
#  7. audit anchors to an AgentKeysAudit contract on a local chain (anvil):
#     one replica sends them, every replica holds the same ones; kill -9
#     of the one that sends, and another goes on from the contract's last
#     anchor (contiguous, none sent twice); the killed one, restarted,
#     adopts the anchors it missed;
#  8. a replica cut off from PostgreSQL (in its own network namespace,
#     its link dropped: a hang, not a refusal) answers 503 within the
#     send timeout, never hangs a client, and recovers when the link
#     returns (needs root for the namespace: skipped, saying so, without).
#
# Stops everything it started; exits 0 only if every step passed.
set -euo pipefail
cd "$(dirname "$0")/.."

source harness/lib.sh

command -v nginx >/dev/null || fail "nginx is not installed (Debian: apt-get install nginx-light)"
anvil=${ANVIL:-anvil} cast=${CAST:-cast}
command -v "$anvil" >/dev/null && command -v "$cast" >/dev/null \
  || fail "anvil and cast are needed (npm install @foundry-rs/anvil @foundry-rs/cast; or set ANVIL and CAST)"
with_scratch
chmod 755 "$work"
# More to stop at exit than processes: the database and the namespace.
netns=""
cleanup() {
  # TERM first (nginx's master stops its workers), KILL what is left.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 50); do
    alive=""
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=yes; done
    [ -z "$alive" ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  if [ -n "$netns" ]; then
    ip netns del "$netns" 2>/dev/null || true
    ip link del "$netns-d" 2>/dev/null || true
    ip link del "$netns-c" 2>/dev/null || true
  fi
  bash harness/postgres.sh stop "$work/pg" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

step "build"
build_binaries
ok "agentkeys-broker and agentkeys built"

step "PostgreSQL, a CA, the shared secrets"
eval "$(bash harness/postgres.sh start "$work/pg")"
db_url=$AGENTKEYS_TEST_POSTGRES_URL
psql_() { psql -At "$db_url" -c "$1"; }
tls="$work/tls"
make_tls "$tls"
ca="$tls/ca.pem"
(umask 077; openssl rand -hex 32 >"$work/admin.token")
admin_token=$(cat "$work/admin.token")
ok "PostgreSQL $(psql_ 'SHOW server_version'), schema replicas"

step "a local chain and the audit contract every replica anchors to"
anvil_port=$(free_port)
# A block a second, not one per transaction: anchors wait in the pool as
# on a real chain, so two replicas sending at once would both get in.
"$anvil" --host 127.0.0.1 --port "$anvil_port" --block-time 1 --silent >"$work/anvil.log" 2>&1 &
pids+=($!)
rpc="http://127.0.0.1:$anvil_port"
anchorer=0xf39fd6e51aad88f6f4ce6ab8827279cfffb92266 # anvil's first account, unlocked
for _ in $(seq 100); do "$cast" chain-id --rpc-url "$rpc" >/dev/null 2>&1 && break; sleep 0.1; done
bytecode=$(json '["bytecode"]' <contracts/AgentKeysAudit.json)
contract=$("$cast" send --unlocked --from "$anchorer" --json --rpc-url "$rpc" \
  --create "$bytecode" "constructor(address,uint64)" "$anchorer" 0 | json '["contractAddress"]')
# The shipped config, its evm sink anchoring to the contract every second.
python3 - "$work/replicas.toml" "$rpc" "$anchorer" "$contract" <<'PY'
import sys
path, rpc, sender, contract = sys.argv[1:]
shipped = open("config/default.toml").read()
stub = 'kind = "evm"\nanchors_path = "evm-anchors.jsonl"\ninterval_seconds = 10\n'
assert stub in shipped, "config/default.toml's evm sink"
anchoring = ('kind = "evm"\nanchors_path = "evm-anchors.jsonl"\ninterval_seconds = 1\n'
             f'rpc_url = "{rpc}"\nfrom = "{sender}"\ncontract = "{contract}"\nconfirmations = 1\n')
open(path, "w").write(shipped.replace(stub, anchoring))
PY
ok "anvil at $rpc, AgentKeysAudit at $contract"

nginx_port=$(free_port)
public_url="https://localhost:$nginx_port"
declare -a port admin_port
for i in 1 2 3; do port[$i]=$(free_port); admin_port[$i]=$(free_port); done

# start_replica I [DB_URL] [PREFIX...]: replica I on its ports, its own data
# directory, the shared sealing key and admin token, nginx's issuer.
start_replica() {
  local i=$1 url=${2:-$db_url}
  shift 2 || shift $#
  env AGENTKEYS__SERVER__BIND="${bind_host:-127.0.0.1}:${port[$i]}" \
    AGENTKEYS__SERVER__ADMIN_BIND="${bind_host:-127.0.0.1}:${admin_port[$i]}" \
    AGENTKEYS__SERVER__TRUSTED_PROXIES="127.0.0.1" \
    AGENTKEYS__STORAGE__DATA_DIR="$work/r$i" \
    AGENTKEYS__SECRETS__SEALING_KEY_FILE="$work/sealing.key" \
    AGENTKEYS__ADMIN__TOKEN_FILE="$work/admin.token" \
    AGENTKEYS__OIDC__ISSUER="$public_url" \
    AGENTKEYS__STORAGE__BACKEND=postgres \
    AGENTKEYS__STORAGE__POSTGRES__URL="$url" \
    AGENTKEYS__STORAGE__POSTGRES__SCHEMA=replicas \
    AGENTKEYS__STORAGE__POSTGRES__REPLICAS=true \
    AGENTKEYS__STORAGE__POSTGRES__REFRESH_MS=500 \
    AGENTKEYS__RATE_LIMIT__PER_SECOND=5000 \
    AGENTKEYS__RATE_LIMIT__BURST=5000 \
    AGENTKEYS__LOG__FILTER=info \
    "$@" "$broker_bin" serve --config "$work/replicas.toml" >>"$work/r$i.log" 2>&1 &
  pids+=($!)
  replica_pid[$i]=$!
}
declare -a replica_pid
admin() { # METHOD PATH [BODY] on replica 1's admin listener
  curl -s -X "$1" "http://127.0.0.1:${admin_port[1]}$2" -H "Authorization: Bearer $admin_token" \
    ${3:+-H 'Content-Type: application/json' -d "$3"}
}

step "three replicas and nginx before them"
start_replica 1
wait_for "http://127.0.0.1:${admin_port[1]}/readyz"
start_replica 2
start_replica 3
wait_for "http://127.0.0.1:${admin_port[2]}/readyz"
wait_for "http://127.0.0.1:${admin_port[3]}/readyz"
start_nginx "$nginx_port" "$tls" "127.0.0.1:${port[1]}" "127.0.0.1:${port[2]}" "127.0.0.1:${port[3]}"
holders=$(psql_ "SELECT claimed_by FROM replicas.broker_writer")
ok "replicas at ${port[1]}, ${port[2]}, ${port[3]} behind $public_url; the schema: $holders"

step "an agent, and a login challenged by one replica and verified by another"
export AGENTKEYS_BROKER_URL="$public_url" AGENTKEYS_CA_FILE="$ca" AGENTKEYS_STATE_DIR="$work/daemon"
public_key=$("$daemon_bin" keygen | json '["public_key"]')
admin POST /v1/admin/agents "{\"name\": \"spread\", \"public_key\": \"$public_key\"}" >/dev/null
sleep 1.2 # every replica reads the new agent (refresh_ms = 500)
: >"$work/nginx/access.log"
omni=$("$daemon_bin" login | json '["omni_account"]')
session=$(json '["session"]["session_token"]' <"$work/daemon/session.json")
challenged=$(awk '$2 == "/v1/auth/challenge" && $3 == 200 {print $4}' "$work/nginx/access.log" | tail -1)
verified=$(awk '$2 == "/v1/auth/verify" && $3 == 200 {print $4}' "$work/nginx/access.log" | tail -1)
[ -n "$challenged" ] && [ -n "$verified" ] || fail "no login in nginx's log"
[ "$challenged" != "$verified" ] || fail "the challenge and the verify both went to $challenged"
ok "challenged by $challenged, verified by $verified"

burst() { python3 harness/mint_burst.py "$@" --session "$session" --ca "$ca"; }
scope="bots/$omni/"
body="{\"service\": \"s3\", \"scope_path\": \"$scope\"}"

step "warm-up: every replica's connections made and its anchoring started"
# A debug build on two shared cores makes its first TLS connections to the
# database slowly: a storm on cold pools measures that, not the gates.
warm=$(admin POST /v1/admin/grants "{\"agent\": \"spread\", \"service\": \"s3\", \"scope_path\": \"$scope\"}")
sleep 1.2
warmed=$(burst "$public_url" --body "$body" --count 60 --workers 12)
[ "$(json '["statuses"]' <<<"$warmed")" = "{'200': 60}" ] || fail "the warm-up: $warmed"
admin DELETE "/v1/admin/grants/$(json '["id"]' <<<"$warm")" >/dev/null
sleep 1.2 # every replica reads the revoke
ok "60 of 60 through nginx"

step "1. a storm through nginx against max_uses = 10"
limited=$(admin POST /v1/admin/grants "{\"agent\": \"spread\", \"service\": \"s3\", \"scope_path\": \"$scope\", \"max_uses\": 10}")
limited_id=$(json '["id"]' <<<"$limited")
sleep 1.2 # every replica reads the new grant (refresh_ms = 500)
: >"$work/nginx/access.log"
storm=$(burst "$public_url" --body "$body" --count 60 --workers 30)
released=$(json '["statuses"].get("200", 0)' <<<"$storm")
[ "$released" = 10 ] || fail "released $released, not 10: $storm"
served=$(awk '$2 == "/v1/mint-oidc-jwt" {print $4}' "$work/nginx/access.log" | sort -u | wc -l)
[ "$served" = 3 ] || fail "the storm reached $served replicas, not 3"
uses=$(psql_ "SELECT uses FROM replicas.audit_grant_uses WHERE grant_id = '$limited_id'")
[ "$uses" = 10 ] || fail "the database counts $uses uses"
ok "60 mints over 3 replicas: $(json '["codes"]' <<<"$storm") and 10 released; the database counts 10 uses"
admin DELETE "/v1/admin/grants/$limited_id" >/dev/null
admin POST /v1/admin/grants "{\"agent\": \"spread\", \"service\": \"s3\", \"scope_path\": \"$scope\", \"max_uses\": 100000}" >"$work/grant.json"
grant_id=$(json '["id"]' <"$work/grant.json")
sleep 1.2

step "2. one Idempotency-Key sent to every replica"
once=$(burst "$public_url" --body "$body" --count 12 --workers 6 --key "harness-once-1")
jtis=$(json '["jtis"]' <<<"$once" | python3 -c 'import ast, sys; print(len(set(ast.literal_eval(sys.stdin.read()))))')
[ "$jtis" = 1 ] || fail "one key released $jtis JWTs: $once"
for i in 1 2 3; do
  again=$(burst "http://127.0.0.1:${port[$i]}" --body "$body" --count 1 --workers 1 --key "harness-once-1")
  [ "$(json '["jtis"]' <<<"$again")" = "$(json '["jtis"][:1]' <<<"$once")" ] || fail "replica $i answers another JWT: $again"
done
ok "12 at once through nginx: $(json '["statuses"]' <<<"$once"), one JWT; each replica replays it"

step "4. a key rotated on one replica is served by all"
kid=$(admin POST /v1/admin/keys/rotate '{"key": "oidc"}' | json '["kid"]')
for i in 1 2 3; do
  for _ in $(seq 50); do
    curl -s "http://127.0.0.1:${port[$i]}/.well-known/jwks.json" | grep -q "$kid" && break
    sleep 0.1
  done
  curl -s "http://127.0.0.1:${port[$i]}/.well-known/jwks.json" | grep -q "$kid" || fail "replica $i does not serve $kid"
done
ok "$kid published by replicas 1, 2 and 3"

step "5. kill -9 of a replica mid-burst"
burst "$public_url" --body "$body" --seconds 6 --workers 12 >"$work/kill.json" &
load=$!
sleep 2
kill -KILL "${replica_pid[3]}"
wait "$load"
killed=$(cat "$work/kill.json")
released=$(json '["statuses"].get("200", 0)' <"$work/kill.json")
refused=$(python3 -c 'import json, sys; s = json.load(sys.stdin)["statuses"]; print(sum(n for k, n in s.items() if k != "200"))' <"$work/kill.json")
# Only what was in flight on the replica killed may fail (nginx does not
# send a POST it already sent to another); nothing after.
[ "$refused" -le 12 ] || fail "$refused refused after the kill: $killed"
python3 - "$work/kill.json" "$admin_token" "${admin_port[1]}" <<'PY' || fail "a released JWT has no audit record"
import json, sys, urllib.request
burst, token, port = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3]
seen, after = set(), 0
while True:
    request = urllib.request.Request(
        "http://127.0.0.1:%s/v1/admin/audit?limit=1000&after=%d" % (port, after),
        headers={"Authorization": "Bearer " + token})
    records = json.load(urllib.request.urlopen(request))["records"]
    if not records:
        break
    seen.update(r["jti"] for r in records if r["outcome"] == "ok" and r.get("jti"))
    after = records[-1]["seq"]
missing = [jti for jti in burst["jtis"] if jti not in seen]
sys.exit(1 if missing else 0)
PY
verify=$(admin GET /v1/admin/audit/verify)
[ "$(json '["ok"]' <<<"$verify")" = True ] || fail "the chain does not verify: $verify"
uses=$(psql_ "SELECT uses FROM replicas.audit_grant_uses WHERE grant_id = '$grant_id'")
[ "$uses" -ge "$released" ] || fail "uses $uses < released $released"
after=$(burst "$public_url" --body "$body" --count 40 --workers 8)
[ "$(json '["statuses"]' <<<"$after")" = "{'200': 40}" ] || fail "after the kill: $after"
ok "$released released in 6 s, $refused failed in flight on the replica killed; each released JWT audited, the chain verifies, uses $uses >= released; then 40 of 40 served by the two left"
start_replica 3
wait_for "http://127.0.0.1:${admin_port[3]}/readyz"

step "6. PostgreSQL restarted under load"
burst "$public_url" --body "$body" --seconds 9 --workers 8 --timeout 5 >"$work/restart.json" &
load=$!
sleep 2
bash harness/postgres.sh stop "$work/pg"
sleep 3
bash harness/postgres.sh restart "$work/pg"
wait "$load"
restart=$(cat "$work/restart.json")
[ "$(json '["statuses"].get("hang", 0)' <<<"$restart")" = 0 ] || fail "a client hung: $restart"
python3 -c 'import json, sys; c = json.load(sys.stdin)["codes"]; sys.exit(0 if c and all(k.startswith("503") for k in c) else 1)' <<<"$restart" \
  || fail "while the database was away: $restart (each refusal a 503, at least one)"
back=$(burst "$public_url" --body "$body" --count 30 --workers 6)
[ "$(json '["statuses"]' <<<"$back")" = "{'200': 30}" ] || fail "after the restart: $back"
ok "while away: $(json '["codes"]' <<<"$restart") (slowest $(json '["slowest"]' <<<"$restart") s); after: 30 of 30, no broker restarted"

step "7. audit anchors: one replica sends them, every replica holds them"
# leader: the replica that says it sends (agentkeys_audit_anchoring_lead).
leader() {
  local i found=""
  for i in "$@"; do
    curl -s "http://127.0.0.1:${admin_port[$i]}/metrics" | grep -qx 'agentkeys_audit_anchoring_lead 1' \
      && found+="$i "
  done
  echo "$found"
}
# anchored_to SEQ I...: until the contract and replicas I... hold anchors
# up to SEQ, contiguous from 1; 30 s at most.
anchored_to() {
  local seq=$1
  shift
  for _ in $(seq 300); do
    [ "$("$cast" call --rpc-url "$rpc" "$contract" 'lastSeq()(uint64)')" = "$seq" ] \
      && python3 - "$seq" "$@" <<'PY' && return 0
import json, sys, os
seq, replicas = int(sys.argv[1]), sys.argv[2:]
work = os.environ["work"]
held = []
for i in replicas:
    lines = open(f"{work}/r{i}/evm-anchors.jsonl").read().splitlines()
    anchors = [json.loads(line) for line in lines]
    nxt = 1
    for a in anchors:
        assert a["from_seq"] == nxt, (i, a)
        nxt = a["to_seq"] + 1
    if nxt != seq + 1:
        sys.exit(1)
    held.append([(a["from_seq"], a["to_seq"], a["tx_hash"]) for a in anchors])
assert all(h == held[0] for h in held), "replicas hold different anchors"
PY
    sleep 0.1
  done
  fail "anchors never reached $seq on replicas $*"
}
export work
burst "$public_url" --body "$body" --count 30 --workers 6 >/dev/null
head=$(psql_ "SELECT max(seq) FROM replicas.audit_records")
anchored_to "$head" 1 2 3
sender=$(leader 1 2 3)
[ "$(wc -w <<<"$sender")" = 1 ] || fail "replicas that say they send anchors: '$sender'"
sender=${sender% }
anchors=$(wc -l <"$work/r1/evm-anchors.jsonl")
[ "$("$cast" nonce --rpc-url "$rpc" "$anchorer")" = $((1 + anchors)) ] || fail "an anchor was sent twice or reverted"
ok "records 1..$head in $anchors anchors on chain, sent by replica $sender alone, the same in every replica's anchors file"
burst "$public_url" --body "$body" --seconds 4 --workers 8 >/dev/null &
load=$!
sleep 1.5
kill -KILL "${replica_pid[$sender]}"
wait "$load"
survivors=$(for i in 1 2 3; do [ "$i" != "$sender" ] && printf '%s ' "$i"; done)
burst "$public_url" --body "$body" --count 10 --workers 2 >/dev/null
head=$(psql_ "SELECT max(seq) FROM replicas.audit_records")
# shellcheck disable=SC2086
anchored_to "$head" $survivors
# shellcheck disable=SC2086
taken_over=$(leader $survivors)
[ "$(wc -w <<<"$taken_over")" = 1 ] || fail "replicas that say they send anchors after the kill: '$taken_over'"
anchors=$(wc -l <"$work/r${taken_over% }/evm-anchors.jsonl")
[ "$("$cast" nonce --rpc-url "$rpc" "$anchorer")" = $((1 + anchors)) ] || fail "an anchor was sent twice or reverted"
ok "replica $sender killed mid-burst: replica ${taken_over% } went on; records 1..$head in $anchors contiguous anchors, none sent twice"
start_replica "$sender"
wait_for "http://127.0.0.1:${admin_port[$sender]}/readyz"
anchored_to "$head" 1 2 3
ok "replica $sender restarted: it holds the same $anchors anchors"

step "8. a replica cut off from PostgreSQL by a network partition"
if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null; then
  printf 'SKIPPED: the partition needs root and iproute2 (a network namespace)\n'
  [ -z "${CI:-}" ] || fail "CI must run the partition"
else
  # Two links into the namespace: one for clients (10.232.0.0/30), one
  # for the database (10.231.0.0/30), which is the one cut.
  netns="akr$$"
  ip netns add "$netns"
  ip netns exec "$netns" ip link set lo up
  for link in d c; do
    net=$([ $link = d ] && echo 10.231.0 || echo 10.232.0)
    ip link add "$netns-$link" type veth peer name "$netns-${link}n"
    ip link set "$netns-${link}n" netns "$netns"
    ip addr add "$net.1/30" dev "$netns-$link"
    ip link set "$netns-$link" up
    ip netns exec "$netns" ip addr add "$net.2/30" dev "$netns-${link}n"
    ip netns exec "$netns" ip link set "$netns-${link}n" up
  done
  # The database, reached from the namespace through a relay on the
  # host's end of the link (it listens on loopback only).
  db_port=$(python3 -c 'import sys, urllib.parse; print(urllib.parse.urlsplit(sys.argv[1]).port)' "$db_url")
  relay_port=$(free_port)
  python3 - "$relay_port" "$db_port" <<'PY' &
import asyncio, sys
async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
async def relay(reader, writer):
    upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", int(sys.argv[2]))
    await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer), return_exceptions=True)
async def main():
    server = await asyncio.start_server(relay, "10.231.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
PY
  pids+=($!)
  sleep 0.5
  cut_url=${db_url/127.0.0.1:$db_port/10.231.0.1:$relay_port}
  port[4]=$(free_port); admin_port[4]=$(free_port)
  bind_host=10.232.0.2 start_replica 4 "$cut_url" ip netns exec "$netns"
  wait_for "http://10.232.0.2:${admin_port[4]}/readyz"
  cut="http://10.232.0.2:${port[4]}"
  sleep 1.2
  first=$(burst "$cut" --body "$body" --count 10 --workers 2)
  [ "$(json '["statuses"]' <<<"$first")" = "{'200': 10}" ] || fail "the fourth replica before the cut: $first"
  ip link set "$netns-d" down
  during=$(burst "$cut" --body "$body" --seconds 4 --workers 4 --timeout 5)
  ip link set "$netns-d" up
  [ "$(json '["statuses"].get("hang", 0)' <<<"$during")" = 0 ] || fail "a client hung: $during"
  [ "$(json '["statuses"].get("200", 0)' <<<"$during")" = 0 ] || fail "released while cut off: $during"
  slowest=$(json '["slowest"]' <<<"$during")
  python3 -c "import sys; sys.exit(0 if $slowest <= 2.5 else 1)" || fail "answered in $slowest s, past the send timeout (2 s): $during"
  recovered=""
  for _ in $(seq 60); do
    again=$(burst "$cut" --body "$body" --count 1 --workers 1)
    [ "$(json '["statuses"]' <<<"$again")" = "{'200': 1}" ] && { recovered=yes; break; }
    sleep 0.5
  done
  [ -n "$recovered" ] || fail "the fourth replica did not recover: $again"
  ok "cut off: $(json '["codes"]' <<<"$during"), slowest $slowest s, no hang; served again once the link returned"
fi

printf '\nreplicas: every step passed\n'
