#!/usr/bin/env bash
# Create the virtualenv and install the project with its test tools. Idempotent.
#   scripts/bootstrap.sh [PYTHON] [VENV]
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:-python3}
venv=${2:-.venv}

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "bootstrap: Python 3.11 or newer is needed (tried '$python'); set PYTHON=..." >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -m venv "$venv" 2>/dev/null; then
    # Debian's python3 lacks venv until python3-venv is installed.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$venv"; "$python" -m venv "$venv"
    else
      echo "bootstrap: '$python -m venv' failed; install your distribution's venv package" >&2
      exit 1
    fi
  fi
fi
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e '.[test]'
echo "bootstrap: $venv ready ($("$venv/bin/python" --version))" >&2
