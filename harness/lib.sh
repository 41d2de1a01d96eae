# Shared by the harness scripts (source it from the repository's root):
# output helpers, free ports, the binaries under test, and a CA made on the
# spot with openssl.

step() { printf '\n== %s\n' "$*"; }
ok() { printf 'ok: %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
json() { python3 -c "import json, sys; print(json.load(sys.stdin)$1)"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# with_scratch: sets work (a scratch folder) and pids (the processes the
# script starts); at exit, whatever happened, every process in pids is
# stopped (TERM, then waited for) and work removed.
with_scratch() {
  work=$(mktemp -d)
  pids=()
  trap 'for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done; rm -rf "$work"' EXIT
}

# wait_for URL: until URL answers 2xx, 15 s at most (trusting the CA file in
# $ca, when the script set one).
wait_for() {
  for _ in $(seq 150); do curl -fs ${ca:+--cacert "$ca"} -o /dev/null "$1" && return 0; sleep 0.1; done
  fail "$1 did not answer"
}

# Sets broker_bin and daemon_bin: from AGENTKEYS_BIN_DIR when set (CI reuses
# the binaries of its test build), else from a release build made now.
build_binaries() {
  local bin_dir=${AGENTKEYS_BIN_DIR:-}
  if [ -z "$bin_dir" ]; then
    cargo build --release --quiet --workspace
    bin_dir=$PWD/target/release
  fi
  broker_bin=$bin_dir/agentkeys-broker
  daemon_bin=$bin_dir/agentkeys
}

# make_tls DIR: a CA (DIR/ca.pem) and a certificate it signed for localhost
# and 127.0.0.1: DIR/fullchain.pem (the certificate, then the CA) and its
# key DIR/privkey.pem.
make_tls() {
  local dir=$1
  mkdir -p "$dir"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=agentkeys harness CA" -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=localhost" \
    -keyout "$dir/privkey.pem" -out "$dir/leaf.csr" 2>/dev/null
  printf 'subjectAltName = DNS:localhost, IP:127.0.0.1\n' >"$dir/san.cnf"
  openssl x509 -req -in "$dir/leaf.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile "$dir/san.cnf" -out "$dir/leaf.pem" 2>/dev/null
  cat "$dir/leaf.pem" "$dir/ca.pem" >"$dir/fullchain.pem"
}

# start_nginx PORT TLS_DIR UPSTREAM...: nginx (in $work/nginx, added to
# pids) on 127.0.0.1:PORT before the brokers at UPSTREAM... (host:port),
# with docs/deploy/nginx.conf as shipped but for its ports, name and
# certificate paths (TLS_DIR from make_tls); each request's method, path,
# status and upstream logged to $work/nginx/access.log. Waits until it
# passes /readyz.
start_nginx() {
  local port=$1 tls=$2 servers="" upstream
  shift 2
  for upstream in "$@"; do servers+="server $upstream max_fails=1 fail_timeout=5s;\n    "; done
  sed -e "s#server 127.0.0.1:8080;#${servers%\\n    }#" \
      -e "s#listen 443 ssl;#listen 127.0.0.1:$port ssl;#" \
      -e "s#server_name broker.example.com;#server_name localhost;#" \
      -e "s#/etc/ssl/agentkeys/#$tls/#g" \
      docs/deploy/nginx.conf >"$work/agentkeys.conf"
  grep -q "server $1 " "$work/agentkeys.conf" && grep -q "$tls/fullchain.pem" "$work/agentkeys.conf" \
    || fail "docs/deploy/nginx.conf no longer has the values this harness replaces"
  mkdir -p "$work/nginx"
  cat >"$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 1024; }
http {
  log_format upstream '\$request_method \$uri \$status \$upstream_addr';
  access_log $work/nginx/access.log upstream;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  include $work/agentkeys.conf;
}
CONF
  nginx -t -c "$work/nginx.conf" -e "$work/nginx/error.log" 2>"$work/nginx-test.log" \
    || { cat "$work/nginx-test.log"; fail "nginx refuses the config"; }
  nginx -c "$work/nginx.conf" -e "$work/nginx/error.log" -g 'daemon off;' &
  pids+=($!)
  for _ in $(seq 150); do
    curl -fs --cacert "$tls/ca.pem" -o /dev/null "https://localhost:$port/readyz" && return 0
    sleep 0.1
  done
  fail "nginx does not pass /readyz"
}
