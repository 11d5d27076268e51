#!/usr/bin/env bash
# The load tools the benchmarks use, installed when missing:
#   wrk     (Debian's package) for saturation;
#   vegeta  (Go module, built with the machine's Go into .cache/bin) for fixed-rate,
#           open-loop load, so a slow server cannot hide its latency by slowing the client.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
if ! command -v wrk >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "bench-tools: wrk missing; apt-get install wrk" >&2; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
if [ ! -x "$root/.cache/bin/vegeta" ]; then
  command -v go >/dev/null || { echo "bench-tools: Go is needed to build vegeta" >&2; exit 1; }
  GOBIN="$root/.cache/bin" go install github.com/tsenart/vegeta/v12@v12.12.0
fi
