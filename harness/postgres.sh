#!/usr/bin/env bash
# A throwaway PostgreSQL for tests and local runs: Debian's server binaries
# (apt-get install postgresql), run as the postgres user (it refuses root),
# in a folder of its own, listening on a free loopback port only, with a
# password (SCRAM) for the one role it has.
#
#   harness/postgres.sh start DIR   initialise DIR and start the server;
#                                   prints `export AGENTKEYS_TEST_POSTGRES_URL=…` and
#                                   `…_CA=` (TLS is on offer, its CA made here)
#   harness/postgres.sh stop DIR    stop it (DIR stays; remove it yourself)
#   harness/postgres.sh restart DIR start it again as it was started
#                                   (same port, same data), stopped or not
#
#   eval "$(harness/postgres.sh start /tmp/pg)"
#   cargo test --workspace --all-features
#   harness/postgres.sh stop /tmp/pg
set -euo pipefail
cd "$(dirname "$0")/.."
source harness/lib.sh

command=${1:-}
dir=${2:-}
[ -n "$command" ] && [ -n "$dir" ] || fail "usage: harness/postgres.sh start|stop|restart DIR"

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
[ -n "$bin" ] && [ -x "$bin/initdb" ] || fail "no PostgreSQL server binaries (apt-get install postgresql)"

# As the postgres user when this is root; as oneself otherwise.
as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$command" in
  start)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    [ "$(id -u)" = 0 ] && chown postgres: "$dir"
    password=$(openssl rand -hex 16)
    port=$(free_port)
    # Secrets go through stdin and the environment, never arguments (which
    # any local user can read); paths as arguments, never inside code.
    write_private() { as_postgres sh -c 'umask 077; cat > "$1"' sh "$1"; }
    printf '%s\n' "$password" | write_private "$dir/pwfile"
    as_postgres "$bin/initdb" --pgdata "$dir/data" --username agentkeys --pwfile "$dir/pwfile" \
      --auth-host scram-sha-256 --auth-local scram-sha-256 --encoding UTF8 --no-instructions >/dev/null
    as_postgres rm -f "$dir/pwfile"
    # TLS on offer, with a certificate for localhost and 127.0.0.1 from a
    # CA made here (its key deleted once it signed): clients may connect
    # in plain or over verified TLS (AGENTKEYS_TEST_POSTGRES_CA).
    as_postgres sh -c 'umask 077; cd "$1" && mkdir tls && cd tls &&
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 \
        -subj "/CN=agentkeys test database CA" -keyout ca.key -out ca.pem 2>/dev/null &&
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null &&
      printf "subjectAltName=DNS:localhost,IP:127.0.0.1\n" > san.ext &&
      openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 7 \
        -extfile san.ext -out server.pem 2>/dev/null &&
      rm -f ca.key ca.srl server.csr san.ext && chmod 0644 ca.pem' sh "$dir"
    as_postgres "$bin/pg_ctl" --pgdata "$dir/data" --log "$dir/server.log" --wait --silent \
      --options "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories='$dir' -c ssl=on -c ssl_cert_file='$dir/tls/server.pem' -c ssl_key_file='$dir/tls/server.key'" start
    # A half-made server does not outlive a failure here.
    trap 'as_postgres "$bin/pg_ctl" --pgdata "$dir/data" --wait --silent --mode fast stop || true' ERR
    PGPASSWORD=$password "$bin/createdb" --host 127.0.0.1 --port "$port" --username agentkeys agentkeys
    trap - ERR
    url="postgres://agentkeys:$password@127.0.0.1:$port/agentkeys"
    printf '%s\n' "$url" | write_private "$dir/url"
    echo "export AGENTKEYS_TEST_POSTGRES_URL=$url"
    echo "export AGENTKEYS_TEST_POSTGRES_CA=$dir/tls/ca.pem"
    ;;
  stop)
    as_postgres "$bin/pg_ctl" --pgdata "$dir/data" --wait --silent --mode fast stop
    ;;
  restart)
    # pg_ctl restart takes the options of the last start (postmaster.opts).
    as_postgres "$bin/pg_ctl" --pgdata "$dir/data" --log "$dir/server.log" --wait --silent \
      --mode fast restart
    ;;
  *)
    fail "usage: harness/postgres.sh start|stop|restart DIR"
    ;;
esac
