#!/usr/bin/env bash
# A real Redis server on 127.0.0.1 for tests and local runs, no Docker.
#
#   scripts/redis.sh install                 install Debian's redis-server when missing
#   scripts/redis.sh start  [DIR] [PORT]   write DIR/redis.conf, start, wait until it answers PONG
#   scripts/redis.sh stop   [DIR]          shut down (the AOF is flushed), leave no process behind
#   scripts/redis.sh status [DIR]
#   scripts/redis.sh url    [DIR] [PORT]   print redis://127.0.0.1:PORT/0
#
# DIR defaults to .data/redis, PORT to $REDIS_PORT or 56379. Data is kept in DIR with an
# append-only file (fsync every second), so acknowledged writes survive a restart.
# redis-server comes from Debian's redis-server package, installed when missing and root;
# whatever system Redis that package may start on 6379 is not ours and never touched.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "redis.sh: $*" >&2; exit 1; }

ensure_bin() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "redis.sh: installing Debian's redis-server package" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
  fi
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
    || die "redis-server and redis-cli not found; apt-get install redis-server"
}

alive() {  # alive PID: the process exists and is not a zombie (an exited child not yet reaped)
  local st
  [[ $1 =~ ^[0-9]+$ ]] && st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }; [[ $st != Z* ]]
}

pid_of() {  # prints the pid if the server of DIR runs
  local dir=$1 pid
  [ -f "$dir/redis.pid" ] || return 1
  pid=$(cat "$dir/redis.pid")
  # A stale pid file may name a pid since reused by another program.
  [ -n "$pid" ] && alive "$pid" && grep -q redis "/proc/$pid/comm" 2>/dev/null || return 1
  echo "$pid"
}

conf_port() { sed -n 's/^port //p' "$1/redis.conf" 2>/dev/null; }  # conf_port DIR
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ping() { [ "$(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null)" = PONG ]; }

start() {
  local dir=${1:-$root/.data/redis} port=${2:-${REDIS_PORT:-56379}} pid
  ensure_bin
  mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  if pid=$(pid_of "$dir"); then
    [ "$(conf_port "$dir")" = "$port" ] \
      || die "already running in $dir on port $(conf_port "$dir"), not $port; stop it first"
    echo "redis.sh: already running (pid $pid) on 127.0.0.1:$port in $dir" >&2; return 0
  fi
  port_busy "$port" && die "127.0.0.1:$port is already taken by another process; pick another PORT"
  rm -f "$dir/redis.pid"
  cat >"$dir/redis.conf" <<CONF
# Written by scripts/redis.sh on every start.
bind 127.0.0.1
port $port
daemonize yes
pidfile "$dir/redis.pid"
logfile "$dir/redis.log"
dir "$dir"
appendonly yes
appendfsync everysec
save ""
CONF
  redis-server "$dir/redis.conf" >>"$dir/redis.log" 2>&1 </dev/null \
    || { tail -n 20 "$dir/redis.log" >&2; die "redis-server did not start; log: $dir/redis.log"; }
  # daemonize: the server forks, binds, writes its pid file, then answers LOADING until the AOF
  # is read. No pid file after 5 s, or a pid file without a process, means it has exited.
  local t0=$SECONDS timeout=${REDIS_START_TIMEOUT:-60}
  until pid=$(pid_of "$dir") && ping "$port"; do
    if { [ -f "$dir/redis.pid" ] || [ $SECONDS -ge $(( t0 + 5 )) ]; } && ! pid_of "$dir" >/dev/null; then
      tail -n 20 "$dir/redis.log" >&2; die "redis-server exited during start-up; log: $dir/redis.log"
    fi
    [ $SECONDS -lt $(( t0 + timeout )) ] || { stop "$dir"; die "no PONG on 127.0.0.1:$port in time; log: $dir/redis.log"; }
    sleep 0.2
  done
  echo "redis.sh: $(redis-server --version | cut -d' ' -f1-3) ready on 127.0.0.1:$port (pid $pid, log $dir/redis.log)" >&2
}

stop() {
  local dir=${1:-$root/.data/redis} pid
  [ -d "$dir" ] || return 0
  if pid=$(pid_of "$dir"); then
    # SIGTERM is Redis's own graceful shutdown: it flushes and fsyncs the AOF, then exits.
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      alive "$pid" || break
      sleep 0.2
    done
    if alive "$pid"; then
      echo "redis.sh: pid $pid did not exit in 20 s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$dir/redis.pid"
}

status() {
  local dir=${1:-$root/.data/redis} pid
  if pid=$(pid_of "$dir"); then echo "running (pid $pid, port $(conf_port "$dir"))"; else echo "stopped"; exit 3; fi
}

url() {
  local dir=${1:-$root/.data/redis} port=${2:-}
  # Without PORT: the port of the server running in DIR, else the default.
  [ -n "$port" ] || ! pid_of "$dir" >/dev/null || port=$(conf_port "$dir")
  echo "redis://127.0.0.1:${port:-${REDIS_PORT:-56379}}/0"
}

case "${1:-}" in
  install) ensure_bin ;;  # install the server when missing (make test does this up front)
  start|stop|status|url) cmd=$1; shift; "$cmd" "$@" ;;
  *) sed -n '2,13p' "$0"; exit 2 ;;
esac
