#!/usr/bin/env bash
# The alerts and the dashboard against real processes: promtool checks
# docs/ops/prometheus-rules.yml; a real Prometheus (Debian package
# `prometheus`) scrapes a running broker's admin listener with those rules
# loaded; a burst of mints past a small rate limit must set the
# rate-limit-saturation alert off, every rule must evaluate without error,
# and every expression of docs/ops/grafana-dashboard.json must run and name
# only metrics the broker serves (Grafana is not installed here).
# The admin listener serves https (a CA made here), as in production.
# Stops everything it started; exits 0 only if every step passed.
set -euo pipefail
cd "$(dirname "$0")/.."

source harness/lib.sh

with_scratch
ca="$work/tls/ca.pem"

tools=${AGENTKEYS_TOOLS:-$PWD/.ci/tools}
venv_python="$tools/venv/bin/python"
"$venv_python" -c 'import yaml' 2>/dev/null || { [ -x "$venv_python" ] || python3 -m venv "$tools/venv"; "$tools/venv/bin/pip" install --quiet --disable-pip-version-check pyyaml; }

step "promtool checks the rules"
command -v prometheus >/dev/null && command -v promtool >/dev/null \
  || fail "prometheus and promtool are not installed (Debian package prometheus)"
promtool check rules docs/ops/prometheus-rules.yml >"$work/promtool.txt" || { cat "$work/promtool.txt"; fail "promtool"; }
ok "$(prometheus --version 2>&1 | head -1); $(grep -o 'SUCCESS: [0-9]* rules found' "$work/promtool.txt")"

step "build the workspace"
build_binaries
ok "agentkeys-broker and agentkeys built"

step "a broker with an https admin listener and a small rate limit"
make_tls "$work/tls"
port=$(free_port); admin_port=$(free_port)
broker_url="http://127.0.0.1:$port"; admin_url="https://localhost:$admin_port"
AGENTKEYS__SERVER__BIND="127.0.0.1:$port" \
AGENTKEYS__SERVER__ADMIN_BIND="127.0.0.1:$admin_port" \
AGENTKEYS__SERVER__ADMIN_TLS__CERT_FILE="$work/tls/fullchain.pem" \
AGENTKEYS__SERVER__ADMIN_TLS__KEY_FILE="$work/tls/privkey.pem" \
AGENTKEYS__STORAGE__DATA_DIR="$work/data" \
AGENTKEYS__SECRETS__SEALING_KEY_FILE="$work/sealing.key" \
AGENTKEYS__OIDC__ISSUER="$broker_url" \
AGENTKEYS__RATE_LIMIT__PER_SECOND=1 \
AGENTKEYS__RATE_LIMIT__BURST=2 \
AGENTKEYS__LOG__FORMAT=json \
  "$broker_bin" serve --config config/default.toml 2>"$work/broker.log" &
pids+=($!)
wait_for "$broker_url/readyz"
wait_for "$admin_url/metrics"
first_line=$(head -1 "$work/broker.log")
python3 -c 'import json, sys; line = json.loads(sys.argv[1]); assert line["level"] and line["fields"]["message"], line' "$first_line" \
  || fail "log.format = json did not write JSON lines: $first_line"
ok "broker at $broker_url, /metrics at $admin_url; logs are JSON lines on stderr"

step "an agent that mints"
export AGENTKEYS_BROKER_URL="$broker_url" AGENTKEYS_ADMIN_URL="$admin_url" AGENTKEYS_CA_FILE="$work/tls/ca.pem"
export AGENTKEYS_STATE_DIR="$work/daemon" AGENTKEYS_ADMIN_TOKEN_FILE="$work/data/admin.token"
public_key=$("$daemon_bin" keygen | json '["public_key"]')
"$broker_bin" agent add measured --public-key "$public_key" >/dev/null
omni=$("$daemon_bin" login | json '["omni_account"]')
"$broker_bin" grant add --agent measured --service s3 --scope "bots/$omni/" >/dev/null
session=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["session"]["session_token"])' "$work/daemon/session.json")
ok "agent measured ($omni)"

step "a real Prometheus scrapes it every second, with the rules loaded"
prom_port=$(free_port)
cat >"$work/prometheus.yml" <<YAML
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $PWD/docs/ops/prometheus-rules.yml
scrape_configs:
  - job_name: agentkeys-broker
    scheme: https
    tls_config:
      ca_file: $work/tls/ca.pem
      server_name: localhost
    static_configs:
      - targets: ["127.0.0.1:$admin_port"]
YAML
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" >"$work/prometheus.log" 2>&1 &
pids+=($!)
prom="http://127.0.0.1:$prom_port"
wait_for "$prom/-/ready"
for _ in $(seq 100); do
  curl -fs "$prom/api/v1/query?query=up" | grep -q '"value":\[[0-9.]*,"1"\]' && break
  sleep 0.2
done
curl -fs "$prom/api/v1/query?query=up" | grep -q '"value":\[[0-9.]*,"1"\]' || fail "Prometheus never saw the broker up"
ok "Prometheus at $prom: target up"

step "mints past the rate limit set the saturation alert off"
mint() {
  curl -s -o /dev/null -w '%{http_code}\n' -X POST "$broker_url/v1/mint-oidc-jwt" \
    -H "Authorization: Bearer $session" -H 'Content-Type: application/json' \
    -d "{\"service\": \"s3\", \"scope_path\": \"bots/$omni/\"}"
}
state=""
for round in $(seq 30); do
  for _ in $(seq 10); do mint; done >>"$work/statuses.txt"
  state=$(curl -fs "$prom/api/v1/alerts" | python3 -c '
import json, sys
alerts = json.load(sys.stdin)["data"]["alerts"]
print(" ".join(sorted(a["state"] for a in alerts if a["labels"]["alertname"] == "AgentkeysRateLimitSaturation")))')
  [ -n "$state" ] && break
  sleep 1
done
[ -n "$state" ] || fail "AgentkeysRateLimitSaturation never went pending: $(sort "$work/statuses.txt" | uniq -c | tr '\n' ' ')"
ok "AgentkeysRateLimitSaturation is $state after $(wc -l <"$work/statuses.txt") mints ($(sort "$work/statuses.txt" | uniq -c | awk '{printf "%s×%s ", $1, $2}'))"

step "every rule evaluates without error"
curl -fs "$prom/api/v1/rules" | python3 -c '
import json, sys
groups = json.load(sys.stdin)["data"]["groups"]
rules = [r for g in groups for r in g["rules"]]
bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
assert rules and not bad, bad
print(len(rules), "rules, all healthy")' >"$work/rules.txt" || fail "a rule does not evaluate: $(cat "$work/rules.txt")"
ok "$(cat "$work/rules.txt")"

step "rules and dashboard: every selector names a served family and label values the broker emits"
curl -fs --cacert "$work/tls/ca.pem" "$admin_url/metrics" >"$work/metrics.txt"
"$venv_python" - "$prom" "$work/metrics.txt" docs/ops/grafana-dashboard.json docs/ops/prometheus-rules.yml <<'PY' || fail "a rule or a panel does not match the broker's metrics"
import json, re, sys, urllib.parse, urllib.request
import yaml

prom, metrics_file, dashboard_file, rules_file = sys.argv[1:]
text = open(metrics_file).read()
served = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
helped = {line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")}
assert served <= helped, f"families without HELP: {served - helped}"
samples = [line for line in text.splitlines() if line and not line.startswith("#")]

# Labels whose every value the broker serves from the start (a status or a
# sink appears only once it happened or exists).
PREREGISTERED = {"outcome", "stage", "answer", "result", "actor", "store"}

def check(where, expr):
    """Every selector names a served family; every matcher on a label the
    broker serves in full matches a served sample."""
    for name, braces in re.findall(r"\b((?:agentkeys|process)_[a-z_]+)(\{[^}]*\})?", expr):
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert family in served, f"{where}: {family} is not served"
        for label, value in re.findall(r'(\w+)="([^"]*)"', braces or ""):
            if label not in PREREGISTERED:
                continue
            assert any(s.startswith(name) and f'{label}="{value}"' in s for s in samples), \
                f'{where}: no {name} sample has {label}="{value}"'
    answer = json.load(urllib.request.urlopen(f"{prom}/api/v1/query?query={urllib.parse.quote(expr)}"))
    assert answer["status"] == "success", (where, answer)

rules = [r for g in yaml.safe_load(open(rules_file))["groups"] for r in g["rules"]]
for rule in rules:
    check(f"rule {rule['alert']}", rule["expr"])
panels = json.load(open(dashboard_file))["panels"]
for panel in panels:
    for target in panel["targets"]:
        expr = target["expr"].replace("$job", "agentkeys-broker").replace("$instance", ".*")
        check(f"panel {panel['title']!r}", expr)
build = json.load(urllib.request.urlopen(f"{prom}/api/v1/query?query=agentkeys_build_info"))["data"]["result"]
assert build and build[0]["metric"]["git_sha"] and build[0]["value"][1] == "1", build
print(f"{len(rules)} rules and {len(panels)} panels: every selector served, every label value emitted; "
      f"{len(served)} families, all with HELP; build {build[0]['metric']['version']} {build[0]['metric']['git_sha']}")
PY
ok "rules and dashboard checked against the broker's own metrics"

printf '\nprometheus: every step passed\n'
