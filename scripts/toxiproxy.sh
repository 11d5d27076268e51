#!/usr/bin/env bash
# Toxiproxy (Shopify's TCP fault proxy) on 127.0.0.1 for the fault-injection tests, no Docker.
#
#   scripts/toxiproxy.sh install                build toxiproxy-server into .cache/bin when missing
#   scripts/toxiproxy.sh start  [DIR] [PORT]   start the API server on 127.0.0.1:PORT, wait for GET /version
#   scripts/toxiproxy.sh stop   [DIR]          stop, leave no process behind
#   scripts/toxiproxy.sh status [DIR]
#   scripts/toxiproxy.sh url    [DIR] [PORT]   print http://127.0.0.1:PORT (the HTTP API)
#
# DIR (pid file toxiproxy.pid, log toxiproxy.log) defaults to .data/toxiproxy, PORT to
# $TOXIPROXY_PORT or 8474. The server is built with `go install` from the Go module proxy
# (github.com/Shopify/toxiproxy/v2/cmd/server at TOXIPROXY_VERSION, default below) and renamed
# to .cache/bin/toxiproxy-server; one of that version on PATH is used as it is. Proxies and
# toxics live in the server's memory only: tests create them through the HTTP API
# (tests/fault/toxiproxy.py). LOG_LEVEL (zerolog: debug, info, warn...) reaches the server.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
TOXIPROXY_VERSION=${TOXIPROXY_VERSION:-v2.12.0}  # the newest the Go module proxy serves here
module=github.com/Shopify/toxiproxy/v2
bin="$root/.cache/bin"
die() { echo "toxiproxy.sh: $*" >&2; exit 1; }
say() { echo "toxiproxy.sh: $*" >&2; }

server_bin() {  # the pinned server: ours in .cache/bin, else one on PATH of that version
  local s
  for s in "$bin/toxiproxy-server" "$(command -v toxiproxy-server 2>/dev/null || true)"; do
    # Release builds print the version without its "v"; ours is built the same way (below).
    [ -n "$s" ] && [ -x "$s" ] \
      && [ "$("$s" -version 2>/dev/null)" = "toxiproxy-server version ${TOXIPROXY_VERSION#v}" ] \
      && { echo "$s"; return 0; }
  done
  return 1
}

install() {
  server_bin >/dev/null && return 0
  command -v go >/dev/null || die "toxiproxy-server $TOXIPROXY_VERSION missing and no Go toolchain to build it"
  say "building toxiproxy-server $TOXIPROXY_VERSION with go install (once; cached in .cache/bin)"
  local started=$SECONDS work
  mkdir -p "$bin"
  # go install names the binary after the package's folder, "server": build it in a folder of
  # its own and rename it. -X sets the version that -version and GET /version report, as
  # upstream's release builds do.
  work=$(mktemp -d "$bin/.toxiproxy.XXXXXX")
  GOBIN="$work" GOFLAGS=-mod=mod go install \
      -ldflags "-s -w -X $module.Version=${TOXIPROXY_VERSION#v}" "$module/cmd/server@$TOXIPROXY_VERSION" \
    || { rm -rf "$work"; die "go install $module/cmd/server@$TOXIPROXY_VERSION failed"; }
  mv -f "$work/server" "$bin/toxiproxy-server"
  rm -rf "$work"
  server_bin >/dev/null || die "go install did not produce toxiproxy-server $TOXIPROXY_VERSION"
  say "toxiproxy-server $TOXIPROXY_VERSION ready in $((SECONDS - started)) s ($bin/toxiproxy-server)"
}

alive() {  # alive PID: the process exists and is not a zombie (an exited child not yet reaped)
  local st; [[ $1 =~ ^[0-9]+$ ]] && st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }; [[ $st != Z* ]]
}

pid_of() {  # prints the pid if the server of DIR runs
  local pid
  pid=$(cat "$1/toxiproxy.pid" 2>/dev/null) || return 1
  # A stale pid file may name a pid since reused by another program.
  [ -n "$pid" ] && alive "$pid" && grep -qa toxiproxy-server "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

run_port() {  # run_port PID: the API port it listens on, from its command line
  tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | sed -n '/^-port$/{n;p;}'
}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ready() {  # ready PORT: GET /version answers 200
  local u="http://127.0.0.1:$1/version"
  if command -v curl >/dev/null; then [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$u")" = 200 ]
  else python3 -c 'import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=2)' "$u" 2>/dev/null; fi
}

start() {
  local dir=${1:-$root/.data/toxiproxy} port=${2:-${TOXIPROXY_PORT:-8474}} pid server
  server=$(server_bin) || die "toxiproxy-server $TOXIPROXY_VERSION is not built: run scripts/toxiproxy.sh install"
  mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
  if pid=$(pid_of "$dir"); then
    [ "$(run_port "$pid")" = "$port" ] \
      || die "already running in $dir on port $(run_port "$pid"), not $port; stop it first"
    say "already running (pid $pid) on 127.0.0.1:$port in $dir"; return 0
  fi
  # The server keeps running when its API port is taken (it only logs the error): check first.
  port_busy "$port" && die "127.0.0.1:$port is already taken by another process; pick another PORT"
  rm -f "$dir/toxiproxy.pid"
  # setsid: a terminal's Ctrl-C reaches our scripts, which stop it.
  setsid "$server" -host 127.0.0.1 -port "$port" >>"$dir/toxiproxy.log" 2>&1 </dev/null &
  echo $! >"$dir/toxiproxy.pid"
  local deadline=$(( SECONDS + ${TOXIPROXY_START_TIMEOUT:-20} ))
  until ready "$port"; do
    if ! pid_of "$dir" >/dev/null; then
      tail -n 20 "$dir/toxiproxy.log" >&2; die "toxiproxy-server exited during start-up; log: $dir/toxiproxy.log"
    fi
    [ $SECONDS -lt $deadline ] || { stop "$dir"; die "no answer on 127.0.0.1:$port in time; log: $dir/toxiproxy.log"; }
    sleep 0.1
  done
  if grep -q "Server finished with error" "$dir/toxiproxy.log"; then
    stop "$dir"; die "toxiproxy-server could not listen on 127.0.0.1:$port; log: $dir/toxiproxy.log"
  fi
  pid=$(pid_of "$dir") || die "127.0.0.1:$port answers, but our toxiproxy-server has exited; log: $dir/toxiproxy.log"
  say "toxiproxy-server $TOXIPROXY_VERSION ready on 127.0.0.1:$port (pid $pid, log $dir/toxiproxy.log)"
}

stop() {
  local dir=${1:-$root/.data/toxiproxy} pid
  [ -d "$dir" ] || return 0
  if pid=$(pid_of "$dir"); then
    # SIGTERM: the server closes its API and exits; its proxies' connections go with it.
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
      say "pid $pid did not exit in 5 s; killing it"; kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do alive "$pid" || break; sleep 0.1; done
    fi
  fi
  rm -f "$dir/toxiproxy.pid"
}

status() {
  local dir=${1:-$root/.data/toxiproxy} pid
  if pid=$(pid_of "$dir"); then echo "running (pid $pid, port $(run_port "$pid"))"; else echo "stopped"; exit 3; fi
}

url() {
  local dir=${1:-$root/.data/toxiproxy} port=${2:-} pid
  # Without PORT: the port of the server running in DIR, else the default.
  [ -n "$port" ] || ! pid=$(pid_of "$dir") || port=$(run_port "$pid")
  echo "http://127.0.0.1:${port:-${TOXIPROXY_PORT:-8474}}"
}

case "${1:-}" in
  install) install ;;  # build the server when missing (a fault-tools make target runs this up front)
  start|stop|status|url) cmd=$1; shift; "$cmd" "$@" ;;
  *) sed -n '2,15p' "$0"; exit 2 ;;
esac
