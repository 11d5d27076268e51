#!/usr/bin/env bash
# Offline checks of the deployment files (no cluster, no Docker engine), and the tools they need.
#
#   scripts/deploy-check.sh [check]   tools, then tests/test_deploy.py: render every kustomize
#                                     overlay and validate it (kubernetes-validate, the CRD
#                                     schemas), promtool check + unit tests of the alert rules,
#                                     compose config, dashboard and metric names against the code
#   scripts/deploy-check.sh tools     install kustomize, promtool and a compose client when
#                                     missing (make test runs this up front, so no test spends
#                                     its time limit on it)
#   scripts/deploy-check.sh render    print the paths of the rendered overlays (.cache/deploy-check/)
#   scripts/deploy-check.sh lock      regenerate requirements.lock and requirements-build.lock
#   scripts/deploy-check.sh compose-rules  copy the PrometheusRule's groups to the compose
#                                     Prometheus (deploy/compose/prometheus/onoff-events.rules.yaml)
#
# kustomize: built with `go install` from the Go module proxy into .cache/bin (KUSTOMIZE_VERSION);
# promtool: Debian's `prometheus` package (installed when missing, as root); the compose client:
# Debian has no compose v2, so Docker's own Go module is built into .cache/bin/docker-compose
# (COMPOSE_VERSION) unless `docker compose` works. Rendered manifests and the extracted rules go
# to .cache/deploy-check/. PYTHON defaults to the project's venv.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
KUSTOMIZE_VERSION=${KUSTOMIZE_VERSION:-v5.8.2}  # v5.8.3 needs Go 1.27
COMPOSE_VERSION=${COMPOSE_VERSION:-v2.40.3}
PYTHON=${PYTHON:-$root/.venv/bin/python}
bin="$root/.cache/bin"
out="$root/.cache/deploy-check"
overlays=(dev prod)
die() { echo "deploy-check: $*" >&2; exit 1; }
say() { echo "deploy-check: $*" >&2; }

kustomize_bin() {  # the pinned kustomize: ours in .cache/bin, else one on PATH of that version
  local k
  for k in "$bin/kustomize" "$(command -v kustomize 2>/dev/null || true)"; do
    [ -n "$k" ] && [ -x "$k" ] && [ "$("$k" version 2>/dev/null)" = "$KUSTOMIZE_VERSION" ] \
      && { echo "$k"; return 0; }
  done
  return 1
}

ensure_kustomize() {
  kustomize_bin >/dev/null && return 0
  command -v go >/dev/null || die "kustomize $KUSTOMIZE_VERSION missing and no Go toolchain to build it"
  say "building kustomize $KUSTOMIZE_VERSION with go install (once; cached in .cache/bin)"
  local started=$SECONDS
  mkdir -p "$bin"
  GOBIN="$bin" GOFLAGS=-mod=mod go install "sigs.k8s.io/kustomize/kustomize/v5@$KUSTOMIZE_VERSION"
  kustomize_bin >/dev/null || die "go install did not produce kustomize $KUSTOMIZE_VERSION"
  say "kustomize ready in $((SECONDS - started)) s"
}

ensure_promtool() {
  command -v promtool >/dev/null && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian's prometheus package for promtool"
    local started=$SECONDS
    apt-get update -qq
    # policy-rc.d keeps the package's own Prometheus service from starting.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    say "promtool ready in $((SECONDS - started)) s"
  fi
  command -v promtool >/dev/null || die "promtool not found; apt-get install prometheus (Debian) or put promtool on PATH"
}

compose_client() {  # prints the command that runs `compose`: Docker's plugin, else ours
  if docker compose version >/dev/null 2>&1; then echo "docker compose"
  elif [ -x "$bin/docker-compose" ]; then echo "$bin/docker-compose"
  else return 1; fi
}

ensure_compose() {
  compose_client >/dev/null && return 0
  command -v go >/dev/null || die "no compose client and no Go toolchain to build one"
  say "building the compose client $COMPOSE_VERSION from its Go module (once, about 2 minutes)"
  local started=$SECONDS dir work
  # `go install module@version` refuses this module (its go.mod has exclude directives):
  # download it and build from a writable copy instead.
  dir=$(GOFLAGS=-mod=mod go mod download -json "github.com/docker/compose/v2@$COMPOSE_VERSION" \
    | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
  work=$(mktemp -d)
  cp -r "$dir/." "$work" && chmod -R u+w "$work"
  mkdir -p "$bin"
  (cd "$work" && GOFLAGS=-mod=mod go build -o "$bin/docker-compose" ./cmd) || { rm -rf "$work"; die "building compose failed"; }
  rm -rf "$work"
  say "compose client ready in $((SECONDS - started)) s"
}

tools() {
  ensure_kustomize
  ensure_promtool
  ensure_compose
  "$PYTHON" -c 'import kubernetes_validate' 2>/dev/null \
    || die "kubernetes-validate is missing from $PYTHON: make's bootstrap installs the test extras"
}

render() {  # kustomize build every overlay into .cache/deploy-check/<overlay>.yaml
  local k o
  k=$(kustomize_bin) || die "kustomize $KUSTOMIZE_VERSION missing: scripts/deploy-check.sh tools"
  mkdir -p "$out"
  for o in "${overlays[@]}"; do
    "$k" build "deploy/k8s/overlays/$o" >"$out/$o.yaml" || die "kustomize build deploy/k8s/overlays/$o failed"
    echo "$out/$o.yaml"
  done
}

lock() {  # pin the image's dependencies, with hashes, to the versions the venv tests with
  local work
  work=$(mktemp -d)
  trap 'rm -rf "$work"' RETURN
  python3 -m venv "$work/venv"
  "$work/venv/bin/pip" install -q pip-tools
  "$PYTHON" -m pip freeze --exclude-editable | grep -v '^onoff-events' >"$work/tested.txt"
  local common=(--quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url
                --no-emit-find-links)
  export CUSTOM_COMPILE_COMMAND="scripts/deploy-check.sh lock"
  "$work/venv/bin/pip-compile" "${common[@]}" --no-annotate --constraint "$work/tested.txt" \
    --output-file requirements.lock pyproject.toml
  "$work/venv/bin/pip-compile" "${common[@]}" --all-build-deps --only-build-deps \
    --output-file requirements-build.lock pyproject.toml
  say "requirements.lock and requirements-build.lock written"
}

compose_rules() {  # the laptop Prometheus loads the same groups as the PrometheusRule
  "$PYTHON" - deploy/k8s/base/monitoring/prometheusrule.yaml \
    deploy/compose/prometheus/onoff-events.rules.yaml <<'PY'
import sys
import yaml
groups = yaml.safe_load(open(sys.argv[1]))["spec"]["groups"]
yaml.SafeDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))
with open(sys.argv[2], "w") as out:
    out.write("# A copy of the groups of deploy/k8s/base/monitoring/prometheusrule.yaml, written by\n"
              "# `scripts/deploy-check.sh compose-rules`; tests/test_deploy.py checks they are equal.\n")
    yaml.safe_dump({"groups": groups}, out, sort_keys=False, width=1000)
PY
  say "deploy/compose/prometheus/onoff-events.rules.yaml written"
}

check() {
  local started=$SECONDS
  tools
  "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_deploy.py
  say "all deployment checks passed in $((SECONDS - started)) s"
}

case "${1:-check}" in
  check) check ;;
  tools) tools ;;
  render) ensure_kustomize; render ;;
  lock) lock ;;
  compose-rules) compose_rules ;;
  *) sed -n '2,20p' "$0"; exit 2 ;;
esac
