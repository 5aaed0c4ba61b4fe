#!/usr/bin/env bash
# A throw-away PostgreSQL server for the tests, on 127.0.0.1 only.
#
#   eval "$(scripts/ci_postgres.sh start)"   # installs it (apt-get) if missing, starts it,
#                                            # prints the export lines for the tests
#   scripts/ci_postgres.sh stop              # stops it and removes its data directory
#
# The server runs as an unprivileged user (initdb refuses root), from a temporary data
# directory, with password (scram) authentication for a role that may create databases:
# the tests create their own databases, and check that a wrong password is refused.
set -euo pipefail
# runuser (and PostgreSQL's tools' helpers) live in sbin, which a minimal PATH (env -i, cron,
# some CI runners) leaves out
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
DIR="${SEARCHLAB_PG_DIR:-/tmp/searchlab-ci-postgres}"
PORT="${SEARCHLAB_PG_PORT:-55432}"
ROLE=searchlab
PASSWORD="${SEARCHLAB_PG_PASSWORD:-searchlab-ci}"

bindir() {
  local found
  found="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  [ -n "$found" ] && [ -x "$found/initdb" ] && echo "$found"
}

as_owner() {  # run a command as the data directory's owner
  if [ "$(id -u)" != 0 ]; then "$@"
  elif command -v runuser >/dev/null 2>&1; then runuser -u postgres -- "$@"
  else su -s /bin/sh postgres -c "$(printf '%q ' "$@")"; fi
}

start() {
  local bin
  bin="$(bindir || true)"
  if [ -z "$bin" ]; then
    echo "installing PostgreSQL from Debian's packages" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q postgresql >&2
    bin="$(bindir)"
  fi
  stop >/dev/null 2>&1 || true
  mkdir -p "$DIR"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$DIR"; fi
  local pwfile="$DIR/pw"
  echo "$PASSWORD" > "$pwfile"
  if [ "$(id -u)" = 0 ]; then chown postgres: "$pwfile"; fi
  as_owner "$bin/initdb" -D "$DIR/data" -U "$ROLE" --pwfile="$pwfile" \
    --auth=scram-sha-256 -E UTF8 >&2
  as_owner "$bin/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c max_connections=200" start >&2
  PGPASSWORD="$PASSWORD" "$bin/createdb" -h 127.0.0.1 -p "$PORT" -U "$ROLE" searchlab >&2
  echo "export SEARCHLAB_TEST_POSTGRES_URL=postgresql://$ROLE:$PASSWORD@127.0.0.1:$PORT/searchlab"
  echo "export SEARCHLAB_REQUIRE_POSTGRES=1"
}

stop() {
  local bin
  bin="$(bindir || true)"
  if [ -n "$bin" ] && [ -f "$DIR/data/postmaster.pid" ]; then
    as_owner "$bin/pg_ctl" -D "$DIR/data" -m fast -w stop >&2 || true
  fi
  rm -rf "$DIR"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
