#!/usr/bin/env bash
# Mint throughput over HTTP: builds the release binary, measures the crypto
# limit (session verify + ES256 sign on every core) first, starts the broker
# on a free loopback port with a fresh data directory, registers and logs in
# $AGENTS agents with a grant each (grants required, the default), drives
# POST /v1/mint-oidc-jwt with wrk for $DURATION at $CONNECTIONS connections,
# prints mints/s, the fraction of the crypto limit, latency percentiles and
# answers by error code, then stops the broker. Loopback only; stops by itself.
#
#   harness/mint-load.sh                      # defaults below
#   CONNECTIONS=16 DURATION=5s harness/mint-load.sh
#   SINKS=ledger harness/mint-load.sh         # audit: ledger only
#   SINKS=jsonl harness/mint-load.sh          # audit: ledger + jsonl
#   (SINKS=default: config/default.toml as shipped, ledger + jsonl + evm stub)
#   PACE_MS=3 harness/mint-load.sh           # each connection pauses 3 ms between an answer
#                                             # and its next request: latency below the peak
#   TARGET_RATE=7400 harness/mint-load.sh     # latency at a fixed offered rate (hey from
#                                             # Debian, one agent; hey takes far more CPU than wrk)
#   EXPECT_REFUSALS=1 harness/mint-load.sh    # an overload run: non-200 answers are expected
#   BROKER=/path/to/agentkeys-broker harness/mint-load.sh   # measure another build
#   SIGNER=pkcs11 harness/mint-load.sh        # OIDC keys on a SoftHSM2 token of
#                                             # its own (Debian package softhsm2)
#   STORAGE=postgres harness/mint-load.sh     # state in a throwaway PostgreSQL of
#                                             # its own (harness/postgres.sh; Debian
#                                             # package postgresql) instead of redb
#   METRICS=out.prom harness/mint-load.sh     # the (first) broker's /metrics after the run
#                                             # (batch sizes, stage and commit latency)
#   STORAGE=postgres REPLICAS=2 harness/mint-load.sh  # that many brokers as replicas
#                                             # on it (storage.postgres.replicas), the
#                                             # connections split evenly among them
#
# Exits 1 when any mint was answered other than 200 (unless EXPECT_REFUSALS
# is set) and, always, when the first mint after the run is not a 200.
set -euo pipefail
cd "$(dirname "$0")/.."

AGENTS=${AGENTS:-64}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
DURATION=${DURATION:-10s}
RATE=${RATE:-1000000}
SINKS=${SINKS:-default}
SIGNER=${SIGNER:-file}
STORAGE=${STORAGE:-redb}
REPLICAS=${REPLICAS:-0}
[ "$REPLICAS" = 0 ] || [ "$STORAGE" = postgres ] || { echo "REPLICAS needs STORAGE=postgres" >&2; exit 2; }

command -v wrk >/dev/null || { echo "wrk is required (Debian package wrk)" >&2; exit 2; }
# BROKER: another build of the broker to measure (say, the previous
# release, side by side with this one); default: this tree's, built now.
if [ -z "${BROKER:-}" ]; then
  features=""; [ "$STORAGE" = postgres ] && features="--features postgres"
  cargo build --release --quiet $features
  BROKER=./target/release/agentkeys-broker
fi

# The limit every figure below is read against, measured in this run.
limit=$("$BROKER" load crypto --seconds 4 |
  python3 -c 'import json, sys; print(round(json.load(sys.stdin)["verify_and_sign_per_second"]))')

work=$(mktemp -d)
broker_pids=()
pg_dir=""
cleanup() {
  for pid in "${broker_pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
  if [ -n "$pg_dir" ]; then bash harness/postgres.sh stop "$pg_dir" >/dev/null 2>&1 || true; rm -rf "$pg_dir"; fi
  rm -rf "$work"
}
trap cleanup EXIT

# The broker's config: the shipped default, with the anchor sinks replaced.
without_sinks() {
  awk -v extra="$1" '/^\[\[audit.sinks\]\]/ { skip = 1 } /^\[actors\]/ { skip = 0 }
    !skip { print } /^\[audit\]$/ && extra != "" { print extra }' config/default.toml
}
case "$SINKS" in
  default) cp config/default.toml "$work/broker.toml" ;;
  ledger) without_sinks 'sinks = []' >"$work/broker.toml" ;;
  jsonl) without_sinks '' >"$work/broker.toml"
         printf '\n[[audit.sinks]]\nkind = "jsonl"\nrequired = true\n' >>"$work/broker.toml" ;;
  *) echo "SINKS is default, ledger or jsonl" >&2; exit 2 ;;
esac

# The OIDC keys: the sealed key ring (file), or a SoftHSM2 token made here,
# its first key made by `keys init`.
case "$SIGNER" in
  file) ;;
  pkcs11)
    module=/usr/lib/softhsm/libsofthsm2.so
    [ -e "$module" ] || { echo "SIGNER=pkcs11 needs SoftHSM2 (Debian package softhsm2)" >&2; exit 2; }
    mkdir -p "$work/tokens"
    printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' "$work/tokens" >"$work/softhsm2.conf"
    export SOFTHSM2_CONF="$work/softhsm2.conf"
    echo 2468 >"$work/pin"
    softhsm2-util --init-token --free --label agentkeys-load --pin 2468 --so-pin 1357 >/dev/null
    sed -i 's/^signer = .*/signer = "pkcs11"/' "$work/broker.toml"
    grep -q '^signer = "pkcs11"' "$work/broker.toml" || sed -i 's/^\[oidc\]$/[oidc]\nsigner = "pkcs11"/' "$work/broker.toml"
    printf '\n[oidc.pkcs11]\nmodule = "%s"\ntoken_label = "agentkeys-load"\npin_file = "%s"\nkey_label = "oidc"\n' \
      "$module" "$work/pin" >>"$work/broker.toml"
    "$BROKER" keys init --signer pkcs11 --config "$work/broker.toml" >/dev/null ;;
  *) echo "SIGNER is file or pkcs11" >&2; exit 2 ;;
esac

# Where the broker keeps its state: redb files in its data directory, or a
# PostgreSQL server of its own on this machine (so the figure includes the
# database's CPU, on the same cores).
case "$STORAGE" in
  redb) ;;
  postgres)
    # A folder of its own: the server runs as the postgres user.
    pg_dir=$(mktemp -d)
    eval "$(bash harness/postgres.sh start "$pg_dir")"
    export AGENTKEYS__STORAGE__BACKEND=postgres
    export AGENTKEYS__STORAGE__POSTGRES__URL="$AGENTKEYS_TEST_POSTGRES_URL" ;;
  *) echo "STORAGE is redb or postgres" >&2; exit 2 ;;
esac

# utime + stime of a process, in clock ticks; and of every process of the
# postgres user (the database's share of the same cores).
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
database_ticks() {
  local total=0 pid
  for pid in $(pgrep -u postgres 2>/dev/null); do
    total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

# One broker, or $REPLICAS replicas of one schema (one sealing key, one
# admin token), each on a port of its own.
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
(umask 077; openssl rand -hex 32 >"$work/admin.token")
urls=()
for i in $(seq "$(( REPLICAS > 0 ? REPLICAS : 1 ))"); do
  port=$(free_port)
  urls+=("http://127.0.0.1:$port")
  replica_env=()
  [ "$REPLICAS" = 0 ] || replica_env=(AGENTKEYS__STORAGE__POSTGRES__REPLICAS=true)
  env "${replica_env[@]}" \
  AGENTKEYS__SERVER__BIND="127.0.0.1:$port" \
  AGENTKEYS__STORAGE__DATA_DIR="$work/data$i" \
  AGENTKEYS__SECRETS__SEALING_KEY_FILE="$work/sealing.key" \
  AGENTKEYS__ADMIN__TOKEN_FILE="$work/admin.token" \
  AGENTKEYS__RATE_LIMIT__PER_SECOND="$RATE" \
  AGENTKEYS__RATE_LIMIT__BURST="$RATE" \
  AGENTKEYS__RATE_LIMIT__LOGIN_PER_SECOND_PER_IP="$RATE" \
  AGENTKEYS__RATE_LIMIT__LOGIN_BURST_PER_IP="$RATE" \
    "$BROKER" serve --config "$work/broker.toml" >"$work/broker$i.log" 2>&1 &
  broker_pids+=($!)
  for _ in $(seq 100); do
    curl -fs "${urls[-1]}/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fs "${urls[-1]}/readyz" >/dev/null || { echo "broker $i did not become ready" >&2; cat "$work/broker$i.log" >&2; exit 1; }
done
url=${urls[0]}
broker_pid=${broker_pids[0]}

"$BROKER" load prepare --broker-url "$url" \
  --admin-token-file "$work/admin.token" --agents "$AGENTS" --grant "s3:load/" \
  --out "$work/tokens.txt"
# Replicas read the agents and grants made on the first again each second.
[ "$REPLICAS" -le 1 ] || sleep 2

body='{"service":"s3","scope_path":"load/jobs/"}'
if [ -n "${TARGET_RATE:-}" ]; then
  command -v hey >/dev/null || { echo "TARGET_RATE needs hey (Debian package hey)" >&2; exit 2; }
  echo "# $(nproc) cores; crypto limit $limit /s; audit sinks: $SINKS; hey -c$CONNECTIONS at $TARGET_RATE mints/s offered for $DURATION, one agent"
  hey -z "$DURATION" -c "$CONNECTIONS" -q "$((TARGET_RATE / CONNECTIONS))" -m POST \
    -H "Authorization: Bearer $(head -n 1 "$work/tokens.txt")" -T application/json -d "$body" \
    "$url/v1/mint-oidc-jwt" >"$work/hey.txt"
  sed -n '/Requests\/sec/p;/Latency distribution/,/99%/p;/Status code/,/^$/p;/Error distribution/,/^$/p' "$work/hey.txt"
  # "[200] N responses", "[503] N responses"; and "Error distribution" for
  # requests that got no answer at all.
  ok=$(awk '/^ *\[200\]/ { n += $2 } END { print n + 0 }' "$work/hey.txt")
  refused=$(awk '/^ *\[[0-9]+\]/ && $1 != "[200]" { n += $2 } END { print n + 0 }' "$work/hey.txt")
  grep -q 'Error distribution' "$work/hey.txt" && refused=$((refused + 1))
else
  brokers="one broker"; [ "$REPLICAS" = 0 ] || brokers="$REPLICAS replicas, $((CONNECTIONS / ${#urls[@]})) connections each"
  echo "# $(nproc) cores; crypto limit $limit /s; audit sinks: $SINKS; OIDC signer: $SIGNER; storage: $STORAGE; $brokers; $AGENTS agents, each with a grant for s3 load/; wrk -t$THREADS -c$CONNECTIONS -d$DURATION"
  brokers_ticks() { local total=0 pid; for pid in "${broker_pids[@]}"; do total=$((total + $(cpu_ticks "$pid"))); done; echo "$total"; }
  cpu_before=$(brokers_ticks) db_before=$(database_ticks)
  # One wrk per broker, the connections split evenly; their figures summed.
  wrk_pids=()
  for i in "${!urls[@]}"; do
    MINT_BODY="$body" TOKENS="$work/tokens.txt" wrk -t"$THREADS" -c"$((CONNECTIONS / ${#urls[@]}))" -d"$DURATION" --latency \
      -s harness/mint.lua "${urls[$i]}/v1/mint-oidc-jwt" >"$work/wrk$i.txt" &
    wrk_pids+=($!)
  done
  wait "${wrk_pids[@]}"
  if [ "${#urls[@]}" = 1 ]; then
    cp "$work/wrk0.txt" "$work/wrk.txt"
  else
    for i in "${!urls[@]}"; do sed "s/^/replica $((i + 1)): /" "$work/wrk$i.txt"; done
    # The sum: mints/s and every answer count.
    cat "$work"/wrk[0-9]*.txt | awk '/^mints\/s/ { m += $4 } /^answers / { key = $0; sub(/ [0-9]+$/, "", key); n[key] += $NF }
      /^  Socket errors:/ { print }
      END { printf "mints/s sum = %d\n", m; for (k in n) printf "%s %d\n", k, n[k] }' >"$work/wrk.txt"
  fi
  cat "$work/wrk.txt"
  cpu_after=$(brokers_ticks) db_after=$(database_ticks)
  awk -v limit="$limit" '/^mints\/s/ { printf "fraction of the crypto limit: %.0f%% (%d of %d /s)\n", 100 * $4 / limit, $4, limit }' "$work/wrk.txt"
  # The broker's own CPU per answer (user + system, all threads): steadier
  # than mints/s when the machine's speed drifts.
  awk -v ticks=$((cpu_after - cpu_before)) -v hz="$(getconf CLK_TCK)" \
    '/^answers / { n += $NF } END { if (n) printf "broker CPU per answer: %.0f us\n", 1e6 * ticks / hz / n }' "$work/wrk.txt"
  if [ "$STORAGE" = postgres ]; then
    awk -v ticks=$((db_after - db_before)) -v hz="$(getconf CLK_TCK)" \
      '/^answers / { n += $NF } END { if (n) printf "database CPU per answer: %.0f us\n", 1e6 * ticks / hz / n }' "$work/wrk.txt"
  fi
  # "answers 200: N" and "answers 503 overloaded: N": every answer but 200;
  # wrk's "Socket errors:" line counts requests that got no answer at all.
  ok=$(awk '/^answers 200:/ { n += $3 } END { print n + 0 }' "$work/wrk.txt")
  refused=$(awk '/^answers / && $2 != "200:" { n += $NF }
    /^  Socket errors:/ { for (i = 3; i <= NF; i++) n += $i } END { print n + 0 }' "$work/wrk.txt")
fi
if [ "$ok" -eq 0 ]; then
  echo "FAIL: no mint was answered 200" >&2
  failed=1
fi
if [ "$refused" -gt 0 ] && [ -z "${EXPECT_REFUSALS:-}" ]; then
  echo "FAIL: $refused mints were not answered 200 (set EXPECT_REFUSALS=1 for an overload run)" >&2
  failed=1
fi

[ -z "${METRICS:-}" ] || curl -fs "$url/metrics" >"$METRICS" || echo "WARN: /metrics did not answer" >&2

# After the run: the broker's peak memory, and one mint right away (recovery).
echo "broker peak RSS: $(awk '/VmHWM/ { print $2, $3 }' "/proc/$broker_pid/status")"
token=$(head -n 1 "$work/tokens.txt")
after=$(curl -s -o /dev/null -w '%{http_code} %{time_total}' \
  -X POST "$url/v1/mint-oidc-jwt" -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
  -d '{"service":"s3","scope_path":"load/jobs/"}')
echo "first mint after the run: HTTP ${after% *} in ${after#* } s"
if [ "${after% *}" != 200 ]; then
  echo "FAIL: the broker did not recover: the first mint after the run got HTTP ${after% *}" >&2
  failed=1
fi
exit "${failed:-0}"
