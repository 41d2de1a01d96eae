#!/usr/bin/env bash
# Instructions per mint, counted by callgrind: a figure that does not drift
# with the VM's speed, for comparing two builds of the mint path. Starts
# the broker under `valgrind --tool=callgrind` on a free loopback port with
# a fresh data directory (config/default.toml as shipped, so every gate
# and sink is on), makes one agent with a grant, warms up with $WARMUP
# mints, then counts the instructions of $MINTS mints sent by $WORKERS
# threads (harness/mint_burst.py), every thread of the broker included.
# Prints instructions per mint and the functions that take most of them.
# Loopback only; stops by itself. Needs valgrind (Debian package).
#
#   harness/mint-instructions.sh
#   MINTS=5000 WORKERS=32 harness/mint-instructions.sh
#   BROKER=/path/to/agentkeys-broker harness/mint-instructions.sh   # another build
#   KEEP=/tmp/mint.callgrind harness/mint-instructions.sh   # keep the profile
#                                     # (callgrind_annotate --inclusive=yes FILE)
#
# Counts exclude the kernel (system calls, TCP, the scheduler) and waiting:
# compare builds with it, and read seconds from harness/mint-load.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
. harness/lib.sh

MINTS=${MINTS:-2000}
WARMUP=${WARMUP:-300}
WORKERS=${WORKERS:-16}
command -v callgrind_control >/dev/null || { echo "valgrind is required (Debian package valgrind)" >&2; exit 2; }
if [ -z "${BROKER:-}" ]; then
  cargo build --release --quiet
  BROKER=./target/release/agentkeys-broker
fi

with_scratch
port=$(free_port)
url=http://127.0.0.1:$port
(umask 077; openssl rand -hex 32 >"$work/admin.token")
AGENTKEYS__SERVER__BIND="127.0.0.1:$port" \
AGENTKEYS__STORAGE__DATA_DIR="$work/data" \
AGENTKEYS__SECRETS__SEALING_KEY_FILE="$work/sealing.key" \
AGENTKEYS__ADMIN__TOKEN_FILE="$work/admin.token" \
AGENTKEYS__RATE_LIMIT__PER_SECOND=1000000 \
AGENTKEYS__RATE_LIMIT__BURST=1000000 \
AGENTKEYS__ACTORS__SEND_TIMEOUT_MS=30000 \
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$work/callgrind.out" \
  "$BROKER" serve --config config/default.toml >"$work/broker.log" 2>&1 &
broker=$!
pids+=("$broker")
for _ in $(seq 600); do curl -fs -o /dev/null "$url/readyz" && break; sleep 0.2; done
curl -fs -o /dev/null "$url/readyz" || { cat "$work/broker.log" >&2; fail "the broker under callgrind did not become ready"; }

"$BROKER" load prepare --broker-url "$url" --admin-token-file "$work/admin.token" \
  --agents 1 --grant "s3:load/" --out "$work/tokens.txt" >/dev/null
burst() {
  python3 harness/mint_burst.py "$url/v1/mint-oidc-jwt" --session "$(head -n 1 "$work/tokens.txt")" \
    --body '{"service":"s3","scope_path":"load/jobs/"}' --count "$1" --workers "$WORKERS" --timeout 60
}
burst "$WARMUP" >/dev/null
callgrind_control --instr=on "$broker" >/dev/null || fail "callgrind did not start counting"
answers=$(burst "$MINTS")
callgrind_control --instr=off "$broker" >/dev/null || fail "callgrind did not stop counting"
kill -TERM "$broker"
wait "$broker" || true
pids=()

ok_count=$(echo "$answers" | json '["statuses"].get("200", 0)')
[ "$ok_count" = "$MINTS" ] || fail "not every mint was answered 200: $answers"
total=$(callgrind_annotate "$work/callgrind.out" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
[[ "$total" =~ ^[0-9]+$ ]] && [ "$total" -gt 0 ] || fail "callgrind counted nothing (is valgrind's callgrind_annotate working?)"
echo "# callgrind, config/default.toml, one agent, $MINTS mints from $WORKERS threads"
echo "instructions per mint: $((total / MINTS))"
echo "# the functions with most instructions, themselves and what they call (inclusive, % of all):"
callgrind_annotate --inclusive=yes "$work/callgrind.out" 2>/dev/null |
  awk -v total="$total" '/^ *[0-9,]+ .*:/ && n < 40 { ir = $1; gsub(",", "", ir); $1 = ""; printf "%5.1f%% %s\n", 100 * ir / total, substr($0, 1, 150); n++ }'
[ -z "${KEEP:-}" ] || cp "$work/callgrind.out" "$KEEP"
