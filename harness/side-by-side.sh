#!/usr/bin/env bash
# The broker side by side with the peer (node oidc-provider, ../shared/bench/):
# $ROUNDS alternating rounds of $DURATION at $CONNECTIONS connections, so the
# machine's drift hits both; each broker round is one harness/mint-load.sh
# (fresh broker, every gate on, its own crypto-limit measurement). Prints one
# line per round and the median ratio. Loopback only; stops by itself.
#
#   harness/side-by-side.sh                    # 3 rounds, 10 s, 64 connections
#   ROUNDS=5 CONNECTIONS=256 harness/side-by-side.sh
#   BASELINE=/path/to/old/agentkeys-broker harness/side-by-side.sh
#                                              # each round also measures an older build
#
# Needs wrk, and Node from the npm registry the first time (peer.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
bench=${PEER_BENCH:-../shared/bench}
[ -x "$bench/peer.sh" ] || { echo "the peer is not at $bench (set PEER_BENCH)" >&2; exit 2; }

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
peer_pid=$(PORT=$port WORKERS=$(nproc) "$bench/peer.sh")
trap 'kill -- -"$peer_pid" 2>/dev/null || true' EXIT
cargo build --release --quiet

# The peer's JIT warms up over its first runs: one unmeasured run first,
# so every round compares against a warm peer.
wrk -t1 -c"$CONNECTIONS" -d"${WARMUP:-10s}" -s "$bench/peer/token.lua" "http://127.0.0.1:$port/token" >/dev/null

results=$(mktemp)
baseline=$(mktemp)
for round in $(seq "$ROUNDS"); do
  if [ -n "${BASELINE:-}" ]; then
    BROKER=$BASELINE DURATION=$DURATION CONNECTIONS=$CONNECTIONS harness/mint-load.sh |
      awk -v round="$round" '/^mints\/s/ { m = $4 } /^latency p99/ { p = $3 } /^broker CPU per answer/ { c = $5 }
        END { print round, m, p, c }' >>"$baseline"
  fi
  broker=$(DURATION=$DURATION CONNECTIONS=$CONNECTIONS harness/mint-load.sh)
  peer=$(wrk -t1 -c"$CONNECTIONS" -d"$DURATION" -s "$bench/peer/token.lua" "http://127.0.0.1:$port/token")
  python3 - "$round" "$broker" "$peer" >>"$results" <<'PY'
import re, sys
round_, broker, peer = sys.argv[1], sys.argv[2], sys.argv[3]
mints = float(re.search(r"mints/s \(200 only\): (\d+)", broker).group(1))
p99 = re.search(r"latency p99: ([\d.]+) ms", broker).group(1)
share = re.search(r"fraction of the crypto limit: (\d+)% \(\d+ of (\d+)", broker)
cpu = re.search(r"broker CPU per answer: (\d+) us", broker)
result = dict(kv.split("=") for kv in re.search(r"RESULT (.*)", peer).group(1).split())
if int(result["non2xx3xx"]) or int(result["sockerr"]):
    sys.exit(f"the peer answered {result['non2xx3xx']} errors, {result['sockerr']} socket errors")
rps = float(result["rps"])
print(f"{round_} {mints:.0f} {p99} {share.group(1)} {share.group(2)} {rps:.0f} {result['p99_ms']} {mints / rps:.2f} {cpu.group(1)}")
PY
done
echo "# $(nproc) cores; $CONNECTIONS connections, $DURATION a round; broker: every gate on (harness/mint-load.sh); peer: node oidc-provider, $(nproc) workers"
echo "| round | broker mints/s (p99 ms) | broker CPU per mint | share of its crypto limit | peer tokens/s (p99 ms) | ratio |"
echo "|---|---|---|---|---|---|"
awk '{ printf "| %s | %s (%s) | %s us | %s%% of %s | %s (%s) | %.2fx |\n", $1, $2, $3, $9, $4, $5, $6, $7, $8 }' "$results"
if [ -s "$baseline" ]; then
  echo "baseline ($BASELINE), same rounds:"
  echo "| round | mints/s (p99 ms) | CPU per mint |"
  echo "|---|---|---|"
  awk '{ printf "| %s | %s (%s) | %s us |\n", $1, $2, $3, $4 }' "$baseline"
fi
sort -n -k8 "$results" | awk '{ r[NR] = $8 } END { printf "median ratio: %.2fx over %d rounds\n", r[int((NR + 1) / 2)], NR }'
rm -f "$results" "$baseline"
