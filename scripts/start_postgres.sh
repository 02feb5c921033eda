#!/usr/bin/env bash
# A throwaway PostgreSQL for MLflow on 127.0.0.1, for the tests and CI (tests/test_mlflow_server.py).
#
#   scripts/start_postgres.sh          # installs Debian's postgresql if missing, starts it, prints where the URI is
#   scripts/start_postgres.sh --stop   # stops it (the data directory stays; the next start reuses it)
#
# Idempotent: a second call finds the server running and only prints. It listens on 127.0.0.1 only
# (port $MAMMO_RAY_PG_PORT, else the first free one from 5433), keeps its data and its Unix socket
# under $MAMMO_RAY_PG_DIR (default /tmp/mammo-ray-pg), and has one login role `mlflow` (may create
# databases: the tests make a fresh one per run) whose password is generated here, at run time.
# The connection URI, password included, goes to $MAMMO_RAY_PG_DIR/uri (mode 600), never to stdout.
# Runs as root (CI, containers: apt-get, and the server runs as the `postgres` user) or as a user
# that already has PostgreSQL's binaries (the server then runs as that user).
set -euo pipefail

PGROOT=${MAMMO_RAY_PG_DIR:-/tmp/mammo-ray-pg}
DATA=$PGROOT/data
SOCK=$PGROOT/sock
URI_FILE=$PGROOT/uri
LOG=$PGROOT/log/server.log

pg_bin() {  # the newest installed server's bin directory
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    [[ -n $dir && -x $dir/initdb ]] && echo "$dir"
}

as_owner() {  # run a server command as the data directory's owner (PostgreSQL refuses to run as root)
    if [[ $EUID -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

BIN=$(pg_bin || true)
if [[ ${1:-} == --stop ]]; then
    if [[ -n $BIN && -f $DATA/postmaster.pid ]]; then as_owner "$BIN/pg_ctl" -D "$DATA" -m fast -w stop; fi
    exit 0
fi

if [[ -z $BIN ]]; then
    if [[ $EUID -ne 0 ]]; then
        echo "start_postgres: PostgreSQL is not installed and this is not root: apt-get install postgresql" >&2
        exit 1
    fi
    started=$(date +%s)
    echo "start_postgres: installing Debian's postgresql (apt-get update; apt-get install) ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends postgresql >/dev/null
    echo "start_postgres: installed in $(( $(date +%s) - started )) s" >&2
    BIN=$(pg_bin) || { echo "start_postgres: postgresql installed but no initdb found" >&2; exit 1; }
fi

if [[ -f $URI_FILE && -f $DATA/postmaster.pid ]] && as_owner "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    echo "start_postgres: running ($(sed -E 's#//([^:]+):[^@]*@#//\1:***@#' "$URI_FILE")); URI in $URI_FILE" >&2
    echo "$URI_FILE"
    exit 0
fi

mkdir -p "$PGROOT"
chmod 711 "$PGROOT"  # the server's user traverses it; only the owner lists it or reads the URI file
if [[ ! -f $DATA/PG_VERSION ]]; then
    rm -rf "$DATA" "$SOCK" "$PGROOT/log"
    mkdir -p "$DATA" "$SOCK" "$PGROOT/log"
    chmod 700 "$DATA" "$SOCK" "$PGROOT/log"
    [[ $EUID -eq 0 ]] && chown postgres:postgres "$DATA" "$SOCK" "$PGROOT/log"
    # Local (socket) connections are trusted: the socket directory is 700, the server's user only
    # (and root). TCP on 127.0.0.1 needs the password (SCRAM).
    as_owner "$BIN/initdb" -D "$DATA" -U postgres -E UTF8 --auth-local=trust --auth-host=scram-sha-256 >/dev/null
fi

port=${MAMMO_RAY_PG_PORT:-}
if [[ -z $port ]]; then
    for port in $(seq 5433 5532); do port_in_use "$port" || break; done
fi
# listen_addresses=127.0.0.1: nothing but loopback. max_connections: an mlflow server's workers each
# hold a SQLAlchemy pool, and clients that use the postgresql:// URI directly hold their own.
as_owner "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 start \
    -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$SOCK -c max_connections=200" >/dev/null

password=$(od -An -N18 -tx1 /dev/urandom | tr -d ' \n')
psql_su() { as_owner "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK" -p "$port" -U postgres -d postgres "$@"; }
if [[ $(psql_su -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'mlflow'") == 1 ]]; then
    verb=ALTER
else
    verb=CREATE
fi
psql_su <<< "$verb ROLE mlflow WITH LOGIN CREATEDB PASSWORD '$password'"  # stdin: not in the process list
if [[ $(psql_su -tAc "SELECT 1 FROM pg_database WHERE datname = 'mlflow'") != 1 ]]; then
    psql_su -c "CREATE DATABASE mlflow OWNER mlflow"
fi

umask 077
echo "postgresql://mlflow:$password@127.0.0.1:$port/mlflow" > "$URI_FILE.tmp"
mv "$URI_FILE.tmp" "$URI_FILE"
echo "start_postgres: PostgreSQL $("$BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$port," \
     "data in $DATA, log $LOG; URI in $URI_FILE" >&2
echo "$URI_FILE"
