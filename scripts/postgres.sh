#!/usr/bin/env bash
# A throwaway PostgreSQL for the tests and CI: `scripts/postgres.sh start DIR PORT` makes a cluster in DIR
# (initdb), starts it on 127.0.0.1:PORT, creates the database `apa` and prints its URL on the last line;
# `scripts/postgres.sh restart DIR` restarts it (fast: clients are cut off, as when a server restarts);
# `scripts/postgres.sh down DIR` stops it and `scripts/postgres.sh up DIR` starts it again as `start` did (an
# outage as long as the caller needs); `scripts/postgres.sh stop DIR` stops it (DIR is left for the caller to remove).
# Debian's postgresql is installed with apt-get when initdb is missing (as root, or through sudo). PostgreSQL
# refuses to run as root: run as root, the server runs as the `postgres` user, which owns DIR.
set -euo pipefail

usage() { echo "usage: $0 start DIR PORT | restart DIR | down DIR | up DIR | stop DIR" >&2; exit 2; }
[ $# -ge 2 ] || usage
cmd=$1 dir=$2

bindir() {
  local found
  found=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$found" ] && command -v initdb >/dev/null; then found=$(dirname "$(command -v initdb)"); fi
  echo "$found"
}

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else echo "postgres.sh: run as root (or install sudo) to install PostgreSQL: $*" >&2; exit 1
  fi
}

BIN=$(bindir)
if [ -z "$BIN" ]; then
  echo "postgres.sh: apt-get install postgresql" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  BIN=$(bindir)
fi

if [ "$(id -u)" -eq 0 ]; then
  run() { runuser -u postgres -- "$@"; }
  user=postgres
else
  run() { "$@"; }
  user=$(id -un)
fi

case "$cmd" in
  start)
    [ $# -eq 3 ] || usage
    port=$3
    mkdir -p "$dir"
    [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
    chmod 700 "$dir"
    run "$BIN/initdb" -D "$dir/data" -U "$user" -A trust --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 \
      || { cat "$dir/initdb.log" >&2; exit 1; }
    # the socket in DIR, not /var/run/postgresql (which may not exist or be writable); kept for `up`
    echo "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c full_page_writes=off" >"$dir/options"
    run "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 -o "$(cat "$dir/options")" start >&2 \
      || { cat "$dir/server.log" >&2; exit 1; }
    run "$BIN/createdb" -h 127.0.0.1 -p "$port" -U "$user" apa
    echo "postgresql://$user@127.0.0.1:$port/apa"
    ;;
  restart)
    run "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -m fast -w -t 30 restart >/dev/null 2>&1 \
      || { cat "$dir/server.log" >&2; exit 1; }
    ;;
  down)
    run "$BIN/pg_ctl" -D "$dir/data" -m fast -w -t 30 stop >/dev/null 2>&1 || { cat "$dir/server.log" >&2; exit 1; }
    ;;
  up)
    run "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 30 -o "$(cat "$dir/options")" start >/dev/null 2>&1 \
      || { cat "$dir/server.log" >&2; exit 1; }
    ;;
  stop)
    run "$BIN/pg_ctl" -D "$dir/data" -m fast -w stop >&2
    ;;
  *) usage ;;
esac
