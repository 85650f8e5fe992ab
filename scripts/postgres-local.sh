#!/usr/bin/env bash
# A PostgreSQL server on this machine, for the tests of `smallvit search --storage` (docs/search.md) and for trying it.
#
#   scripts/postgres-local.sh start    # idempotent: installs the Debian package if missing, initdb, starts, makes
#                                      # the database smallvit_test; prints `export SMALLVIT_TEST_POSTGRES=<URL>`
#   scripts/postgres-local.sh stop     # stops the server this script started
#   scripts/postgres-local.sh status   # the URL, exit 1 when not running
#
# Needs root (to install, and to run the server as the `postgres` user: initdb refuses root). The cluster lives in
# $SMALLVIT_PG_DIR (default /var/lib/smallvit-postgres), listens on 127.0.0.1:$SMALLVIT_PG_PORT (default 5433) and
# trusts local connections: a throw-away test server, never one for real data.
set -euo pipefail

DIR=${SMALLVIT_PG_DIR:-/var/lib/smallvit-postgres}
PORT=${SMALLVIT_PG_PORT:-5433}
DB=smallvit_test
URL="postgresql+psycopg://postgres@127.0.0.1:$PORT/$DB"

die() { echo "postgres-local: $*" >&2; exit 1; }

bin() {  # the server's programs: Debian keeps them under /usr/lib/postgresql/<version>/bin
  local d
  for d in /usr/lib/postgresql/*/bin; do [ -x "$d/pg_ctl" ] && { echo "$d"; return; }; done
  command -v pg_ctl >/dev/null && dirname "$(command -v pg_ctl)" && return
  return 1
}

as_pg() { runuser -u postgres -- "$@"; }

up() { [ -f "$DIR/data/postmaster.pid" ] && as_pg "$(bin)/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; }

start() {
  [ "$(id -u)" -eq 0 ] || die "run as root (it installs PostgreSQL and runs it as the postgres user)"
  if ! bin >/dev/null; then
    echo "postgres-local: installing postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
  fi
  local B; B=$(bin) || die "no pg_ctl after installing postgresql"
  if ! up; then
    mkdir -p "$DIR" && chown postgres: "$DIR"
    [ -f "$DIR/data/PG_VERSION" ] || as_pg "$B/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 >/dev/null
    as_pg "$B/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 \
      -o "-p $PORT -c listen_addresses=127.0.0.1 -k $DIR" start >/dev/null || die "did not start; see $DIR/server.log"
  fi
  as_pg "$B/psql" -h 127.0.0.1 -p "$PORT" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$DB'" |
    grep -q 1 || as_pg "$B/createdb" -h 127.0.0.1 -p "$PORT" -U postgres "$DB"
  echo "postgres-local: up; export SMALLVIT_TEST_POSTGRES=$URL"
}

stop() {
  if up; then as_pg "$(bin)/pg_ctl" -D "$DIR/data" -m fast -w stop >/dev/null; fi
  echo "postgres-local: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if up; then echo "$URL"; else echo "postgres-local: not running"; exit 1; fi ;;
  url) echo "$URL" ;;
  *) echo "usage: $0 start|stop|status|url" >&2; exit 2 ;;
esac
