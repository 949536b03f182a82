#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests marked `postgres`.
#
#   eval "$(scripts/postgres.sh start)"     # prints two `export` lines, nothing else on stdout
#   scripts/postgres.sh stop "$SWITCHBOARD_TEST_POSTGRES_DIR"
#
# `start` installs Debian's postgresql if it is missing, creates a cluster in a new
# temporary folder, starts it on 127.0.0.1 on a free port, creates a user (allowed to
# create databases: each test gets a fresh one) and a database, and prints
#   export SWITCHBOARD_TEST_POSTGRES_URL=postgresql+asyncpg://USER:PASS@127.0.0.1:PORT/DB
#   export SWITCHBOARD_TEST_POSTGRES_DIR=/tmp/switchboard-pg.XXXXXX
#   export SWITCHBOARD_TEST_PG_DIR=/tmp/switchboard-pg.XXXXXX   (same folder, shorter name)
# `stop DIR` stops that server and deletes the folder. Works as root (the server runs
# as the postgres user) or as an ordinary user; needs no terminal and no stdin.
set -euo pipefail

USER_NAME=switchboard
DB_NAME=switchboard

log() { echo "postgres.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# The newest installed server's bin folder (Debian keeps them out of PATH).
pg_bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$dir" && -x "$dir/initdb" ]]; then
        echo "$dir"
    elif command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
    fi
}

install_postgres() {
    [[ $(id -u) -eq 0 ]] || die "PostgreSQL is not installed and this is not root: apt-get install postgresql"
    command -v apt-get >/dev/null 2>&1 || die "PostgreSQL is not installed and there is no apt-get"
    log "installing postgresql (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null >/dev/null
    apt-get install -y -qq --no-install-recommends postgresql </dev/null >/dev/null
}

# Run a command as the user who owns the cluster (initdb refuses to run as root).
as_owner() {
    if [[ $(id -u) -eq 0 ]]; then
        if command -v runuser >/dev/null 2>&1; then
            runuser -u postgres -- "$@"
        else
            su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
        fi
    else
        "$@"
    fi
}

free_port() {
    local python
    for python in python3 python; do
        if command -v "$python" >/dev/null 2>&1; then
            "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
            return
        fi
    done
    # No Python: try ports until one refuses a connection.
    local port
    for _ in $(seq 1 200); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    die "no free port found"
}

start() {
    local bin dir port password
    bin=$(pg_bin)
    if [[ -z "$bin" ]]; then
        install_postgres
        bin=$(pg_bin)
        [[ -n "$bin" ]] || die "postgresql installed but initdb not found"
    fi
    if [[ $(id -u) -eq 0 ]] && ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi

    # /tmp, not $TMPDIR: the postgres user must be able to reach the folder.
    dir=$(mktemp -d /tmp/switchboard-pg.XXXXXX)
    chmod 755 "$dir"
    [[ $(id -u) -eq 0 ]] && chown postgres: "$dir"
    password=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
    printf '%s\n' "$password" >"$dir/pwfile"
    [[ $(id -u) -eq 0 ]] && chown postgres: "$dir/pwfile"
    chmod 600 "$dir/pwfile"

    # Superuser reaches the server only through the socket in $dir; TCP needs a password.
    if ! as_owner "$bin/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --no-locale \
        >"$dir/initdb.log" 2>&1; then
        cat "$dir/initdb.log" >&2
        rm -rf "$dir"
        die "initdb failed"
    fi

    local tries
    for tries in 1 2 3 4 5; do
        port=$(free_port)
        # fsync off etc.: a throwaway test server trades durability for speed. Autovacuum
        # off: its worker (the superuser's) in a test's database made that test's
        # `DROP DATABASE ... WITH (FORCE)` fail, as the test role may not end it.
        if as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 -c autovacuum=off" \
            start >/dev/null 2>&1; then
            break
        fi
        if [[ $tries -eq 5 ]]; then
            tail -n 20 "$dir/server.log" >&2 || true
            rm -rf "$dir"
            die "the server did not start"
        fi
    done

    as_owner "$bin/psql" -h "$dir" -p "$port" -U postgres -d postgres -qAtX -v ON_ERROR_STOP=1 >/dev/null <<SQL
CREATE ROLE $USER_NAME LOGIN CREATEDB PASSWORD '$password';
CREATE DATABASE $DB_NAME OWNER $USER_NAME;
SQL
    rm -f "$dir/pwfile"
    echo "$port" >"$dir/port"

    echo "export SWITCHBOARD_TEST_POSTGRES_URL=postgresql+asyncpg://$USER_NAME:$password@127.0.0.1:$port/$DB_NAME"
    echo "export SWITCHBOARD_TEST_POSTGRES_DIR=$dir"
    # The same folder under the name scripts/test uses.
    echo "export SWITCHBOARD_TEST_PG_DIR=$dir"
}

stop() {
    local dir=${1:-${SWITCHBOARD_TEST_POSTGRES_DIR:-${SWITCHBOARD_TEST_PG_DIR:-}}}
    [[ -n "$dir" ]] || die "usage: $0 stop DIR"
    [[ -d "$dir" ]] || { log "$dir does not exist; nothing to stop"; return 0; }
    # Refuse anything that does not look like a folder `start` made.
    [[ "$(basename "$dir")" == switchboard-pg.* ]] || die "$dir was not made by $0 start"
    local bin
    bin=$(pg_bin)
    if [[ -n "$bin" && -f "$dir/data/postmaster.pid" ]]; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w -t 30 stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
}

case "${1:-}" in
start) start ;;
stop) stop "${2:-}" ;;
*)
    echo "usage: $0 start | stop DIR" >&2
    exit 2
    ;;
esac
