#!/usr/bin/env bash
# A real PostgreSQL server on 127.0.0.1 for tests and local runs, no Docker.
#
#   scripts/postgres.sh install                 install Debian's postgresql when missing
#   scripts/postgres.sh start  [DIR] [PORT]   initdb if new, start, wait until it answers, create database onoff
#   scripts/postgres.sh stop   [DIR]          fast shutdown, leave no process behind
#   scripts/postgres.sh status [DIR]
#   scripts/postgres.sh url    [DIR] [PORT]   print postgresql://postgres@127.0.0.1:PORT/onoff
#
# DIR defaults to .data/postgres, PORT to $POSTGRES_PORT or 55432. Our own cluster, port and
# socket folder: a system cluster (Debian's on 5432) is never touched. Binaries: the newest
# /usr/lib/postgresql/N/bin (Debian's postgresql package, installed when missing and root).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
db=onoff
die() { echo "postgres.sh: $*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }

find_bin() {  # prints the folder holding initdb, pg_ctl, psql, pg_isready
  local ctl
  ctl=$(printf '%s\n' /usr/lib/postgresql/*/bin/pg_ctl | sort -V | tail -n 1)
  [ -x "$ctl" ] || ctl=$(readlink -f "$(command -v pg_ctl)" 2>/dev/null) || return 1
  [ -x "$ctl" ] && [ -x "$(dirname "$ctl")/initdb" ] && dirname "$ctl"
}

ensure_bin() {
  bin=$(find_bin) && return 0
  if is_root && command -v apt-get >/dev/null; then
    echo "postgres.sh: installing Debian's postgresql package" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  fi
  bin=$(find_bin) || die "PostgreSQL server binaries (initdb, pg_ctl) not found; apt-get install postgresql"
}

# PostgreSQL refuses to run as root: as root, the cluster belongs to the postgres system user.
as_pg() {
  if is_root; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

pgdata_of() {  # prints the cluster folder of DIR if it has one (DIR/data, or where that link points)
  [ -e "$1/data" ] && readlink -f "$1/data"
}

# A new cluster goes to DIR/data when its owner can reach DIR. As root that is the postgres user,
# who cannot traverse folders such as /root or pytest's /tmp/pytest-of-root (mode 700, and pytest
# resets that mode on every run, so chmod-ing parents would not last). There the cluster lives in
# a folder of postgres's home instead, DIR/data being a link to it. Such a cluster whose DIR was
# removed (pytest deletes old temp folders) is pruned here, once it is stopped and 10 min old.
new_pgdata() {  # new_pgdata DIR -> prints the path for initdb
  local dir=$1 home base c origin
  rm -f "$dir/data"  # a dangling link to a cluster removed by hand
  if ! is_root; then echo "$dir/data"; return 0; fi
  getent passwd postgres >/dev/null || die "no 'postgres' system user to run the server as"
  chown postgres: "$dir"
  if as_pg test -w "$dir" -a -x "$dir"; then echo "$dir/data"; return 0; fi
  home=$(getent passwd postgres | cut -d: -f6); base=$home/onoff-events
  mkdir -p "$base"; chown postgres: "$base"
  for c in $(find "$base" -mindepth 1 -maxdepth 1 -name 'cluster.*' -mmin +10); do
    origin=$(cat "$c/origin" 2>/dev/null) || origin=/nonexistent
    [ "$(readlink -f "$origin/data" 2>/dev/null)" = "$c/data" ] && continue
    alive "$(pid_line "$c/data" 1)" && continue  # never one that runs
    rm -rf "$c"
  done
  c=$(mktemp -d "$base/cluster.XXXXXX"); echo "$dir" >"$c/origin"; chown -R postgres: "$c"
  ln -sfn "$c/data" "$dir/data"
  echo "postgres.sh: $dir is not reachable by the postgres user; cluster files in $c" >&2
  echo "$c/data"
}

pid_line() { sed -n "$2p" "$1/postmaster.pid" 2>/dev/null; }  # pid_line PGDATA N (1 pid, 4 port)
alive() {  # alive PID: the process exists and is not a zombie (pg_ctl status counts those)
  local st; [[ $1 =~ ^[0-9]+$ ]] && st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }; [[ $st != Z* ]]
}
running() { as_pg "$bin/pg_ctl" -D "$1" status >/dev/null 2>&1 && alive "$(pid_line "$1" 1)"; }
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ensure_db() {  # ensure_db PORT
  local psql=("$bin/psql" -X -q -h 127.0.0.1 -p "$1" -U postgres -d postgres)
  "${psql[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 \
    || "${psql[@]}" -c "CREATE DATABASE $db" >/dev/null \
    || die "could not create database $db on 127.0.0.1:$1"
}

start() {
  local dir=${1:-$root/.data/postgres} port=${2:-${POSTGRES_PORT:-55432}} pgdata sock
  ensure_bin
  mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  pgdata=$(pgdata_of "$dir") || pgdata=$(new_pgdata "$dir")
  local log=$dir/postgres.log
  if [ -f "$pgdata/PG_VERSION" ] && running "$pgdata"; then
    [ "$(pid_line "$pgdata" 4)" = "$port" ] \
      || die "already running in $dir on port $(pid_line "$pgdata" 4), not $port; stop it first"
    echo "postgres.sh: already running (pid $(pid_line "$pgdata" 1)) on 127.0.0.1:$port in $dir" >&2
    ensure_db "$port"; return 0
  fi
  port_busy "$port" && die "127.0.0.1:$port is already taken by another process; pick another PORT"
  if [ ! -f "$pgdata/PG_VERSION" ]; then
    as_pg "$bin/initdb" -D "$pgdata" -A trust -U postgres -E UTF8 --locale=C >>"$log" 2>&1 \
      || die "initdb failed; see $log"
    echo "include_if_exists = 'onoff.conf'" | as_pg tee -a "$pgdata/postgresql.conf" >/dev/null
  fi
  # The socket sits next to the cluster, in a folder of ours. A Unix socket path must fit in
  # 107 bytes: past that (deep temp folders) there is none; we connect over TCP anyway.
  sock=$(dirname "$pgdata"); [ ${#sock} -le 90 ] || sock=
  as_pg tee "$pgdata/onoff.conf" >/dev/null <<CONF
# Written by scripts/postgres.sh on every start.
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$sock'
max_connections = 100
log_line_prefix = '%m [%p] '
CONF
  # The log is opened here, so the server writes to it even where it could not open DIR itself.
  as_pg "$bin/pg_ctl" -D "$pgdata" -w -t "${POSTGRES_START_TIMEOUT:-60}" start >>"$log" 2>&1 \
    || { tail -n 20 "$log" >&2; die "server did not start; log: $log"; }
  local deadline=$(( SECONDS + 30 ))
  until "$bin/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres; do
    [ $SECONDS -lt $deadline ] || { stop "$dir"; die "no answer on 127.0.0.1:$port; log: $log"; }
    sleep 0.2
  done
  ensure_db "$port"
  echo "postgres.sh: PostgreSQL $(cat "$pgdata/PG_VERSION") ready on 127.0.0.1:$port (pid $(pid_line "$pgdata" 1), log $log)" >&2
}

stop() {
  local dir=${1:-$root/.data/postgres} pgdata
  pgdata=$(pgdata_of "$dir") || return 0
  bin=$(find_bin) || die "PostgreSQL binaries not found, cannot stop the cluster in $pgdata"
  running "$pgdata" || return 0
  # pg_ctl -w returns once the postmaster has removed its pid file, after all its children exit.
  as_pg "$bin/pg_ctl" -D "$pgdata" -m fast -w -t 60 stop >>"$dir/postgres.log" 2>&1 \
    || as_pg "$bin/pg_ctl" -D "$pgdata" -m immediate -w stop >>"$dir/postgres.log" 2>&1 \
    || die "could not stop the server of $pgdata; log: $dir/postgres.log"
}

status() {
  local dir=${1:-$root/.data/postgres} pgdata
  if pgdata=$(pgdata_of "$dir") && bin=$(find_bin) && running "$pgdata"; then
    echo "running (pid $(pid_line "$pgdata" 1), port $(pid_line "$pgdata" 4))"
  else
    echo "stopped"; exit 3
  fi
}

url() {
  local dir=${1:-$root/.data/postgres} port=${2:-} pgdata
  # Without PORT: the port of the server running in DIR, else the default.
  [ -n "$port" ] || { pgdata=$(pgdata_of "$dir") && port=$(pid_line "$pgdata" 4); } || true
  echo "postgresql://postgres@127.0.0.1:${port:-${POSTGRES_PORT:-55432}}/$db"
}

case "${1:-}" in
  install) ensure_bin ;;  # install the server when missing (make test does this up front)
  start|stop|status|url) cmd=$1; shift; "$cmd" "$@" ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
