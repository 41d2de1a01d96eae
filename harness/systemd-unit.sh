#!/usr/bin/env bash
# The systemd unit of docs/deploy/ as an operator installs it: the binary
# copied to its place (here under a scratch root), the unit pointing at it,
# checked by `systemd-analyze verify` (syntax, directives, the executable)
# and scored by `systemd-analyze security --offline` (the hardening), which
# must stay under 2.0 ("OK"). Exits 0 only if both pass.
set -euo pipefail
cd "$(dirname "$0")/.."

source harness/lib.sh

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step "systemd-analyze"
command -v systemd-analyze >/dev/null || fail "systemd-analyze is not installed (Debian package systemd)"
ok "$(systemd-analyze --version | head -1)"

step "build, and install the binary"
build_binaries
install -D -m 0755 "$broker_bin" "$work/usr/local/bin/agentkeys-broker"
"$work/usr/local/bin/agentkeys-broker" --version >/dev/null || fail "the installed copy does not run"
sed "s#/usr/local/bin/agentkeys-broker#$work/usr/local/bin/agentkeys-broker#" \
  docs/deploy/agentkeys-broker.service >"$work/agentkeys-broker.service"
ok "$("$work/usr/local/bin/agentkeys-broker" --version) installed"

step "systemd-analyze verify"
systemd-analyze verify "$work/agentkeys-broker.service" >"$work/verify.txt" 2>&1 \
  || { cat "$work/verify.txt"; fail "the unit does not verify"; }
# verify also reports problems of other units on this host; only ours count.
if grep -i "agentkeys-broker.service" "$work/verify.txt"; then fail "the unit has warnings"; fi
ok "the unit verifies, no warning"

step "systemd-analyze security"
systemd-analyze security --offline=yes "$work/agentkeys-broker.service" >"$work/security.txt" 2>&1 \
  || { cat "$work/security.txt"; fail "systemd-analyze security failed"; }
score=$(grep -o 'Overall exposure level for agentkeys-broker.service: [0-9.]*' "$work/security.txt" | awk '{print $NF}')
[ -n "$score" ] || { cat "$work/security.txt"; fail "no exposure score"; }
python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) < 2.0 else 1)' "$score" \
  || { grep '✗' "$work/security.txt" | head -20; fail "exposure $score is not below 2.0"; }
ok "exposure level $score ($(grep -o 'Overall exposure level.*' "$work/security.txt" | awk '{print $(NF-1)}'))"

printf '\nsystemd unit: every step passed\n'
