#!/usr/bin/env bash
# A throwaway Chroma server on loopback for the knowledge tests.
#
#   eval "$(scripts/chroma.sh start)"     # prints `export` lines, nothing else on stdout
#   scripts/chroma.sh stop "$SWITCHBOARD_TEST_CHROMA_DIR"
#
# `start` runs `chroma run` (the console script of the chromadb package, from .venv when
# there is one) in the background on 127.0.0.1 on a free port, with its data in a new
# temporary folder, waits until it answers its heartbeat, and prints
#   export CHROMA_HOST=127.0.0.1
#   export CHROMA_PORT=PORT
#   export SWITCHBOARD_TEST_CHROMA_DIR=/tmp/switchboard-chroma.XXXXXX   (data, log and pid file)
#   export SWITCHBOARD_TEST_CHROMA_PID=PID
# `stop DIR` stops the server started with that folder and deletes the folder.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "chroma.sh: $*" >&2; }
die() { log "$*"; exit 1; }

chroma_bin() {
    if [[ -x .venv/bin/chroma ]]; then
        echo "$PWD/.venv/bin/chroma"
    elif command -v chroma >/dev/null 2>&1; then
        command -v chroma
    else
        die "no \`chroma\` command: install the chromadb package (scripts/install)"
    fi
}

python_bin() {
    if [[ -x .venv/bin/python ]]; then echo "$PWD/.venv/bin/python"; else command -v python3; fi
}

free_port() {
    "$(python_bin)" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

heartbeat() {
    "$(python_bin)" - "$1" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/v2/heartbeat", timeout=1) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

start() {
    local bin dir port pid
    bin=$(chroma_bin)
    dir=$(mktemp -d "${TMPDIR:-/tmp}/switchboard-chroma.XXXXXX")
    port=$(free_port)
    # setsid: the server outlives this script and is stopped by `stop`, not by our exit.
    setsid "$bin" run --path "$dir/data" --host 127.0.0.1 --port "$port" >"$dir/server.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$dir/pid"
    for _ in $(seq 1 120); do
        if heartbeat "$port"; then
            echo "export CHROMA_HOST=127.0.0.1"
            echo "export CHROMA_PORT=$port"
            echo "export SWITCHBOARD_TEST_CHROMA_DIR=$dir"
            echo "export SWITCHBOARD_TEST_CHROMA_PID=$pid"
            log "Chroma server $pid listening on 127.0.0.1:$port, data in $dir"
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$dir/server.log" >&2 || true
            rm -rf "$dir"
            die "the Chroma server exited before answering"
        fi
        sleep 0.5
    done
    kill "$pid" 2>/dev/null || true
    tail -n 20 "$dir/server.log" >&2 || true
    rm -rf "$dir"
    die "the Chroma server did not answer its heartbeat within 60 s"
}

stop() {
    local dir=${1:-${SWITCHBOARD_TEST_CHROMA_DIR:-}} pid
    [[ -n "$dir" && -d "$dir" ]] || die "usage: chroma.sh stop DIR (the SWITCHBOARD_TEST_CHROMA_DIR that start printed)"
    [[ "$(basename "$dir")" == switchboard-chroma.* ]] || die "$dir is not a folder this script made"
    if [[ -f "$dir/pid" ]]; then
        pid=$(cat "$dir/pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -rf "$dir"
    log "stopped"
}

case "${1:-}" in
    start) start ;;
    stop) shift; stop "$@" ;;
    *) die "usage: chroma.sh start | stop DIR" ;;
esac
