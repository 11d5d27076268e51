#!/usr/bin/env bash
# A real Prometheus Alertmanager on 127.0.0.1 for tests and local runs, no Docker.
#
#   scripts/alertmanager.sh install                 install Debian's prometheus-alertmanager when missing
#   scripts/alertmanager.sh start  [DIR] [PORT]   write DIR/alertmanager.yml if new, start, wait until ready
#   scripts/alertmanager.sh stop   [DIR]          stop, leave no process behind
#   scripts/alertmanager.sh status [DIR]
#   scripts/alertmanager.sh url    [DIR] [PORT]   print http://127.0.0.1:PORT
#
# DIR defaults to .data/alertmanager, PORT to $ALERTMANAGER_PORT or 59093. Clustering (gossip on
# 0.0.0.0:9094) is off; silences and the notification log are kept in DIR/data. The binary comes
# from Debian's prometheus-alertmanager package (installed when missing and root); whatever system
# instance that package may start on 9093 is not ours and never touched.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "alertmanager.sh: $*" >&2; exit 1; }

find_bin() {  # Debian names it prometheus-alertmanager; upstream's tarball, alertmanager
  command -v prometheus-alertmanager || command -v alertmanager || ls /usr/bin/prometheus-alertmanager
} 2>/dev/null

ensure_bin() {
  bin=$(find_bin) && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "alertmanager.sh: installing Debian's prometheus-alertmanager package" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus-alertmanager >/dev/null
  fi
  bin=$(find_bin) || die "prometheus-alertmanager not found; apt-get install prometheus-alertmanager"
}

alive() {  # alive PID: the process exists and is not a zombie (an exited child not yet reaped)
  local st; [[ $1 =~ ^[0-9]+$ ]] && st=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  st=${st##*) }; [[ $st != Z* ]]
}

pid_of() {  # prints the pid if the Alertmanager of DIR runs
  local pid
  pid=$(cat "$1/alertmanager.pid" 2>/dev/null) || return 1
  # A stale pid file may name a pid since reused by another program.
  [ -n "$pid" ] && alive "$pid" && grep -qa alertmanager "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

run_port() {  # run_port PID: the port it listens on, from its command line
  tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | sed -n 's/^--web.listen-address=127.0.0.1://p'
}
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
ready() {  # ready PORT: GET /-/ready answers 200 (503 while the config is not loaded yet)
  local u="http://127.0.0.1:$1/-/ready"
  if command -v curl >/dev/null; then [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$u")" = 200 ]
  else python3 -c 'import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=2)' "$u" 2>/dev/null; fi
}

start() {
  local dir=${1:-$root/.data/alertmanager} port=${2:-${ALERTMANAGER_PORT:-59093}} pid
  ensure_bin
  mkdir -p "$dir/data"; dir=$(cd "$dir" && pwd)
  if pid=$(pid_of "$dir"); then
    [ "$(run_port "$pid")" = "$port" ] \
      || die "already running in $dir on port $(run_port "$pid"), not $port; stop it first"
    echo "alertmanager.sh: already running (pid $pid) on 127.0.0.1:$port in $dir" >&2; return 0
  fi
  port_busy "$port" && die "127.0.0.1:$port is already taken by another process; pick another PORT"
  rm -f "$dir/alertmanager.pid"
  [ -f "$dir/alertmanager.yml" ] || cat >"$dir/alertmanager.yml" <<'CONF'
# Written by scripts/alertmanager.sh when missing (a test may bring its own): alerts go nowhere.
route:
  receiver: "null"
  group_by: ['alertname', 'rule']
  group_wait: 1s
  group_interval: 1s
  repeat_interval: 1h
receivers:
  - name: "null"
CONF
  # setsid: a terminal's Ctrl-C reaches our scripts, which stop it. Empty cluster address: no gossip.
  setsid "$bin" --config.file="$dir/alertmanager.yml" --storage.path="$dir/data" \
    --web.listen-address="127.0.0.1:$port" --cluster.listen-address= \
    >>"$dir/alertmanager.log" 2>&1 </dev/null &
  echo $! >"$dir/alertmanager.pid"
  local deadline=$(( SECONDS + ${ALERTMANAGER_START_TIMEOUT:-30} ))
  until ready "$port"; do
    if ! pid_of "$dir" >/dev/null; then
      tail -n 20 "$dir/alertmanager.log" >&2; die "alertmanager exited during start-up; log: $dir/alertmanager.log"
    fi
    [ $SECONDS -lt $deadline ] || { stop "$dir"; die "not ready on 127.0.0.1:$port in time; log: $dir/alertmanager.log"; }
    sleep 0.2
  done
  pid=$(pid_of "$dir") || die "127.0.0.1:$port answers, but our alertmanager has exited; log: $dir/alertmanager.log"
  echo "alertmanager.sh: Alertmanager $("$bin" --version 2>&1 | sed -n '1s/.*version \([^ ]*\).*/\1/p') ready on 127.0.0.1:$port (pid $pid, log $dir/alertmanager.log)" >&2
}

stop() {
  local dir=${1:-$root/.data/alertmanager} pid
  [ -d "$dir" ] || return 0
  if pid=$(pid_of "$dir"); then
    # SIGTERM: Alertmanager snapshots silences and the notification log, then exits.
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.2; done
    if alive "$pid"; then
      echo "alertmanager.sh: pid $pid did not exit in 20 s; killing it" >&2; kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$dir/alertmanager.pid"
}

status() {
  local dir=${1:-$root/.data/alertmanager} pid
  if pid=$(pid_of "$dir"); then echo "running (pid $pid, port $(run_port "$pid"))"; else echo "stopped"; exit 3; fi
}

url() {
  local dir=${1:-$root/.data/alertmanager} port=${2:-} pid
  # Without PORT: the port of the server running in DIR, else the default.
  [ -n "$port" ] || ! pid=$(pid_of "$dir") || port=$(run_port "$pid")
  echo "http://127.0.0.1:${port:-${ALERTMANAGER_PORT:-59093}}"
}

case "${1:-}" in
  install) ensure_bin ;;  # install the server when missing (make test does this up front)
  start|stop|status|url) cmd=$1; shift; "$cmd" "$@" ;;
  *) sed -n '2,13p' "$0"; exit 2 ;;
esac
