#!/usr/bin/env bash
# Throwaway PostgreSQL for the integration tests (an MLflow server's backend store).
#
#   infra/test-services.sh postgres-start DIR [PORT]   prints the database URI as its last line
#   infra/test-services.sh postgres-stop DIR
#
# Idempotent: installs Debian's postgresql when it is missing (root only), creates a cluster in
# DIR the first time, starts it on 127.0.0.1:PORT (default 55432) unless it already runs, and
# creates the role and database if absent. The cluster listens on 127.0.0.1 only; local socket
# connections are trusted, TCP needs the password. Exit 3 means PostgreSQL cannot be had here
# (tests skip with the message); any other failure is a real error.
set -euo pipefail

ROLE=mocopipe
PASSWORD=mocopipe
DATABASE=mlflow

die() { echo "test-services: $1" >&2; exit "${2:-1}"; }

pg_bin() {  # the newest installed server binaries
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    [[ -n "$dir" && -x "$dir/pg_ctl" ]] && echo "$dir"
}

install_postgres() {
    [[ $(id -u) == 0 ]] || die "postgresql is not installed and we are not root: sudo apt-get install -y postgresql" 3
    command -v apt-get >/dev/null || die "postgresql is not installed and there is no apt-get" 3
    echo "test-services: installing postgresql (apt-get install -y postgresql)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q postgresql >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q postgresql >/dev/null 2>&1; } ||
        die "apt-get install -y postgresql failed" 3
}

as_owner() {  # initdb and the server refuse to run as root: use the postgres account then
    if [[ $(id -u) == 0 ]]; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

psql_admin() {  # over the cluster's own socket directory (trusted), as the superuser
    as_owner "$BIN/psql" -h "$DIR" -p "$PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtAc "$1"
}

running_port() {  # line 4 of postmaster.pid is the port of a running server
    as_owner "$BIN/pg_ctl" -D "$DIR" status >/dev/null 2>&1 && sed -n 4p "$DIR/postmaster.pid"
}

start() {
    BIN=$(pg_bin) || { install_postgres; BIN=$(pg_bin) || die "no pg_ctl after installing" 3; }
    mkdir -p "$DIR"
    if [[ $(id -u) == 0 ]]; then chown postgres:postgres "$DIR"; fi
    chmod 700 "$DIR"
    if [[ ! -f "$DIR/PG_VERSION" ]]; then
        as_owner "$BIN/initdb" -D "$DIR" -U postgres --no-locale -E UTF8 \
            --auth-local=trust --auth-host=scram-sha-256 >"$DIR.initdb.log" 2>&1 ||
            die "initdb failed: $(tail -n 5 "$DIR.initdb.log")"
    fi
    local port
    if port=$(running_port); then
        PORT=$port
    else
        as_owner "$BIN/pg_ctl" -D "$DIR" -l "$DIR/server.log" -w -t 60 \
            -o "-h 127.0.0.1 -p $PORT -k $DIR" start >/dev/null ||
            die "postgres did not start: $(tail -n 5 "$DIR/server.log")"
    fi
    if [[ -z $(psql_admin "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'") ]]; then
        psql_admin "CREATE ROLE $ROLE LOGIN PASSWORD '$PASSWORD'"
    fi
    if [[ -z $(psql_admin "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'") ]]; then
        psql_admin "CREATE DATABASE $DATABASE OWNER $ROLE"
    fi
    echo "postgresql://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DATABASE"
}

stop() {
    BIN=$(pg_bin) || exit 0
    [[ -f "$DIR/PG_VERSION" ]] || exit 0
    if running_port >/dev/null; then
        as_owner "$BIN/pg_ctl" -D "$DIR" -m fast -w -t 60 stop >/dev/null
    fi
}

command=${1:-}
DIR=${2:-}
PORT=${3:-55432}
[[ -n "$DIR" ]] || die "usage: $0 postgres-start|postgres-stop DIR [PORT]" 2
DIR=$(realpath -m "$DIR")  # the socket directory (-k) must be absolute
case "$command" in
    postgres-start) start ;;
    postgres-stop) stop ;;
    *) die "usage: $0 postgres-start|postgres-stop DIR [PORT]" 2 ;;
esac
